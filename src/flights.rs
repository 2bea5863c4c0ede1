//! Identical cold lookups made at the same time (the same tag resolution, manifest fetch,
//! blob probe or backend token) go to the backends once: the first caller leads and does the work; the
//! others wait for it to finish, then find what it learned in the caches. A follower waits
//! at most once: if the leader learned nothing (it failed, or its request was cancelled),
//! the follower does the work itself rather than queueing behind another leader.
//!
//! No lock is held across an await: the map is touched only to join and to leave.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

#[derive(Default)]
pub struct Flights {
    inflight: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// Held by the caller doing the work; dropping it (done, failed or cancelled) wakes the
/// followers.
pub struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.flights.inflight.lock() {
            map.remove(&self.key);
        }
    }
}

impl Flights {
    /// `Some(leader)` when nobody is doing `key` now: do the work while holding it.
    /// `None` after waiting for the caller who was: look in the caches again.
    pub async fn join(&self, key: String) -> Option<Leader<'_>> {
        let mut waiting = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(());
                    map.insert(key.clone(), rx);
                    return Some(Leader {
                        flights: self,
                        key,
                        _done: tx,
                    });
                }
            }
        };
        // The leader never sends: the channel closes when it is done.
        while waiting.changed().await.is_ok() {}
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_caller_works_and_the_others_wait_for_it() {
        let flights = Flights::default();
        let work = AtomicUsize::new(0);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let leader = async {
            let lead = flights.join("k".into()).await;
            assert!(lead.is_some());
            work.fetch_add(1, Ordering::SeqCst);
            let _ = released.await;
            drop(lead);
        };
        let followers = async {
            tokio::task::yield_now().await;
            let waits = (0..10).map(|_| async {
                let lead = flights.join("k".into()).await;
                assert!(
                    lead.is_none(),
                    "a follower never leads while the leader works"
                );
                assert_eq!(work.load(Ordering::SeqCst), 1);
            });
            let all = futures_util::future::join_all(waits);
            let releaser = async {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                let _ = release.send(());
            };
            tokio::join!(all, releaser);
        };
        tokio::join!(leader, followers);
        assert!(
            flights.join("k".into()).await.is_some(),
            "done keys are free again"
        );
    }
}
