//! Small backends that behave as no real registry here can: one that stalls after its
//! headers, one that answers a tag by the client's `Accept` as Docker Hub does. Plain
//! HTTP/1.1 over std sockets, one thread per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::images::Image;

/// One request head: method, path and headers (names lowercased).
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name`, comma-separated lists split.
    fn values(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .map(|v| v.trim().to_owned())
            .collect()
    }
}

/// Reads the next request head; `None` at the end of the connection.
fn read_head(reader: &mut impl BufRead) -> Option<Head> {
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).ok()? == 0 {
        return None;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Some(Head {
                method,
                path,
                headers,
            });
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
}

/// Accepts connections on a fresh loopback port, serving each on a thread of its own.
fn listen(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
    port
}

/// A backend that answers and then stalls: `/v2/` and HEADs are answered at once (so it
/// looks healthy and seems to hold everything), every other GET gets its response head and
/// then not one byte of the body. It counts the stalled answers and how many of those
/// connections the gateway closed.
pub struct Stall {
    pub port: u16,
    stalled: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Stall {
    pub fn start() -> Stall {
        let stalled = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (s, c) = (stalled.clone(), closed.clone());
        let port = listen(move |stream| serve_stalling(stream, &s, &c));
        Stall {
            port,
            stalled,
            closed,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GETs answered with a head and a body that never came.
    pub fn stalled(&self) -> usize {
        self.stalled.load(Ordering::SeqCst)
    }

    /// Stalled connections the other side has closed.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

fn serve_stalling(stream: TcpStream, stalled: &AtomicUsize, closed: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    while let Some(head) = read_head(&mut reader) {
        let answer = if head.path == "/v2/" {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        } else if head.method == "HEAD" {
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n"
        } else {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\nContent-Length: 1048576\r\n\r\n";
            if out.write_all(head.as_bytes()).is_err() {
                return;
            }
            stalled.fetch_add(1, Ordering::SeqCst);
            // Send nothing more; wait for the other side to give up.
            let mut sink = [0u8; 1024];
            while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
            closed.fetch_add(1, Ordering::SeqCst);
            return;
        };
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// A backend shaped like Docker Hub for tags: `<repo>:<tag>` answers with the image's index
/// when the client accepts an index, else with the linux/amd64 manifest; manifests by
/// digest and blobs come from the image's OCI layout.
pub struct AcceptHub {
    pub port: u16,
}

impl AcceptHub {
    pub fn start(image: &Image) -> AcceptHub {
        let layout = image.dir.clone();
        let tag = image.tag.clone();
        let index = (image.index.media_type.clone(), image.index.digest.clone());
        let amd64 = image.platform("amd64").manifest.clone();
        let single = (amd64.media_type, amd64.digest);
        let port = listen(move |stream| {
            serve_by_accept(stream, &layout, &tag, &index, &single);
        });
        AcceptHub { port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn serve_by_accept(
    stream: TcpStream,
    layout: &std::path::Path,
    tag: &str,
    index: &(String, String),
    single: &(String, String),
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    while let Some(head) = read_head(&mut reader) {
        let blob = |digest: &str| -> Option<Vec<u8>> {
            let hex = digest.strip_prefix("sha256:")?;
            let path: PathBuf = layout.join("blobs/sha256").join(hex);
            std::fs::read(path).ok()
        };
        let found: Option<(String, String, Vec<u8>)> = if head.path == "/v2/" {
            Some(("application/json".into(), String::new(), b"{}".to_vec()))
        } else if let Some(reference) = head.path.split("/manifests/").nth(1) {
            let (media_type, digest) = if reference == tag {
                let accepts_index = head.values("accept").iter().any(|a| {
                    a.starts_with(&index.0)
                        || a.starts_with(
                            "application/vnd.docker.distribution.manifest.list.v2+json",
                        )
                });
                if accepts_index {
                    index.clone()
                } else {
                    single.clone()
                }
            } else {
                let media_type = if reference == index.1 {
                    index.0.clone()
                } else {
                    single.0.clone()
                };
                (media_type, reference.to_owned())
            };
            blob(&digest).map(|bytes| (media_type, digest, bytes))
        } else if let Some(digest) = head.path.split("/blobs/").nth(1) {
            blob(digest).map(|b| ("application/octet-stream".into(), digest.to_owned(), b))
        } else {
            None
        };
        let answer = match found {
            Some((media_type, digest, bytes)) => {
                let mut text = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\n",
                    bytes.len()
                );
                if !digest.is_empty() {
                    text.push_str(&format!("Docker-Content-Digest: {digest}\r\n"));
                }
                text.push_str("\r\n");
                let mut answer = text.into_bytes();
                if head.method != "HEAD" {
                    answer.extend(bytes);
                }
                answer
            }
            None => {
                let body = r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#;
                format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            }
        };
        if out.write_all(&answer).is_err() {
            return;
        }
    }
}
