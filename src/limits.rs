//! Per-client limits on the requests that cost backend round trips (cold lookups: tag
//! resolutions, manifest fetches, blob probes, and the token fetches they bring). Warm
//! answers never reach here. A token bucket per client address, kept in a cache bounded
//! by entries (an address that stops calling is forgotten); trusted networks are exempt.
//!
//! No lock is held across an await: a bucket is a small mutex taken for a few arithmetic
//! operations.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::config::LimitSettings;

/// Clients remembered at most; one bucket is a few dozen bytes.
const CLIENTS: u64 = 100_000;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct ColdLimiter {
    per_second: f64,
    burst: f64,
    trusted: Vec<ipnet::IpNet>,
    buckets: Cache<IpAddr, Arc<Mutex<Bucket>>>,
}

impl ColdLimiter {
    pub fn new(settings: &LimitSettings) -> ColdLimiter {
        ColdLimiter::with_rate(
            f64::from(settings.cold_per_second),
            settings.cold_burst,
            settings,
        )
    }

    /// Failed logins at the token endpoint: `login_failures_per_minute`, `login_failure_burst`
    /// at once (a password guesser is slowed to that rate per address).
    pub fn login_failures(settings: &LimitSettings) -> ColdLimiter {
        ColdLimiter::with_rate(
            f64::from(settings.login_failures_per_minute) / 60.0,
            settings.login_failure_burst,
            settings,
        )
    }

    fn with_rate(per_second: f64, burst: u32, settings: &LimitSettings) -> ColdLimiter {
        ColdLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            trusted: settings.trusted.clone(),
            buckets: Cache::builder()
                .max_capacity(CLIENTS)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }

    /// Whether `client` has any allowance left, without spending it: `Err(wait)` when not.
    pub fn check(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        self.take(client, now, 0.0)
    }

    /// Takes one cold lookup from `client`'s allowance: `Err(wait)` when it has none left,
    /// with how long until it has one again. Unknown clients (no address) and trusted
    /// networks are not limited; a rate of 0 turns limiting off.
    pub fn spend(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        self.take(client, now, 1.0)
    }

    fn take(&self, client: Option<IpAddr>, now: Instant, cost: f64) -> Result<(), Duration> {
        let Some(ip) = client else { return Ok(()) };
        if self.per_second <= 0.0 || self.trusted.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        let burst = self.burst;
        let bucket = self.buckets.get_with(ip, || {
            Arc::new(Mutex::new(Bucket {
                tokens: burst,
                at: now,
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32, trusted: &[&str]) -> ColdLimiter {
        ColdLimiter::new(&LimitSettings {
            cold_per_second: per_second,
            cold_burst: burst,
            trusted: trusted.iter().map(|t| t.parse().unwrap()).collect(),
            ..LimitSettings::default()
        })
    }

    #[test]
    fn failed_logins_are_counted_and_checking_costs_nothing() {
        let l = ColdLimiter::login_failures(&LimitSettings {
            login_failures_per_minute: 6,
            login_failure_burst: 2,
            ..LimitSettings::default()
        });
        let ip = Some("192.0.2.9".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check(ip, t0).is_ok(), "checking spends nothing");
        }
        assert!(l.spend(ip, t0).is_ok());
        assert!(l.spend(ip, t0).is_ok());
        assert_eq!(l.check(ip, t0), Err(Duration::from_secs(10)));
        assert!(l.check(ip, t0 + Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = limiter(2, 3, &[]);
        let ip = Some("192.0.2.1".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.spend(ip, t0).is_ok());
        }
        let wait = l.spend(ip, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(l.spend(ip, t0 + Duration::from_millis(500)).is_ok());
        assert!(l.spend(ip, t0 + Duration::from_millis(500)).is_err());
        // Another client has its own allowance.
        assert!(l.spend(Some("192.0.2.2".parse().unwrap()), t0).is_ok());
    }

    #[test]
    fn trusted_networks_and_a_zero_rate_are_not_limited() {
        let l = limiter(1, 1, &["10.0.0.0/8", "::1/128"]);
        let t0 = Instant::now();
        for ip in ["10.1.2.3", "::1"] {
            for _ in 0..100 {
                assert!(l.spend(Some(ip.parse().unwrap()), t0).is_ok());
            }
        }
        let off = limiter(0, 1, &[]);
        for _ in 0..100 {
            assert!(off.spend(Some("192.0.2.1".parse().unwrap()), t0).is_ok());
        }
    }
}
