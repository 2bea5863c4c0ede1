//! Active health checks. Every interval, for each backend, one node of each region (the
//! one that wins that region's probe lease) asks the backend's `/v2/` and fetches its canary blob through the real delivery
//! path (a healthy API in front of a broken CDN is still a broken backend), folds the result
//! into the shared record with hysteresis, and announces state changes to every node.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};

use crate::config::HealthSettings;
use crate::gateway::{Detected, Gateway};
use crate::model::{unix_ms, Delivery, Health, HealthKey, HealthRecord};
use crate::store::EVENT_RESYNC;
use crate::topology::{Backend, Credentials};
use crate::upstream::{header_str, Call, Upstream};

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Ok { latency_us: u32 },
    Failed { reason: String },
}

/// Folds a probe into the previous record: `fall` consecutive failures take a backend
/// down, `rise` consecutive successes bring it back; a failure short of `fall`, or a slow
/// answer, makes it degraded. Pure, so the thresholds can be tested as a table.
pub fn fold(
    previous: Option<&HealthRecord>,
    probe: &Probe,
    settings: &HealthSettings,
    node: &str,
    now_ms: u64,
) -> HealthRecord {
    let (state, ok_streak, fail_streak, ewma) = match previous {
        Some(p) => (p.state, p.ok_streak, p.fail_streak, p.latency_us),
        None => (Health::Up, 0, 0, 0),
    };
    let slow = settings.degraded_latency.as_micros() as u32;
    match probe {
        Probe::Ok { latency_us } => {
            let ok_streak = ok_streak.saturating_add(1);
            let latency = if ewma == 0 {
                *latency_us
            } else {
                (ewma as u64 * 7 / 10 + *latency_us as u64 * 3 / 10) as u32
            };
            let next = if state == Health::Down && ok_streak < settings.rise {
                Health::Down
            } else if latency > slow {
                Health::Degraded
            } else {
                Health::Up
            };
            HealthRecord {
                state: next,
                latency_us: latency,
                ok_streak,
                fail_streak: 0,
                checked_at_ms: now_ms,
                reason: String::new(),
                node: node.to_owned(),
            }
        }
        Probe::Failed { reason } => {
            let fail_streak = fail_streak.saturating_add(1);
            // Down stays down until `rise` successes; up falls after `fall` failures.
            let next = if fail_streak >= settings.fall || state == Health::Down {
                Health::Down
            } else {
                Health::Degraded
            };
            HealthRecord {
                state: next,
                latency_us: ewma,
                ok_streak: 0,
                fail_streak,
                checked_at_ms: now_ms,
                reason: reason.clone(),
                node: node.to_owned(),
            }
        }
    }
}

/// Probes every backend each interval (when this node holds its lease) until the process ends.
pub async fn run_prober(gw: Arc<Gateway>, up: Upstream, settings: HealthSettings, node: String) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let probes = gw
            .topology
            .backends
            .iter()
            .map(|b| probe_backend(&gw, &up, b, &settings, &node));
        futures_util::future::join_all(probes).await;
    }
}

async fn probe_backend(
    gw: &Gateway,
    up: &Upstream,
    backend: &Backend,
    settings: &HealthSettings,
    node: &str,
) {
    // One probe per (region, backend): a backend reachable from one region may not be
    // from another, so each region keeps its own view.
    let region = &gw.topology.region;
    let lease = format!("probe:{region}:{}", backend.id);
    match gw.store.try_lease(&lease, node, settings.interval).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            // No store, no lease: every node probes for itself and keeps the result local.
            tracing::debug!(error = %e, "probe lease unavailable");
        }
    }
    let timer = gw
        .metrics
        .probe_seconds
        .with_label_values(&[&backend.id])
        .start_timer();
    let probe = match tokio::time::timeout(settings.timeout, probe(gw, up, backend)).await {
        Ok(p) => p,
        Err(_) => Probe::Failed {
            reason: format!("no answer within {:?}", settings.timeout),
        },
    };
    timer.observe_duration();
    if matches!(probe, Probe::Failed { .. }) {
        gw.metrics
            .probe_failures
            .with_label_values(&[&backend.id])
            .inc();
    }
    // Hysteresis continues this region's record, never another region's.
    let previous = gw.state.load().backends[backend.idx]
        .views
        .iter()
        .find(|(r, _)| r == region)
        .map(|(_, record)| record.clone());
    let record = fold(
        previous.as_ref(),
        &probe,
        settings,
        node,
        unix_ms(SystemTime::now()),
    );
    let changed = previous.as_ref().map(|p| p.state) != Some(record.state);
    if changed {
        tracing::warn!(backend = &*backend.id, region = %region, from = ?previous.as_ref().map(|p| p.state), to = ?record.state, reason = %record.reason, "backend health changed");
    }
    if let Err(e) = gw
        .store
        .set_health(
            &HealthKey::new(region, &backend.id),
            &record,
            settings.interval * 3,
        )
        .await
    {
        tracing::debug!(error = %e, "cannot share a health record");
    }
    if changed {
        if let Err(e) = gw.store.publish(EVENT_RESYNC).await {
            tracing::debug!(error = %e, "cannot announce a health change");
        }
    }
    gw.state.apply_health(backend.idx, region, record);
}

/// The API answer, then the canary through the delivery path clients would take.
async fn probe(gw: &Gateway, up: &Upstream, backend: &Backend) -> Probe {
    let started = Instant::now();
    let call = Call::new(Method::GET, "/v2/".into(), None);
    let latency_us = match up.send_anonymous(backend, &call).await {
        Ok(mut r) if r.status() == StatusCode::OK || r.status() == StatusCode::UNAUTHORIZED => {
            let latency_us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
            // Read to the end, so that the connection is kept for the next probe: the
            // latency measured is then a request's on a kept connection, as the workers'
            // requests are, not a connect's (which varied enough to reorder backends).
            crate::upstream::finish(&mut r).await;
            latency_us
        }
        Ok(r) => {
            return Probe::Failed {
                reason: format!("/v2/ answered {}", r.status()),
            }
        }
        Err(e) => {
            return Probe::Failed {
                reason: e.to_string(),
            }
        }
    };
    if let Some((repo, digest)) = &backend.canary {
        if let Err(reason) = fetch_canary(gw, up, backend, repo, digest).await {
            return Probe::Failed {
                reason: format!("canary {repo}@{digest}: {reason}"),
            };
        }
    }
    Probe::Ok { latency_us }
}

/// Fetches the first byte of the canary blob the way a client would get it.
async fn fetch_canary(
    gw: &Gateway,
    up: &Upstream,
    backend: &Backend,
    repo: &str,
    digest: &str,
) -> Result<(), String> {
    let anonymous = match gw.knowledge.delivery(backend.delivery, backend.idx) {
        Some(Delivery::Direct) => true,
        Some(_) => false,
        None => {
            backend.credentials == Credentials::Anonymous
                && gw.knowledge.detected(backend.idx) == Detected::Anonymous
        }
    };
    let mut call = Call::new(
        Method::GET,
        format!("/v2/{repo}/blobs/{digest}"),
        Some(repo),
    );
    call.raw = true;
    call = call.header(header::RANGE, HeaderValue::from_static("bytes=0-0"));
    let response = if anonymous {
        up.send_anonymous(backend, &call).await
    } else {
        up.send(backend, &call).await
    }
    .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    if !status.is_redirection() {
        return Err(format!("blob answered {status}"));
    }
    let location =
        header_str(response.headers(), header::LOCATION).ok_or("redirect without Location")?;
    let base = url::Url::parse(&format!("{}/", backend.base)).map_err(|e| e.to_string())?;
    let target = base.join(location).map_err(|e| e.to_string())?;
    let redirected = up
        .get_absolute(backend, target.as_str())
        .insert_header((header::RANGE, "bytes=0-0"))
        .send()
        .await
        .map_err(|e| format!("redirect target {}: {e}", target.host_str().unwrap_or("")))?;
    if redirected.status().is_success() {
        Ok(())
    } else {
        Err(format!("redirect target answered {}", redirected.status()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            degraded_latency: Duration::from_millis(500),
        }
    }

    fn run(probes: &[Probe]) -> Vec<Health> {
        let mut record: Option<HealthRecord> = None;
        probes
            .iter()
            .map(|p| {
                let next = fold(record.as_ref(), p, &settings(), "n1", 0);
                let state = next.state;
                record = Some(next);
                state
            })
            .collect()
    }

    #[test]
    fn hysteresis_table() {
        let ok = Probe::Ok { latency_us: 1_000 };
        let slow = Probe::Ok {
            latency_us: 900_000,
        };
        let bad = Probe::Failed {
            reason: "refused".into(),
        };
        use Health::*;
        #[rustfmt::skip]
        let table: Vec<(&str, Vec<Probe>, Vec<Health>)> = vec![
            ("healthy stays up", vec![ok.clone(), ok.clone()], vec![Up, Up]),
            ("one failure degrades, not downs", vec![ok.clone(), bad.clone(), ok.clone()], vec![Up, Degraded, Up]),
            ("fall=3 failures take it down", vec![bad.clone(), bad.clone(), bad.clone()], vec![Degraded, Degraded, Down]),
            ("rise=2 successes bring it back", vec![bad.clone(), bad.clone(), bad.clone(), ok.clone(), ok.clone()], vec![Degraded, Degraded, Down, Down, Up]),
            ("a failure while down resets the rise", vec![bad.clone(), bad.clone(), bad.clone(), ok.clone(), bad.clone(), ok.clone(), ok.clone()], vec![Degraded, Degraded, Down, Down, Down, Down, Up]),
            ("slow answers degrade", vec![slow.clone(), slow.clone()], vec![Degraded, Degraded]),
        ];
        for (name, probes, want) in table {
            assert_eq!(run(&probes), want, "{name}");
        }
    }

    #[test]
    fn latency_is_smoothed() {
        let first = fold(None, &Probe::Ok { latency_us: 1000 }, &settings(), "n", 0);
        let second = fold(
            Some(&first),
            &Probe::Ok { latency_us: 2000 },
            &settings(),
            "n",
            0,
        );
        assert_eq!(second.latency_us, 1300);
    }
}
