//! Whether this node should receive traffic: `/readyz` answers from here. A node is taken
//! out of rotation (a load balancer's health check, or the BGP announcement of an anycast
//! address) by an operator's node drain, by a drain file a sidecar creates, or by the
//! start of a shutdown; it keeps serving what still reaches it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Readiness {
    pub node_id: String,
    drained: AtomicBool,
    stopping: AtomicBool,
    drain_file: Option<PathBuf>,
}

impl Readiness {
    pub fn new(node_id: String, drain_file: Option<PathBuf>) -> Readiness {
        Readiness {
            node_id,
            drained: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            drain_file,
        }
    }

    /// Why the node should not receive traffic now; `None` when it should.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.stopping.load(Ordering::Acquire) {
            Some("shutting down")
        } else if self.drained.load(Ordering::Acquire) {
            Some("drained by an operator")
        } else if self.drain_file.as_ref().is_some_and(|f| f.exists()) {
            Some("drain file present")
        } else {
            None
        }
    }

    /// An operator's node drain (this node only); returns whether it changed.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::AcqRel) != drained
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn drain_file(&self) -> Option<&std::path::Path> {
        self.drain_file.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_takes_the_node_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("drain");
        let r = Readiness::new("n".into(), Some(file.clone()));
        assert_eq!(r.not_ready(), None);
        std::fs::write(&file, "").unwrap();
        assert_eq!(r.not_ready(), Some("drain file present"));
        std::fs::remove_file(&file).unwrap();
        assert!(r.set_drained(true));
        assert!(!r.set_drained(true), "no change the second time");
        assert_eq!(r.not_ready(), Some("drained by an operator"));
        r.begin_shutdown();
        assert_eq!(r.not_ready(), Some("shutting down"));
    }
}
