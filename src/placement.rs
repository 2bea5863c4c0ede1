//! The placement decision: which of an org's backends should serve a digest, best first.
//!
//! Architecture invariant: this module does no I/O and takes no locks. It is a plain
//! function over a snapshot of what the node knows, so it can be tested as a table and
//! benchmarked in isolation. Probing, caching and retries happen around it.

use std::cmp::Ordering;

use crate::topology::BackendIdx;

/// What the node knows about one backend holding one digest in one repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holding {
    Has,
    Lacks,
    Unknown,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Degraded,
    Down,
}

/// The facts about one backend that placement weighs.
#[derive(Debug, Clone, Copy)]
pub struct BackendView<'a> {
    pub idx: BackendIdx,
    pub region: &'a str,
    pub health: Health,
    pub drained: bool,
    /// Smoothed latency of recent calls, in microseconds; 0 when nothing is known yet.
    pub latency_us: u32,
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub backend: BackendIdx,
    pub holding: Holding,
}

/// Latencies within one bucket count as equal, so that noise does not reorder backends.
const LATENCY_BUCKET_US: u32 = 5_000;

/// Orders the org's backends for one digest: backends known to hold it before backends
/// not yet asked; then healthy before degraded, the node's region first, faster first,
/// heavier first, and policy order last. Backends that lack the digest, are down or are
/// drained are left out.
///
/// `views` and `holdings` are parallel, in the org's policy order.
pub fn rank(node_region: &str, views: &[BackendView<'_>], holdings: &[Holding]) -> Vec<Candidate> {
    debug_assert_eq!(views.len(), holdings.len());
    let mut order: Vec<(usize, &BackendView<'_>, Holding)> = views
        .iter()
        .zip(holdings)
        .enumerate()
        .filter(|(_, (v, h))| **h != Holding::Lacks && v.health != Health::Down && !v.drained)
        .map(|(pos, (v, h))| (pos, v, *h))
        .collect();
    order.sort_by(|a, b| compare(node_region, a, b));
    order
        .into_iter()
        .map(|(_, v, holding)| Candidate {
            backend: v.idx,
            holding,
        })
        .collect()
}

fn compare(
    node_region: &str,
    (a_pos, a, a_hold): &(usize, &BackendView<'_>, Holding),
    (b_pos, b, b_hold): &(usize, &BackendView<'_>, Holding),
) -> Ordering {
    let known = |h: &Holding| *h != Holding::Has;
    let zero_weight = |v: &BackendView<'_>| v.weight == 0;
    let far = |v: &BackendView<'_>| v.region != node_region;
    let bucket = |v: &BackendView<'_>| v.latency_us / LATENCY_BUCKET_US;
    known(a_hold)
        .cmp(&known(b_hold))
        .then(zero_weight(a).cmp(&zero_weight(b)))
        .then(a.health.cmp(&b.health))
        .then(far(a).cmp(&far(b)))
        .then(bucket(a).cmp(&bucket(b)))
        .then(b.weight.cmp(&a.weight))
        .then(a_pos.cmp(b_pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Holding::*;

    fn view(idx: BackendIdx, region: &'static str) -> BackendView<'static> {
        BackendView {
            idx,
            region,
            health: Health::Up,
            drained: false,
            latency_us: 0,
            weight: 100,
        }
    }

    fn order(views: &[BackendView<'_>], holdings: &[Holding]) -> Vec<BackendIdx> {
        rank("eu", views, holdings)
            .iter()
            .map(|c| c.backend)
            .collect()
    }

    #[test]
    fn placement_table() {
        let eu0 = view(0, "eu");
        let eu1 = view(1, "eu");
        let us2 = view(2, "us");
        let slow = |mut v: BackendView<'static>| {
            v.latency_us = 80_000;
            v
        };
        let health = |mut v: BackendView<'static>, h| {
            v.health = h;
            v
        };
        let weight = |mut v: BackendView<'static>, w| {
            v.weight = w;
            v
        };
        let drained = |mut v: BackendView<'static>| {
            v.drained = true;
            v
        };
        #[rustfmt::skip]
        type Row = (&'static str, Vec<BackendView<'static>>, Vec<Holding>, Vec<BackendIdx>);
        let table: Vec<Row> = vec![
            (
                "policy order breaks ties",
                vec![eu0, eu1],
                vec![Unknown, Unknown],
                vec![0, 1],
            ),
            (
                "known holder before unknown",
                vec![eu0, eu1],
                vec![Unknown, Has],
                vec![1, 0],
            ),
            (
                "a backend lacking the digest is never chosen",
                vec![eu0, eu1],
                vec![Lacks, Unknown],
                vec![1],
            ),
            (
                "stale mirror lacking the digest is left out",
                vec![eu0, eu1],
                vec![Has, Lacks],
                vec![0],
            ),
            (
                "same region first",
                vec![us2, eu1],
                vec![Has, Has],
                vec![1, 2],
            ),
            (
                "region beats policy order",
                vec![us2, eu0],
                vec![Unknown, Unknown],
                vec![0, 2],
            ),
            (
                "faster first within a region",
                vec![slow(eu0), eu1],
                vec![Has, Has],
                vec![1, 0],
            ),
            (
                "region beats latency",
                vec![slow(eu0), us2],
                vec![Has, Has],
                vec![0, 2],
            ),
            (
                "healthy before degraded",
                vec![health(eu0, Health::Degraded), eu1],
                vec![Has, Has],
                vec![1, 0],
            ),
            (
                "down is left out",
                vec![health(eu0, Health::Down), eu1],
                vec![Has, Unknown],
                vec![1],
            ),
            (
                "drained is left out",
                vec![drained(eu0), eu1],
                vec![Has, Has],
                vec![1],
            ),
            (
                "heavier first",
                vec![weight(eu0, 10), weight(eu1, 50)],
                vec![Has, Has],
                vec![1, 0],
            ),
            (
                "weight 0 only as a last resort",
                vec![weight(eu0, 0), us2],
                vec![Has, Has],
                vec![2, 0],
            ),
            (
                "nothing can serve",
                vec![drained(eu0), eu1],
                vec![Has, Lacks],
                vec![],
            ),
        ];
        for (name, views, holdings, want) in table {
            assert_eq!(order(&views, &holdings), want, "{name}");
        }
    }

    #[test]
    fn candidates_carry_their_holding() {
        let got = rank("eu", &[view(0, "eu"), view(1, "eu")], &[Unknown, Has]);
        assert_eq!(
            got,
            vec![
                Candidate {
                    backend: 1,
                    holding: Has
                },
                Candidate {
                    backend: 0,
                    holding: Unknown
                }
            ]
        );
    }
}
