//! Child processes the tests start: stopped by PID (kill, then wait, since PID 1 here does
//! not reap orphans), and commands run with a deadline.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A child process killed and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("create log file");
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {name}: {e} (run scripts/test.sh, which installs it)")
        });
        Proc { child: Some(child) }
    }

    /// Sends SIGTERM (by PID, to this child only), as an orchestrator stopping it would.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill -TERM {}", child.id());
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child has exited (reaping it when it has).
    pub fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().ok().flatten().is_some(),
            None => true,
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Panics with a clear message when a tool the test needs is missing.
pub fn require(tool: &str) {
    which(tool);
}

/// Where `tool` is on PATH; panics with a clear message when it is missing.
pub fn which(tool: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{tool} is not installed: run the README's test command (scripts/test.sh), which installs it"
            )
        })
}

/// Panics with a clear message when a file a Debian package provides is missing.
pub fn require_file(path: &str, package: &str) {
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: install Debian's {package} (scripts/test.sh does)"
    );
}

/// A free loopback port (bound and released; the race with other users is accepted).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command to completion within `limit`, returning its output.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    // Drain pipes on threads so a chatty command cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut b).ok();
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut b).ok();
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run_ok(cmd: Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` until it returns true or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A self-signed RSA certificate for `common_name` (valid for 127.0.0.1 too), written to
/// `dir/cert.pem` and `dir/key.pem`; returns (cert, key).
pub fn self_signed_cert(dir: &Path, common_name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    require("openssl");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut cmd = Command::new("openssl");
    cmd.args([
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
    ])
    .arg(format!("/CN={common_name}"))
    .args(["-addext", "subjectAltName=IP:127.0.0.1"])
    .arg("-keyout")
    .arg(&key)
    .arg("-out")
    .arg(&cert);
    run_ok(cmd, Duration::from_secs(60));
    (cert, key)
}

/// A certificate authority and a server certificate it signed for 127.0.0.1 (what rustls
/// clients accept; they refuse a CA certificate as a server's own), written to `dir`;
/// returns (ca, cert, key).
pub fn ca_signed_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    require("openssl");
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let (cert, key, csr) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("cert.csr"),
    );
    let ext = dir.join("cert.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str], paths: &[(&str, &Path)]| {
        let mut cmd = Command::new("openssl");
        cmd.args(args);
        for (flag, path) in paths {
            cmd.arg(flag).arg(path);
        }
        run_ok(cmd, Duration::from_secs(60));
    };
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=regatta test CA",
        ],
        &[("-keyout", &ca_key), ("-out", &ca)],
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[("-keyout", &key), ("-out", &csr)],
    );
    openssl(
        &["x509", "-req", "-days", "2", "-set_serial", "1"],
        &[
            ("-in", &csr),
            ("-CA", &ca),
            ("-CAkey", &ca_key),
            ("-extfile", &ext),
            ("-out", &cert),
        ],
    );
    (ca, cert, key)
}
