//! Test images written by hand as OCI layouts: deterministic tar + gzip layers, real image
//! configs (diff_ids match), and a multi-arch index over linux/amd64 and linux/arm64.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[derive(Debug, Clone)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: sha256(bytes),
            size: bytes.len() as u64,
        }
    }

    pub fn json(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub arch: String,
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A multi-arch image in an OCI layout directory.
pub struct Image {
    pub dir: PathBuf,
    pub tag: String,
    pub index: Descriptor,
    pub platforms: Vec<PlatformImage>,
}

impl Image {
    /// Every digest a full pull must deliver: index, manifests, configs, layers.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::from([self.index.digest.clone()]);
        for p in &self.platforms {
            out.insert(p.manifest.digest.clone());
            out.insert(p.config.digest.clone());
            out.extend(p.layers.iter().map(|l| l.digest.clone()));
        }
        out
    }

    /// Layer digests, which pulls fetch as blobs.
    pub fn layer_digests(&self) -> Vec<String> {
        self.platforms
            .iter()
            .flat_map(|p| p.layers.iter().map(|l| l.digest.clone()))
            .collect()
    }

    pub fn platform(&self, arch: &str) -> &PlatformImage {
        self.platforms.iter().find(|p| p.arch == arch).unwrap()
    }
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn write_blob(dir: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    std::fs::write(blob_path(dir, &digest), bytes).unwrap();
    digest
}

/// Deterministic pseudo-random bytes (they do not compress away).
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut state =
        u64::from_le_bytes(Sha256::digest(seed.as_bytes())[..8].try_into().unwrap()) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A gzip'd tar with the given files, byte-identical for identical input. Files under `bin/`
/// are executable.
fn layer(files: &[(String, Vec<u8>)]) -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_size(content.len() as u64);
        header.set_mode(if path.starts_with("bin/") {
            0o755
        } else {
            0o644
        });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        tar.append(&header, content.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let diff_id = sha256(&tar);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// Builds a two-platform image whose content is unique to `seed`, with `layers` layers per
/// platform (the last one carrying `bulk` bytes), tagged `tag` in a layout under `dir`.
pub fn multiarch(dir: &Path, seed: &str, tag: &str, layers: usize, bulk: usize) -> Image {
    write_multiarch(
        dir,
        tag,
        &json!({ "Env": [format!("REGATTA_TEST={seed}")] }),
        |arch| {
            (0..layers)
                .map(|n| {
                    let mut files = vec![(
                        format!("etc/regatta/{seed}-{arch}-{n}.txt"),
                        format!("layer {n} of {seed} for {arch}\n").into_bytes(),
                    )];
                    if n + 1 == layers && bulk > 0 {
                        files.push((
                            format!("opt/{seed}-{arch}.bin"),
                            noise(&format!("{seed}{arch}"), bulk),
                        ));
                    }
                    files
                })
                .collect()
        },
    )
}

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// A two-platform image that runs: its amd64 image is Debian's static busybox (first layer)
/// and a file `/etc/regatta/seed` holding `seed` plus `bulk` bytes of noise in
/// `/opt/bulk.bin` (second layer); its command prints the seed. The arm64 image only carries
/// the seed (it is never run here).
pub fn runnable(dir: &Path, seed: &str, tag: &str, bulk: usize) -> Image {
    crate::procs::require_file(BUSYBOX, "busybox-static");
    let busybox = std::fs::read(BUSYBOX).unwrap();
    let config = json!({
        "Cmd": ["/bin/busybox", "cat", "/etc/regatta/seed"],
        "Env": ["PATH=/bin"],
    });
    write_multiarch(dir, tag, &config, |arch| {
        let seed_file = (
            "etc/regatta/seed".to_owned(),
            format!("{seed} {arch}\n").into_bytes(),
        );
        let mut second = vec![seed_file];
        if bulk > 0 {
            second.push(("opt/bulk.bin".to_owned(), noise(seed, bulk)));
        }
        match arch {
            "amd64" => vec![vec![("bin/busybox".to_owned(), busybox.clone())], second],
            _ => vec![second],
        }
    })
}

/// Writes an OCI layout with a linux/amd64 + linux/arm64 index: each platform's layers
/// (files per layer) from `layers_of(arch)`, its config with `config` as the runtime config.
fn write_multiarch(
    dir: &Path,
    tag: &str,
    config: &Value,
    layers_of: impl Fn(&str) -> Vec<Vec<(String, Vec<u8>)>>,
) -> Image {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut platforms = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for files in layers_of(arch) {
            let (gz, diff_id) = layer(&files);
            write_blob(dir, &gz);
            layer_descs.push(Descriptor::of(OCI_LAYER, &gz));
            diff_ids.push(diff_id);
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": [],
        }))
        .unwrap();
        write_blob(dir, &config);
        let config_desc = Descriptor::of(OCI_CONFIG, &config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc.json(),
            "layers": layer_descs.iter().map(Descriptor::json).collect::<Vec<_>>(),
        }))
        .unwrap();
        write_blob(dir, &manifest);
        platforms.push(PlatformImage {
            arch: arch.into(),
            manifest: Descriptor::of(OCI_MANIFEST, &manifest),
            config: config_desc,
            layers: layer_descs,
        });
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": platforms.iter().map(|p| {
            let mut d = p.manifest.json();
            d["platform"] = json!({ "architecture": p.arch, "os": "linux" });
            d
        }).collect::<Vec<_>>(),
    }))
    .unwrap();
    write_blob(dir, &index);
    let index_desc = Descriptor::of(OCI_INDEX, &index);
    let mut top = index_desc.json();
    top["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [top] })).unwrap(),
    )
    .unwrap();
    Image {
        dir: dir.to_owned(),
        tag: tag.into(),
        index: index_desc,
        platforms,
    }
}

/// An artifact manifest whose `subject` is `subject`, with its blobs, as raw bytes.
pub struct Artifact {
    pub artifact_type: String,
    pub manifest: Vec<u8>,
    pub descriptor: Descriptor,
    pub blobs: Vec<Vec<u8>>,
}

pub fn artifact(subject: &Descriptor, artifact_type: &str, payload: &[u8]) -> Artifact {
    build_artifact(Some(subject), artifact_type, payload)
}

/// An artifact with no subject.
pub fn standalone_artifact(artifact_type: &str, payload: &[u8]) -> Artifact {
    build_artifact(None, artifact_type, payload)
}

/// The artifact's one layer is `payload`, titled `payload.json` (the file name ORAS clients
/// write it to).
fn build_artifact(subject: Option<&Descriptor>, artifact_type: &str, payload: &[u8]) -> Artifact {
    let empty = b"{}".to_vec();
    let empty_desc = Descriptor::of("application/vnd.oci.empty.v1+json", &empty);
    let mut layer = Descriptor::of("application/vnd.regatta.test.sbom+json", payload).json();
    layer["annotations"] = json!({ "org.opencontainers.image.title": "payload.json" });
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty_desc.json(),
        "layers": [layer],
    });
    if let Some(subject) = subject {
        manifest["subject"] = subject.json();
    }
    let manifest = serde_json::to_vec(&manifest).unwrap();
    Artifact {
        artifact_type: artifact_type.into(),
        descriptor: Descriptor::of(OCI_MANIFEST, &manifest),
        manifest,
        blobs: vec![empty, payload.to_vec()],
    }
}
