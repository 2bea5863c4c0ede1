//! A backend that answers and then stalls: `/v2/` and HEADs are answered at once (so it
//! looks healthy and seems to hold everything), every other GET gets its response head and
//! then not one byte of the body. It counts the stalled answers and how many of those
//! connections the gateway closed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Stall {
    pub port: u16,
    stalled: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Stall {
    pub fn start() -> Stall {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (s, c) = (stalled.clone(), closed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, c) = (s.clone(), c.clone());
                std::thread::spawn(move || serve(stream, &s, &c));
            }
        });
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

fn serve(stream: TcpStream, stalled: &AtomicUsize, closed: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        // The rest of the head.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let answer = if path == "/v2/" {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        } else if method == "HEAD" {
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
