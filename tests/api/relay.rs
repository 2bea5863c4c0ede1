//! A TCP relay in front of a backend, standing in for a slow link: bytes toward the client
//! flow at a fixed rate and are counted, and `cut()` drops every connection and refuses new
//! ones, as a backend stopped in the middle of a transfer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct SlowLink {
    pub port: u16,
    relayed: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

const CHUNK: usize = 16 * 1024;
const TICK: Duration = Duration::from_millis(50);

impl SlowLink {
    /// Relays 127.0.0.1:`port` to 127.0.0.1:`target`, `bytes_per_second` toward the client.
    pub fn start(target: u16, bytes_per_second: u64) -> SlowLink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let relayed = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (r, c, a) = (relayed.clone(), cut.clone(), accepted.clone());
        std::thread::spawn(move || {
            // Dropping the listener when cut refuses every later connection.
            while !c.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let Ok(backend) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        client.set_nonblocking(false).unwrap();
                        pipe(
                            client.try_clone().unwrap(),
                            backend.try_clone().unwrap(),
                            None,
                            &c,
                        );
                        pipe(backend, client, Some((bytes_per_second, r.clone())), &c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        SlowLink {
            port,
            relayed,
            accepted,
            cut,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Bytes sent toward clients so far.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::SeqCst)
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copies `from` to `to` on a thread until either side closes or the link is cut; with a
/// rate, at most `rate` bytes per second, counted.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    rate: Option<(u64, Arc<AtomicU64>)>,
    cut: &Arc<AtomicBool>,
) {
    let cut = cut.clone();
    std::thread::spawn(move || {
        from.set_read_timeout(Some(TICK)).unwrap();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut buf = vec![0u8; CHUNK];
        while !cut.load(Ordering::SeqCst) {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            if let Some((bytes_per_second, counter)) = &rate {
                // Wait until this chunk fits the rate, waking to notice a cut.
                let due =
                    Duration::from_secs_f64((sent + n as u64) as f64 / *bytes_per_second as f64);
                while started.elapsed() < due && !cut.load(Ordering::SeqCst) {
                    std::thread::sleep(TICK.min(due.saturating_sub(started.elapsed())));
                }
                if cut.load(Ordering::SeqCst) {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::SeqCst);
            }
            sent += n as u64;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
