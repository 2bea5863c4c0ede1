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

/// `regatta check-config` on `text` written to `file`: whether it passed, and what it printed.
fn check_config(file: &std::path::Path, text: &str) -> (bool, String) {
    std::fs::write(file, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
    cmd.arg("check-config")
        .arg(file)
        .env_remove("MISSING_TOKEN");
    let out = run(cmd, Duration::from_secs(30));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn check_config_refuses_credentials_in_urls_and_warns_about_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str| check_config(&dir.path().join(name), text);

    let (ok, out) = check(
        "userinfo.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"hub\"\nurl = \"https://alice:url-s3cret@registry.example\"\n",
    );
    assert!(!ok, "userinfo in a backend URL passed:\n{out}");
    assert!(out.contains("backends[0].url"), "{out}");
    assert!(
        !out.contains("url-s3cret"),
        "the password was printed:\n{out}"
    );

    let (ok, out) = check(
        "missing-env.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"hub\"\nurl = \"https://registry.example\"\ntoken_env = \"MISSING_TOKEN\"\n",
    );
    assert!(!ok, "{out}");
    assert!(out.contains("backends[0].token_env"), "{out}");

    // Credentials from a file on a plain-http backend: a warning, and the check passes.
    let password = dir.path().join("password");
    std::fs::write(&password, "file-s3cret\n").unwrap();
    let (ok, out) = check(
        "plain-http.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"hub\"\nurl = \"http://127.0.0.1:5000\"\nusername = \"alice\"\npassword_file = \"{}\"\n",
            password.display()
        ),
    );
    assert!(ok, "a warning failed the check:\n{out}");
    assert!(
        out.contains("warning") && out.contains("backends[0].url") && out.contains("plain http"),
        "{out}"
    );
    assert!(!out.contains("file-s3cret"), "{out}");
}

#[test]
fn check_config_names_upstream_group_problems() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("mirror.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:0\"\n[[backends]]\nid = \"hub\"\nurl = \"http://127.0.0.1:1\"\n\
         [[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\n\
         [[upstreams]]\nname = \"docker.io\"\naliases = [\"acme\"]\nbackends = [\"ghost\"]\ndefault = true\n\
         [[upstreams]]\nname = \"ghcr.io\"\nbackends = [\"hub\"]\ndefault = true\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regatta"));
    cmd.arg("check-config").arg(&bad);
    let out = run(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for (key, words) in [
        ("upstreams[0].backends[0]", "no backend has id 'ghost'"),
        ("upstreams[0].aliases[0]", "orgs[0]"),
        ("upstreams[1].default", "upstreams[0] is the default"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(key) && l.contains(words)),
            "{key} ({words}) missing from:\n{err}"
        );
    }
}

/// A private org needs a signing key and no `direct` backend; the auth files must parse;
/// a grant to a user the users file lacks is a warning.
#[test]
fn check_config_guards_private_orgs() {
    let files = crate::private::AuthFiles::new();
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: &str| {
        check_config(
            &dir.path().join(name),
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n{text}"),
        )
    };
    let org = |delivery: &str, principal: &str| {
        format!(
            "[[backends]]\nid = \"hub\"\nurl = \"http://127.0.0.1:5000\"\ndelivery = \"{delivery}\"\n\
             [[orgs]]\nname = \"acme\"\nbackends = [\"hub\"]\naccess = \"private\"\n\
             [[orgs.grants]]\nprincipal = \"{principal}\"\nrepositories = [\"*\"]\n"
        )
    };
    let auth = format!(
        "[auth]\nsigning_key = \"{}\"\nusers_file = \"{}\"\n",
        files.key.display(),
        files.users.display()
    );

    let (ok, out) = check("no-key.toml", &org("auto", "alice"));
    assert!(
        !ok && out.contains("orgs[0].access") && out.contains("signing_key"),
        "{out}"
    );
    let (ok, out) = check("direct.toml", &format!("{auth}{}", org("direct", "alice")));
    assert!(
        !ok && out.contains("orgs[0].access") && out.contains("direct"),
        "{out}"
    );
    let not_a_key = dir.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    let (ok, out) = check(
        "bad-files.toml",
        &format!(
            "[auth]\nsigning_key = \"{}\"\nusers_file = \"{}\"\n",
            not_a_key.display(),
            not_a_key.display()
        ),
    );
    assert!(
        !ok && out.contains("auth.signing_key") && out.contains("auth.users_file"),
        "{out}"
    );
    let (ok, out) = check("good.toml", &format!("{auth}{}", org("resolve", "alice")));
    assert!(ok, "{out}");
    let (ok, out) = check(
        "unknown-user.toml",
        &format!("{auth}{}", org("proxy", "carol")),
    );
    assert!(
        ok && out.contains("warning") && out.contains("carol"),
        "{out}"
    );
}
