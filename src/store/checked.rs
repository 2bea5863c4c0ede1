//! Records read from a shared store are input, not truth: anyone who can write to Redis (a
//! bug in another version, an operator's `redis-cli`, an attacker) can put anything there.
//! [`RecordCheck`] parses and checks each one against this node's configuration; a bad
//! record is skipped, counted in `regatta_store_invalid_records_total{kind}` and logged once
//! per key and value, so one bad field never blocks a snapshot, a drain or another org.
//!
//! Architecture invariant: a check never fails the read it is part of; it only drops the
//! record it is about.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};
use serde::de::DeserializeOwned;

use crate::model::{AdminState, HealthKey, HealthRecord, OrgPolicy, RobotRecord, TagRecord};

/// How far another node's clock may run ahead of this one's before a time it wrote counts
/// as being in the future.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Distinct bad records logged at most; past this they are only counted.
const MAX_LOGGED: usize = 4096;

/// A region name as `server.region` allows it, bounded so that regions read from the store
/// keep metric labels few and short.
fn is_region(region: &str) -> bool {
    (1..=64).contains(&region.len())
        && region
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

/// The kinds of shared record, the `kind` label of `regatta_store_invalid_records_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Admin,
    Health,
    Policy,
    Tag,
    Holder,
    Robot,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Admin,
        Kind::Health,
        Kind::Policy,
        Kind::Tag,
        Kind::Holder,
        Kind::Robot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Admin => "admin",
            Kind::Health => "health",
            Kind::Policy => "policy",
            Kind::Tag => "tag",
            Kind::Holder => "holder",
            Kind::Robot => "robot",
        }
    }
}

/// Bounds a record must keep, from this node's configuration.
#[derive(Debug, Clone)]
pub struct RecordLimits {
    /// Backend ids this node has.
    pub backends: Vec<String>,
    /// Longest life of a "holds" / "lacks" fact (`cache.holder_ttl`, `cache.lacks_ttl`).
    pub holder_ttl: Duration,
    pub lacks_ttl: Duration,
    /// Longest life of a shared health record.
    pub health_ttl: Duration,
}

/// A health record as the store keeps it: with the time it stops counting.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Expiring<T> {
    pub record: T,
    pub expires_ms: u64,
}

pub struct RecordCheck {
    limits: RecordLimits,
    invalid: [IntCounter; 6],
    logged: Mutex<HashSet<u64>>,
}

impl RecordCheck {
    /// `invalid` is `regatta_store_invalid_records_total`, labelled by kind.
    pub fn new(limits: RecordLimits, invalid: &IntCounterVec) -> RecordCheck {
        RecordCheck {
            limits,
            invalid: Kind::ALL.map(|k| invalid.with_label_values(&[k.as_str()])),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// Skips a record: counts it, and logs it unless this key already showed this value.
    /// Returns whether it was logged.
    pub fn reject(&self, kind: Kind, key: &str, raw: &[u8], reason: &str) -> bool {
        self.invalid[kind as usize].inc();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (kind, key, raw).hash(&mut hasher);
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            logged.len() < MAX_LOGGED && logged.insert(hasher.finish())
        };
        if first {
            tracing::warn!(
                kind = kind.as_str(),
                key,
                reason,
                value = %String::from_utf8_lossy(&raw[..raw.len().min(200)]),
                "skipping an invalid record in the shared store"
            );
        }
        first
    }

    fn json<T: DeserializeOwned>(&self, kind: Kind, key: &str, raw: &[u8]) -> Option<T> {
        serde_json::from_slice(raw)
            .map_err(|e| self.reject(kind, key, raw, &format!("not a valid record: {e}")))
            .ok()
    }

    fn known_backend(&self, id: &str) -> bool {
        self.limits.backends.iter().any(|b| b == id)
    }

    fn not_ahead(time_ms: u64, now_ms: u64, allowed: Duration) -> bool {
        time_ms <= now_ms.saturating_add((allowed + MAX_CLOCK_SKEW).as_millis() as u64)
    }

    /// An operator's decision about backend `id` (field `id` of `key`).
    pub fn admin(&self, key: &str, id: &str, raw: &[u8]) -> Option<AdminState> {
        let at = format!("{key}/{id}");
        if !self.known_backend(id) {
            self.reject(Kind::Admin, &at, raw, "no backend has this id here");
            return None;
        }
        self.json(Kind::Admin, &at, raw)
    }

    /// A health record, if it is still in force. `field` is `<region>/<backend>`: the region
    /// whose nodes probed the backend. A field without a region was written by a version
    /// that kept one record per backend; it is passed over (it expires within three probe
    /// intervals) without counting as invalid.
    pub fn health(
        &self,
        key: &str,
        field: &str,
        raw: &[u8],
        now_ms: u64,
    ) -> Option<(HealthKey, HealthRecord)> {
        let at = format!("{key}/{field}");
        let (region, id) = field.split_once('/')?;
        if !is_region(region) {
            self.reject(Kind::Health, &at, raw, "the region is not [a-z0-9_-]{1,64}");
            return None;
        }
        if !self.known_backend(id) {
            self.reject(Kind::Health, &at, raw, "no backend has this id here");
            return None;
        }
        let e: Expiring<HealthRecord> = self.json(Kind::Health, &at, raw)?;
        let r = &e.record;
        let problem = if !Self::not_ahead(r.checked_at_ms, now_ms, Duration::ZERO) {
            Some("checked_at_ms lies in the future")
        } else if !Self::not_ahead(e.expires_ms, now_ms, self.limits.health_ttl) {
            Some("expires_ms lies further ahead than a health record lives")
        } else if r.reason.len() > 4096 || r.node.len() > 256 {
            Some("reason or node is too long")
        } else {
            None
        };
        match problem {
            Some(why) => {
                self.reject(Kind::Health, &at, raw, why);
                None
            }
            None => (e.expires_ms > now_ms).then(|| (HealthKey::new(region, id), e.record)),
        }
    }

    /// Org `org`'s policy, if this node can serve it.
    pub fn policy(&self, key: &str, org: &str, raw: &[u8]) -> Option<OrgPolicy> {
        let at = format!("{key}/{org}");
        let policy: OrgPolicy = self.json(Kind::Policy, &at, raw)?;
        let ids: Vec<&str> = self.limits.backends.iter().map(String::as_str).collect();
        let problems = policy.problems(org, &ids);
        if let Some((field, why)) = problems.first() {
            self.reject(Kind::Policy, &at, raw, &format!("{field}: {why}"));
            return None;
        }
        Some(policy)
    }

    /// Robot `name`'s record, if it is well formed and named as its field.
    pub fn robot(&self, key: &str, name: &str, raw: &[u8]) -> Option<RobotRecord> {
        let at = format!("{key}/{name}");
        let robot: RobotRecord = self.json(Kind::Robot, &at, raw)?;
        if robot.name != name {
            self.reject(Kind::Robot, &at, raw, "the record names another robot");
            return None;
        }
        if let Some((field, why)) = robot.problems().first() {
            self.reject(Kind::Robot, &at, raw, &format!("{field}: {why}"));
            return None;
        }
        Some(robot)
    }

    /// A tag record (field `tag` of `key`).
    pub fn tag(&self, key: &str, tag: &str, raw: &[u8], now_ms: u64) -> Option<TagRecord> {
        let at = format!("{key}/{tag}");
        let record: TagRecord = self.json(Kind::Tag, &at, raw)?;
        let problem = if !self.known_backend(&record.backend) {
            Some("backend is not a backend here")
        } else if !Self::not_ahead(record.resolved_at_ms, now_ms, Duration::ZERO) {
            Some("resolved_at_ms lies in the future")
        } else if !is_media_type(&record.media_type) {
            Some("media_type is not a media type")
        } else if record.size == 0 || record.size > crate::upstream::MAX_DOCUMENT_BYTES as u64 {
            Some("size is not the size of a manifest")
        } else {
            None
        };
        match problem {
            Some(why) => {
                self.reject(Kind::Tag, &at, raw, why);
                None
            }
            None => Some(record),
        }
    }

    /// A holder fact's expiry (a sorted-set score): whether it is in force, or `None` when
    /// no fact this node could have written expires that late.
    pub fn holder_until(
        &self,
        key: &str,
        member: &str,
        lacks: bool,
        until_ms: f64,
        now_ms: u64,
    ) -> Option<bool> {
        let ttl = if lacks {
            self.limits.lacks_ttl
        } else {
            self.limits.holder_ttl
        };
        let limit = now_ms.saturating_add((ttl + MAX_CLOCK_SKEW).as_millis() as u64) as f64;
        if until_ms.is_nan() || until_ms > limit {
            self.reject(
                Kind::Holder,
                &format!("{key}/{member}"),
                until_ms.to_string().as_bytes(),
                "expires further ahead than a holder fact lives",
            );
            return None;
        }
        Some(until_ms > now_ms as f64)
    }

    /// Longest life of a holder fact this node writes, clock skew included.
    pub fn longest_holder_fact(&self) -> Duration {
        self.limits.holder_ttl.max(self.limits.lacks_ttl) + MAX_CLOCK_SKEW
    }
}

/// `type/subtype` with RFC 6838 restricted names and no parameters: what may go into a
/// `Content-Type` header unchecked.
pub fn is_media_type(text: &str) -> bool {
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    matches!(text.split_once('/'), Some((t, s)) if name(t) && name(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> (RecordCheck, IntCounterVec) {
        let counter = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["kind"]).unwrap();
        let limits = RecordLimits {
            backends: vec!["hub".into(), "mirror".into()],
            holder_ttl: Duration::from_secs(3600),
            lacks_ttl: Duration::from_secs(30),
            health_ttl: Duration::from_secs(15),
        };
        (RecordCheck::new(limits, &counter), counter)
    }

    const NOW: u64 = 1_800_000_000_000;

    fn count(counter: &IntCounterVec, kind: &str) -> u64 {
        counter.with_label_values(&[kind]).get()
    }

    #[test]
    fn admin_records_name_a_backend_here() {
        let (check, counter) = check();
        let good = check.admin("a", "hub", br#"{"drained":true,"weight":5}"#);
        assert_eq!(
            good,
            Some(AdminState {
                drained: true,
                weight: Some(5)
            })
        );
        assert_eq!(check.admin("a", "ghost", br#"{"drained":true}"#), None);
        assert_eq!(check.admin("a", "hub", br#"{"drained":"yes"}"#), None);
        assert_eq!(check.admin("a", "hub", b"\xff\xfe"), None);
        assert_eq!(count(&counter, "admin"), 3);
    }

    #[test]
    fn health_records_keep_to_the_clock() {
        let (check, counter) = check();
        let record = |checked: u64, expires: u64| {
            format!(
                r#"{{"record":{{"state":"up","latency_us":5,"ok_streak":1,"fail_streak":0,
                "checked_at_ms":{checked},"node":"n"}},"expires_ms":{expires}}}"#
            )
        };
        let fresh = record(NOW - 1000, NOW + 10_000);
        assert!(check.health("h", "eu/hub", fresh.as_bytes(), NOW).is_some());
        let expired = record(NOW - 60_000, NOW - 1);
        assert!(check
            .health("h", "eu/hub", expired.as_bytes(), NOW)
            .is_none());
        assert_eq!(
            count(&counter, "health"),
            0,
            "an expired record is not invalid"
        );
        let ahead = record(NOW + 3_600_000, NOW + 3_610_000);
        assert!(check.health("h", "eu/hub", ahead.as_bytes(), NOW).is_none());
        let forever = record(NOW, u64::MAX);
        assert!(check
            .health("h", "eu/hub", forever.as_bytes(), NOW)
            .is_none());
        // Within the allowed skew.
        let skewed = record(NOW + 4_000, NOW + 19_000);
        assert!(check
            .health("h", "eu/hub", skewed.as_bytes(), NOW)
            .is_some());
        assert_eq!(count(&counter, "health"), 2);
        let (key, _) = check.health("h", "us/hub", fresh.as_bytes(), NOW).unwrap();
        assert_eq!(key, HealthKey::new("us", "hub"));
        assert!(check.health("h", "hub", fresh.as_bytes(), NOW).is_none());
        assert_eq!(
            count(&counter, "health"),
            2,
            "an older version's field is no error"
        );
        assert!(check
            .health("h", "EU!/hub", fresh.as_bytes(), NOW)
            .is_none());
        assert!(check
            .health("h", "eu/ghost", fresh.as_bytes(), NOW)
            .is_none());
        assert_eq!(count(&counter, "health"), 4);
    }

    #[test]
    fn policies_go_through_org_policy_problems() {
        let (check, counter) = check();
        assert!(check
            .policy("p", "acme", br#"{"backends":["hub"]}"#)
            .is_some());
        assert!(check
            .policy("p", "acme", br#"{"backends":["ghost"]}"#)
            .is_none());
        assert!(check
            .policy("p", "Bad Org", br#"{"backends":["hub"]}"#)
            .is_none());
        assert!(check
            .policy("p", "acme", br#"{"backends":["hub"],"x":1}"#)
            .is_none());
        assert_eq!(count(&counter, "policy"), 3);
    }

    #[test]
    fn tag_records_bound_what_reaches_headers() {
        let (check, counter) = check();
        let digest = format!("sha256:{}", "a".repeat(64));
        let record = |media: &str, size: u64, backend: &str, at: u64| {
            serde_json::json!({"digest": digest, "media_type": media, "size": size,
                "backend": backend, "resolved_at_ms": at})
            .to_string()
        };
        let oci = "application/vnd.oci.image.index.v1+json";
        assert!(check
            .tag("t", "1.0", record(oci, 500, "hub", NOW).as_bytes(), NOW)
            .is_some());
        for bad in [
            record(oci, 500, "hub", NOW + 60_000),
            record("text/html\r\nX-Evil: 1", 500, "hub", NOW),
            record(oci, 0, "hub", NOW),
            record(oci, 1 << 40, "hub", NOW),
            record(oci, 500, "ghost", NOW),
            r#"{"digest":"sha256:zz"}"#.to_owned(),
        ] {
            assert!(
                check.tag("t", "1.0", bad.as_bytes(), NOW).is_none(),
                "{bad}"
            );
        }
        assert_eq!(count(&counter, "tag"), 6);
    }

    #[test]
    fn holder_facts_cannot_be_made_to_last() {
        let (check, counter) = check();
        let now = NOW as f64;
        assert_eq!(
            check.holder_until("k", "m", false, now + 1000.0, NOW),
            Some(true)
        );
        assert_eq!(
            check.holder_until("k", "m", true, now - 1.0, NOW),
            Some(false)
        );
        assert_eq!(
            check.holder_until("k", "m", true, now + 3_600_000.0, NOW),
            None
        );
        assert_eq!(
            check.holder_until("k", "m", false, f64::INFINITY, NOW),
            None
        );
        assert_eq!(count(&counter, "holder"), 2);
    }

    #[test]
    fn a_bad_record_is_logged_once_but_counted_every_time() {
        let (check, counter) = check();
        assert!(check.reject(Kind::Admin, "regatta:admin/hub", b"x", "bad"));
        assert!(!check.reject(Kind::Admin, "regatta:admin/hub", b"x", "bad"));
        assert!(
            check.reject(Kind::Admin, "regatta:admin/hub", b"y", "bad"),
            "a new bad value is news"
        );
        assert_eq!(count(&counter, "admin"), 3);
    }

    #[test]
    fn media_types() {
        for good in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        ] {
            assert!(is_media_type(good), "{good}");
        }
        for bad in ["", "json", "a/b/c", "text/html; charset=x", "a/\n", "/x"] {
            assert!(!is_media_type(bad), "{bad:?}");
        }
    }
}
