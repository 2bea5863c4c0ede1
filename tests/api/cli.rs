//! The `regatta` binary's configuration check.

use std::process::Command;
use std::time::Duration;

use crate::procs::run;

#[test]
fn check_config_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"nowhere\"\n[[backends]]\nid = \"hub\"\nurl = \"ftp://x\"\n[[orgs]]\nname = \"acme\"\nbackends = [\"ghost\"]\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
    cmd.arg("check-config").arg(&bad);
    let out = run(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["server.listen", "backends[0].url", "orgs[0].backends[0]"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
    cmd.arg("check-config").arg(&good);
    let out = run(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
