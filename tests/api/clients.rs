//! Real registry clients pulling through the gateway: skopeo, podman, containerd's ctr,
//! Docker Engine, crane and regctl.
//! Each returns what arrived so the test can compare digests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::images::sha256;
use crate::procs::{require, run, run_ok, wait_until, Proc};

const PULL_LIMIT: Duration = Duration::from_secs(180);

/// What a pull left on disk: the top-level digest and every blob digest, each re-hashed.
#[derive(Debug)]
pub struct Pulled {
    pub top: String,
    pub blobs: BTreeSet<String>,
}

/// `skopeo copy --all docker://GATEWAY/REF oci:DIR:tag`; every blob in DIR is re-hashed.
pub fn skopeo_pull(reference: &str, out: &Path) -> Pulled {
    skopeo_pull_retrying(reference, out, 0)
}

/// The same, with skopeo retrying failed transfers `retries` times, as real clients do.
pub fn skopeo_pull_retrying(reference: &str, out: &Path, retries: u32) -> Pulled {
    try_skopeo_pull(reference, out, retries).unwrap_or_else(|e| panic!("{e}"))
}

/// A skopeo pull that may fail: `Err` with skopeo's own words.
pub fn try_skopeo_pull(reference: &str, out: &Path, retries: u32) -> Result<Pulled, String> {
    try_skopeo_pull_as(reference, out, retries, None)
}

/// A skopeo pull with `--src-creds USER:PASSWORD` when given (and never any stored
/// credentials: its auth file is an empty one of its own).
pub fn try_skopeo_pull_as(
    reference: &str,
    out: &Path,
    retries: u32,
    creds: Option<&str>,
) -> Result<Pulled, String> {
    require("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--retry-times",
    ])
    .arg(retries.to_string());
    if let Some(creds) = creds {
        cmd.args(["--src-creds", creds]);
    }
    let empty_auth = out.with_extension("auth.json");
    std::fs::write(&empty_auth, "{}").unwrap();
    cmd.arg("--src-authfile")
        .arg(&empty_auth)
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:pulled", out.display()));
    let output = crate::procs::run(cmd, PULL_LIMIT);
    if !output.status.success() {
        return Err(format!(
            "skopeo pull of {reference} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(read_layout(out))
}

pub fn read_layout(dir: &Path) -> Pulled {
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let top = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let mut blobs = BTreeSet::new();
    for entry in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        let name = format!("sha256:{}", entry.file_name().to_string_lossy());
        assert_eq!(sha256(&bytes), name, "blob content does not match its name");
        blobs.insert(name);
    }
    Pulled { top, blobs }
}

/// A podman with its own storage (vfs), so pulls never reuse another test's layers.
pub struct Podman {
    dir: tempfile::TempDir,
    /// `registries.conf` text replacing the system's (`CONTAINERS_REGISTRIES_CONF`).
    registries: Option<PathBuf>,
}

impl Podman {
    pub fn new() -> Podman {
        require("podman");
        let dir = tempfile::tempdir().unwrap();
        // Its own credentials file (podman wants it to exist), empty until `login`.
        std::fs::write(dir.path().join("auth.json"), "{}").unwrap();
        Podman {
            dir,
            registries: None,
        }
    }

    /// A podman reading `registries_conf` instead of the system's registries
    /// configuration, whose lookups outside loopback go to a closed proxy port.
    pub fn with_registries(registries_conf: &str) -> Podman {
        let mut podman = Podman::new();
        let path = podman.dir.path().join("registries.conf");
        std::fs::write(&path, registries_conf).unwrap();
        podman.registries = Some(path);
        podman
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        // Credentials from `login` stay with this podman.
        cmd.env("REGISTRY_AUTH_FILE", self.dir.path().join("auth.json"));
        if let Some(conf) = &self.registries {
            let closed = format!("http://127.0.0.1:{}", crate::procs::free_port());
            cmd.env("CONTAINERS_REGISTRIES_CONF", conf)
                .env("HTTPS_PROXY", &closed)
                .env("HTTP_PROXY", &closed)
                .env("NO_PROXY", "127.0.0.0/8,localhost");
        }
        cmd.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ]);
        cmd
    }

    /// `podman login` to `host` over plain HTTP; its credentials stay with this podman.
    pub fn login(&self, host: &str, user: &str, password: &str) {
        let mut cmd = self.cmd();
        cmd.args([
            "login",
            "--tls-verify=false",
            "-u",
            user,
            "-p",
            password,
            host,
        ]);
        run_ok(cmd, Duration::from_secs(60));
    }

    /// Pulls `reference` (the host's platform) and returns the image's config digest (its
    /// ID) and the digests podman recorded for it.
    pub fn pull(&self, reference: &str) -> (String, Vec<String>) {
        let mut cmd = self.cmd();
        cmd.args(["pull", "--tls-verify=false", reference]);
        run_ok(cmd, PULL_LIMIT);
        let mut inspect = self.cmd();
        inspect.args(["image", "inspect", reference]);
        let out = run_ok(inspect, Duration::from_secs(60));
        let doc: Value = serde_json::from_str(&out).unwrap();
        let image = &doc[0];
        let id = format!("sha256:{}", image["Id"].as_str().unwrap());
        let mut digests: Vec<String> = image["RepoDigests"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|d| d.as_str()?.rsplit_once('@').map(|(_, d)| d.to_owned()))
            .collect();
        if let Some(d) = image["Digest"].as_str() {
            digests.push(d.to_owned());
        }
        (id, digests)
    }
}

/// A containerd daemon with its own root, state and socket (CRI disabled).
pub struct Containerd {
    dir: tempfile::TempDir,
    _proc: Proc,
}

impl Containerd {
    pub fn start() -> Containerd {
        require("containerd");
        require("ctr");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"{sock}.debug\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = d.join("containerd.sock").display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let proc = Proc::spawn("containerd", cmd, &d.join("containerd.log"));
        let containerd = Containerd { dir, _proc: proc };
        wait_until("containerd to answer", Duration::from_secs(30), || {
            let mut v = containerd.ctr();
            v.arg("version");
            run(v, Duration::from_secs(10)).status.success()
        });
        containerd
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(self.socket());
        cmd
    }

    /// `ctr images pull --plain-http --all-platforms`; returns the image's target digest and
    /// the content store's digests.
    pub fn pull(&self, reference: &str) -> Pulled {
        self.pull_as(reference, None)
    }

    /// The same with `--user USER:PASSWORD` (containerd asks the token service with the
    /// OAuth2 password grant, POST, first).
    pub fn pull_as(&self, reference: &str, user: Option<&str>) -> Pulled {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull", "--plain-http", "--all-platforms"]);
        if let Some(user) = user {
            cmd.args(["--user", user]);
        }
        cmd.arg(reference);
        self.pulled(cmd, reference)
    }

    /// `ctr images pull --hosts-dir HOSTS --all-platforms` (registry hosts, mirrors
    /// included, from `HOSTS/<registry>/hosts.toml`), lookups outside loopback sent to a
    /// closed proxy port; returns what `pull` returns.
    pub fn pull_with_hosts(&self, reference: &str, hosts: &Path) -> Pulled {
        self.pulled(self.pull_cmd_with_hosts(reference, hosts), reference)
    }

    /// The same pull, which may fail: what ctr printed and whether it succeeded.
    pub fn try_pull_with_hosts(&self, reference: &str, hosts: &Path) -> Output {
        run(self.pull_cmd_with_hosts(reference, hosts), PULL_LIMIT)
    }

    fn pull_cmd_with_hosts(&self, reference: &str, hosts: &Path) -> Command {
        let closed = format!("http://127.0.0.1:{}", crate::procs::free_port());
        let mut cmd = self.ctr();
        cmd.args(["images", "pull", "--all-platforms", "--hosts-dir"])
            .arg(hosts)
            .arg(reference)
            .env("HTTPS_PROXY", &closed)
            .env("HTTP_PROXY", &closed)
            .env("NO_PROXY", "127.0.0.0/8,localhost");
        cmd
    }

    fn pulled(&self, cmd: Command, reference: &str) -> Pulled {
        run_ok(cmd, PULL_LIMIT);
        let mut ls = self.ctr();
        ls.args(["images", "ls"]);
        let listing = run_ok(ls, Duration::from_secs(30));
        let top = listing
            .lines()
            .find(|l| l.starts_with(reference))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .unwrap_or_else(|| panic!("{reference} not in ctr images ls:\n{listing}"))
            .to_owned();
        let mut content = self.ctr();
        content.args(["content", "ls", "-q"]);
        let blobs = run_ok(content, Duration::from_secs(30))
            .lines()
            .map(str::to_owned)
            .collect();
        Pulled { top, blobs }
    }
}

/// Debian's docker CLI (`docker.io`), by path: it matches the daemon (20.10) and builds with
/// BuildKit built in. A newer CLI elsewhere on PATH talks to this daemon too (the API is
/// negotiated), but without the buildx plugin its `docker build` falls back to the legacy
/// builder, which does not skip unused stages.
pub const DOCKER_CLI: &str = "/usr/bin/docker";

/// A Docker Engine of the test's own: `dockerd` with its own data root, exec root and socket,
/// no bridge and no iptables rules (containers use the host's network or none). Registry
/// lookups outside loopback go to a closed proxy port, so nothing is ever fetched from outside.
pub struct Dockerd {
    pub dir: tempfile::TempDir,
    proc: Proc,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        Dockerd::start_with(&[])
    }

    /// A daemon started with more flags (e.g. `--registry-mirror URL`).
    pub fn start_with(flags: &[&str]) -> Dockerd {
        require("dockerd");
        assert!(
            Path::new(DOCKER_CLI).is_file(),
            "{DOCKER_CLI} is not installed: run scripts/test.sh, which installs docker.io"
        );
        // Short paths: the daemon's unix sockets live under the exec root (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("dk")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let closed = format!("http://127.0.0.1:{}", crate::procs::free_port());
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(flags)
            .env("HTTPS_PROXY", &closed)
            .env("HTTP_PROXY", &closed)
            .env("NO_PROXY", "127.0.0.0/8,localhost");
        let proc = Proc::spawn("dockerd", cmd, &d.join("dockerd.log"));
        let docker = Dockerd { dir, proc };
        wait_until("dockerd to answer", Duration::from_secs(60), || {
            let mut info = docker.cli();
            info.args(["version", "--format", "{{.Server.Version}}"]);
            run(info, Duration::from_secs(10)).status.success()
        });
        docker
    }

    /// `unix://...` of this daemon, for DOCKER_HOST.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// What a docker client (the CLI, docker-compose, a script) needs to use this daemon.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DOCKER_HOST", self.host()),
            (
                "DOCKER_CONFIG",
                self.dir.path().join("client").display().to_string(),
            ),
            ("DOCKER", DOCKER_CLI.to_owned()),
        ]
    }

    /// The docker CLI talking to this daemon.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(DOCKER_CLI);
        cmd.envs(self.env());
        cmd
    }

    /// Runs `docker ARGS` and returns its stdout, trimmed.
    pub fn run(&self, args: &[&str]) -> String {
        let mut cmd = self.cli();
        cmd.args(args);
        run_ok(cmd, PULL_LIMIT).trim().to_owned()
    }

    /// `docker pull`; returns the image ID (its config digest) and the repository digest.
    pub fn pull(&self, reference: &str) -> (String, String) {
        self.run(&["pull", reference]);
        let id = self.run(&["image", "inspect", "--format", "{{.Id}}", reference]);
        let digests = self.run(&[
            "image",
            "inspect",
            "--format",
            "{{range .RepoDigests}}{{println .}}{{end}}",
            reference,
        ]);
        let repo = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
        let digest = digests
            .lines()
            .find_map(|l| l.strip_prefix(repo)?.strip_prefix('@'))
            .unwrap_or_else(|| panic!("no digest of {repo} among {digests}"))
            .to_owned();
        (id, digest)
    }

    /// Builds `tag` from a `FROM scratch` image holding `binary` at `path` and every library
    /// `ldd` lists for it, with `entrypoint` (a stand-in for a public image that cannot be
    /// pulled here).
    pub fn standin_image(&self, tag: &str, binary: &str, path: &str, entrypoint: &[&str]) {
        let context = tempfile::tempdir().unwrap();
        let root = context.path().join("root");
        let mut files = vec![(PathBuf::from(binary), path.to_owned())];
        let mut ldd = Command::new("ldd");
        ldd.arg(binary);
        let listing =
            String::from_utf8_lossy(&run(ldd, Duration::from_secs(30)).stdout).into_owned();
        for lib in listing.split_whitespace().filter(|w| w.starts_with('/')) {
            files.push((PathBuf::from(lib), lib.to_owned()));
        }
        for (from, to) in &files {
            let dest = root.join(to.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(from, &dest)
                .unwrap_or_else(|e| panic!("cannot copy {} for {tag}: {e}", from.display()));
        }
        std::fs::write(
            context.path().join("Containerfile"),
            format!(
                "FROM scratch\nCOPY root/ /\nENV PATH=/usr/local/bin:/usr/bin:/bin\nENTRYPOINT {}\n",
                serde_json::to_string(entrypoint).unwrap()
            ),
        )
        .unwrap();
        let mut build = self.cli();
        build
            .env("DOCKER_BUILDKIT", "1")
            .args(["build", "--quiet", "-t", tag, "-f"])
            .arg(context.path().join("Containerfile"))
            .arg(context.path());
        run_ok(build, PULL_LIMIT);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Containers a test left behind go first; then the daemon stops its containerd.
        let mut ps = self.cli();
        ps.args(["ps", "-aq"]);
        let ids = String::from_utf8_lossy(&run(ps, Duration::from_secs(30)).stdout).into_owned();
        if !ids.trim().is_empty() {
            let mut rm = self.cli();
            rm.args(["rm", "-f"]).args(ids.split_whitespace());
            let _ = run(rm, Duration::from_secs(60));
        }
        if !self.proc.exited() {
            self.proc.terminate();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.proc.exited() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.proc.stop();
        // dockerd leaves its network namespace file bind-mounted under the exec root: unmount
        // whatever is still mounted below the directory so that it can be removed.
        let prefix = format!("{}/", self.dir.path().display());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let mut umount = Command::new("umount");
            umount.arg(point);
            let _ = run(umount, Duration::from_secs(30));
        }
    }
}

/// How a Go client reaches the gateway: plain HTTP, or HTTPS trusting the test CA.
#[derive(Clone, Copy)]
pub enum Transport<'a> {
    Http,
    Https { ca: &'a Path },
}

/// crane (go-containerregistry). Over HTTPS it trusts only the given CA (`SSL_CERT_FILE`,
/// which Go reads instead of the system roots).
pub struct Crane<'a> {
    transport: Transport<'a>,
}

impl<'a> Crane<'a> {
    pub fn new(transport: Transport<'a>) -> Crane<'a> {
        require("crane");
        Crane { transport }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("crane");
        cmd.args(args);
        match self.transport {
            Transport::Http => {
                cmd.arg("--insecure");
            }
            Transport::Https { ca } => {
                cmd.env("SSL_CERT_FILE", ca);
            }
        }
        cmd
    }

    /// Runs `crane ARGS` and returns its output (failures included, for the caller to judge).
    pub fn run(&self, args: &[&str]) -> Output {
        run(self.cmd(args), PULL_LIMIT)
    }

    pub fn digest(&self, reference: &str) -> String {
        run_ok(self.cmd(&["digest", reference]), PULL_LIMIT)
            .trim()
            .to_owned()
    }

    pub fn manifest(&self, reference: &str) -> Vec<u8> {
        let out = self.run(&["manifest", reference]);
        assert!(out.status.success(), "crane manifest {reference} failed");
        out.stdout
    }

    pub fn ls(&self, repository: &str) -> BTreeSet<String> {
        run_ok(self.cmd(&["ls", repository]), PULL_LIMIT)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `crane pull --format oci` (every platform) into `out`, re-hashed.
    pub fn pull(&self, reference: &str, out: &Path) -> Pulled {
        let dir = out.to_str().unwrap();
        run_ok(
            self.cmd(&["pull", "--format", "oci", reference, dir]),
            PULL_LIMIT,
        );
        read_layout(out)
    }
}

/// regctl (regclient), with a configuration of its own (HOME) naming the gateway's TLS.
pub struct Regctl {
    home: tempfile::TempDir,
}

impl Regctl {
    pub fn new(host: &str, transport: Transport) -> Regctl {
        require("regctl");
        let regctl = Regctl {
            home: tempfile::tempdir().unwrap(),
        };
        let mut set = regctl.cmd(&["registry", "set", host]);
        match transport {
            Transport::Http => set.args(["--tls", "disabled"]),
            Transport::Https { ca } => set
                .arg("--cacert")
                .arg(std::fs::read_to_string(ca).unwrap()),
        };
        // regctl pings the registry here and keeps the setting even when the ping fails (an
        // untrusted certificate): the commands that follow show the failure.
        run(set, Duration::from_secs(30));
        regctl
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("regctl");
        cmd.args(args).env("HOME", self.home.path());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run(self.cmd(args), PULL_LIMIT)
    }

    pub fn tags(&self, repository: &str) -> BTreeSet<String> {
        run_ok(self.cmd(&["tag", "ls", repository]), PULL_LIMIT)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn digest(&self, reference: &str) -> String {
        run_ok(self.cmd(&["image", "digest", reference]), PULL_LIMIT)
            .trim()
            .to_owned()
    }

    pub fn manifest(&self, reference: &str) -> Vec<u8> {
        let out = self.run(&["manifest", "get", "--format", "raw-body", reference]);
        assert!(
            out.status.success(),
            "regctl manifest get {reference} failed"
        );
        out.stdout
    }

    /// `regctl image copy REF ocidir://OUT:copied` (every platform), re-hashed.
    pub fn copy_to_layout(&self, reference: &str, out: &Path) -> Pulled {
        let target = format!("ocidir://{}:copied", out.display());
        run_ok(self.cmd(&["image", "copy", reference, &target]), PULL_LIMIT);
        read_layout(out)
    }
}
