//! Shared by the load and pull benchmarks: a release-build regatta node as its own process.

use std::path::Path;

use crate::helpers::NodeProcess;

/// A release-build node with `extra` configuration, JSON logs at `warn`, and `LOAD_WORKERS`
/// workers when that is set.
pub fn start_node(dir: &Path, name: &str, extra: &str) -> NodeProcess {
    let workers = std::env::var("LOAD_WORKERS")
        .map(|w| format!("workers = {w}\n"))
        .unwrap_or_default();
    NodeProcess::start(
        dir,
        name,
        &format!("region = \"eu\"\n{workers}[log]\nformat = \"json\"\nfilter = \"warn\"\n{extra}"),
        &[],
    )
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
