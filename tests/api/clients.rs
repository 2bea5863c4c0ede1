//! Real registry clients pulling through the gateway: skopeo, podman and containerd's ctr.
//! Each returns what arrived so the test can compare digests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
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
    require("skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--retry-times",
    ])
    .arg(retries.to_string())
    .arg(format!("docker://{reference}"))
    .arg(format!("oci:{}:pulled", out.display()));
    run_ok(cmd, PULL_LIMIT);
    read_layout(out)
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
}

impl Podman {
    pub fn new() -> Podman {
        require("podman");
        Podman {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
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
        let mut cmd = self.ctr();
        cmd.args([
            "images",
            "pull",
            "--plain-http",
            "--all-platforms",
            reference,
        ]);
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
