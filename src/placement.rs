//! The placement plan: for one request, which of an org's backends to ask, in what order.
//! For a digest: the known holders best first, the backends worth probing before choosing,
//! and those left as a fallback. For a tag: the authorities to ask, in order.
//!
//! Architecture invariant: this module does no I/O and takes no locks. Every route executes
//! a plan made here from one view of the node's state; nothing on the request path walks
//! an org's backends itself. Probing, caching and retries happen around it.

use std::cmp::Ordering;

use crate::model::{BackendIdx, Health, Holding};

/// The facts about one backend that placement weighs.
#[derive(Debug, Clone, Copy)]
pub struct BackendView<'a> {
    pub idx: BackendIdx,
    pub region: &'a str,
    /// The cluster's health verdict (active probes).
    pub health: Health,
    /// This node failed to reach it a moment ago (passive signal).
    pub failing: bool,
    pub drained: bool,
    /// Smoothed latency of recent calls, in microseconds; 0 when nothing is known yet.
    pub latency_us: u32,
    pub weight: u32,
}

/// Why a backend is not in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excluded {
    Drained,
    Down,
    /// Passed over after this node failed to reach it.
    Failing,
    /// Known not to hold the digest.
    Lacks,
}

impl BackendView<'_> {
    fn excluded(&self) -> Option<Excluded> {
        if self.drained {
            Some(Excluded::Drained)
        } else if self.health == Health::Down {
            Some(Excluded::Down)
        } else if self.failing {
            Some(Excluded::Failing)
        } else {
            None
        }
    }
}

/// One backend as a plan saw it: for errors and logs that explain a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessed {
    pub backend: BackendIdx,
    pub holding: Holding,
    pub excluded: Option<Excluded>,
}

/// Where to get one digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DigestPlan {
    /// Backends known to hold the digest, best first.
    pub holders: Vec<BackendIdx>,
    /// Backends not known either way materially better than the best holder (all of them when no
    /// holder is known): ask these before choosing.
    pub probe_first: Vec<BackendIdx>,
    /// The other backends not known either way, best first: asked when every holder fails.
    pub fallback: Vec<BackendIdx>,
    /// Every backend of the org, in policy order, with what the plan knew of it.
    pub assessed: Vec<Assessed>,
    /// The best holder is in the node's region while some holder is elsewhere.
    pub region_chose: bool,
}

impl DigestPlan {
    /// True when every backend of the org is known to lack the digest. A backend the health
    /// checks hold down, of which nothing is known, counts as lacking it once some backend
    /// that answers does: a registry with a replica down answers 404 from the rest (and the
    /// OCI conformance suite asks that). A backend that only failed a moment ago does not.
    pub fn nobody_has_it(&self) -> bool {
        let lacks = |a: &Assessed| a.holding == Holding::Lacks;
        let down_unknown =
            |a: &Assessed| a.holding == Holding::Unknown && a.excluded == Some(Excluded::Down);
        self.assessed.iter().any(lacks) && self.assessed.iter().all(|a| lacks(a) || down_unknown(a))
    }

    /// Every backend the plan would try, in order: probe-first, holders, fallback. Routes
    /// that fetch a document (a GET is as cheap as a HEAD) use this order directly.
    pub fn attempts(&self) -> impl Iterator<Item = BackendIdx> + '_ {
        self.probe_first
            .iter()
            .chain(&self.holders)
            .chain(&self.fallback)
            .copied()
    }
}

/// Latencies within one bucket count as equal, so that noise does not reorder backends.
pub const LATENCY_BUCKET_US: u32 = 5_000;

/// Plans a digest. `views` and `holdings` are parallel, in the org's policy order.
///
/// Backends rank by: weight 0 last, healthy before degraded, the node's region first,
/// faster first, heavier first, then policy order. Known holders are used in that order;
/// an unknown backend materially better than the best holder (see [`worth_probing`]) is probed
/// first: that is how a node finds its own region's copy of a digest learned elsewhere. Drained, down,
/// failing and lacking backends are left out.
pub fn plan_digest(
    node_region: &str,
    views: &[BackendView<'_>],
    holdings: &[Holding],
) -> DigestPlan {
    debug_assert_eq!(views.len(), holdings.len());
    let mut assessed = Vec::with_capacity(views.len());
    let mut usable: Vec<(usize, &BackendView<'_>, Holding)> = Vec::with_capacity(views.len());
    for (pos, (v, &holding)) in views.iter().zip(holdings).enumerate() {
        let excluded = v
            .excluded()
            .or((holding == Holding::Lacks).then_some(Excluded::Lacks));
        assessed.push(Assessed {
            backend: v.idx,
            holding,
            excluded,
        });
        if excluded.is_none() {
            usable.push((pos, v, holding));
        }
    }
    usable.sort_by(|a, b| compare(node_region, (a.0, a.1), (b.0, b.1)));
    let best_holder = usable.iter().find(|(_, _, h)| *h == Holding::Has);
    let mut plan = DigestPlan {
        assessed,
        ..DigestPlan::default()
    };
    for (_, v, holding) in &usable {
        match holding {
            Holding::Has => plan.holders.push(v.idx),
            _ if best_holder.is_none_or(|(_, best, _)| worth_probing(node_region, v, best)) => {
                plan.probe_first.push(v.idx)
            }
            _ => plan.fallback.push(v.idx),
        }
    }
    if let Some((_, best, _)) = best_holder {
        let local = |v: &BackendView<'_>| v.region == node_region;
        plan.region_chose = local(best)
            && usable
                .iter()
                .any(|(_, v, h)| *h == Holding::Has && !local(v));
    }
    plan
}

/// Plans a tag: the authorities to ask, in their configured order, leaving out drained,
/// down and failing ones. `authorities` is in the org's authority order.
pub fn plan_tag(authorities: &[BackendView<'_>]) -> Vec<BackendIdx> {
    authorities
        .iter()
        .filter(|v| v.excluded().is_none())
        .map(|v| v.idx)
        .collect()
}

/// How much faster an unknown backend must be than the best holder to be worth a probe:
/// well past the noise of a probe's latency, so that a lagging mirror a few milliseconds
/// quicker is not asked for every new digest.
pub const PROBE_LATENCY_GAIN_US: u32 = 20_000;

/// Whether unknown backend `v` is materially better than the best holder: not a last
/// resort when the holder is one, healthier, in the node's region when the holder is not,
/// or much faster. Weight and policy order alone only break ties: they are no reason to
/// spend a HEAD.
fn worth_probing(node_region: &str, v: &BackendView<'_>, best: &BackendView<'_>) -> bool {
    let class = |v: &BackendView<'_>| (v.weight == 0, v.health, v.region != node_region);
    match class(v).cmp(&class(best)) {
        Ordering::Less => true,
        Ordering::Greater => false,
        Ordering::Equal => v.latency_us.saturating_add(PROBE_LATENCY_GAIN_US) < best.latency_us,
    }
}

fn compare(
    node_region: &str,
    (a_pos, a): (usize, &BackendView<'_>),
    (b_pos, b): (usize, &BackendView<'_>),
) -> Ordering {
    let key = |v: &BackendView<'_>| {
        (
            v.weight == 0,
            v.health,
            v.region != node_region,
            v.latency_us / LATENCY_BUCKET_US,
        )
    };
    key(a)
        .cmp(&key(b))
        .then(b.weight.cmp(&a.weight))
        .then(a_pos.cmp(&b_pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Holding::*;

    fn view(idx: BackendIdx, region: &'static str) -> BackendView<'static> {
        BackendView {
            idx,
            region,
            health: Health::Up,
            failing: false,
            drained: false,
            latency_us: 0,
            weight: 100,
        }
    }

    fn slow(mut v: BackendView<'static>) -> BackendView<'static> {
        v.latency_us = 80_000;
        v
    }
    fn latency(mut v: BackendView<'static>, us: u32) -> BackendView<'static> {
        v.latency_us = us;
        v
    }
    fn health(mut v: BackendView<'static>, h: Health) -> BackendView<'static> {
        v.health = h;
        v
    }
    fn weight(mut v: BackendView<'static>, w: u32) -> BackendView<'static> {
        v.weight = w;
        v
    }
    fn drained(mut v: BackendView<'static>) -> BackendView<'static> {
        v.drained = true;
        v
    }
    fn failing(mut v: BackendView<'static>) -> BackendView<'static> {
        v.failing = true;
        v
    }

    type Idxs = Vec<BackendIdx>;
    type DigestRow = (
        &'static str,
        Vec<BackendView<'static>>,
        Vec<Holding>,
        (Idxs, Idxs, Idxs),
    );

    /// (holders, probe_first, fallback) for a node in `eu`.
    fn plan(views: &[BackendView<'_>], holdings: &[Holding]) -> (Idxs, Idxs, Idxs) {
        let p = plan_digest("eu", views, holdings);
        (p.holders, p.probe_first, p.fallback)
    }

    #[test]
    fn digest_plan_table() {
        let eu0 = view(0, "eu");
        let eu1 = view(1, "eu");
        let us2 = view(2, "us");
        let us0 = view(0, "us");
        #[rustfmt::skip]
        let table: Vec<DigestRow> = vec![
            ("nothing known: probe all, policy order breaks ties",
                vec![eu0, eu1], vec![Unknown, Unknown], (vec![], vec![0, 1], vec![])),
            ("known holder used; an equal unknown is a fallback",
                vec![eu0, eu1], vec![Has, Unknown], (vec![0], vec![], vec![1])),
            ("policy order alone is no reason to probe",
                vec![eu0, eu1], vec![Unknown, Has], (vec![1], vec![], vec![0])),
            ("weight alone is no reason to probe",
                vec![weight(eu0, 200), eu1], vec![Unknown, Has], (vec![1], vec![], vec![0])),
            ("the node's region is probed before a holder elsewhere",
                vec![us0, eu1], vec![Has, Unknown], (vec![0], vec![1], vec![])),
            ("a holder in the node's region needs no probe",
                vec![us0, eu1], vec![Unknown, Has], (vec![1], vec![], vec![0])),
            ("a backend lacking the digest is never chosen",
                vec![eu0, eu1], vec![Lacks, Unknown], (vec![], vec![1], vec![])),
            ("stale mirror lacking the digest is left out",
                vec![eu0, eu1], vec![Has, Lacks], (vec![0], vec![], vec![])),
            ("same region first among holders",
                vec![us2, eu1], vec![Has, Has], (vec![1, 2], vec![], vec![])),
            ("region beats policy order",
                vec![us2, eu0], vec![Unknown, Unknown], (vec![], vec![0, 2], vec![])),
            ("faster first within a region",
                vec![slow(eu0), eu1], vec![Has, Has], (vec![1, 0], vec![], vec![])),
            ("a much faster unknown is probed before a slow holder",
                vec![slow(eu0), eu1], vec![Has, Unknown], (vec![0], vec![1], vec![])),
            ("a few milliseconds faster is no reason to probe",
                vec![latency(eu0, 9_000), latency(eu1, 2_000)], vec![Has, Unknown], (vec![0], vec![], vec![1])),
            ("region beats latency",
                vec![slow(eu0), us2], vec![Has, Has], (vec![0, 2], vec![], vec![])),
            ("healthy before degraded",
                vec![health(eu0, Health::Degraded), eu1], vec![Has, Has], (vec![1, 0], vec![], vec![])),
            ("a healthy unknown is probed before a degraded holder",
                vec![health(eu0, Health::Degraded), us2], vec![Has, Unknown], (vec![0], vec![2], vec![])),
            ("down is left out",
                vec![health(eu0, Health::Down), eu1], vec![Has, Unknown], (vec![], vec![1], vec![])),
            ("drained is left out",
                vec![drained(eu0), eu1], vec![Has, Has], (vec![1], vec![], vec![])),
            ("failing a moment ago is left out",
                vec![failing(eu0), eu1], vec![Has, Has], (vec![1], vec![], vec![])),
            ("heavier first",
                vec![weight(eu0, 10), weight(eu1, 50)], vec![Has, Has], (vec![1, 0], vec![], vec![])),
            ("weight 0 only as a last resort",
                vec![weight(eu0, 0), us2], vec![Has, Has], (vec![2, 0], vec![], vec![])),
            ("weight 0 is not probed before a holder",
                vec![weight(eu0, 0), us2], vec![Unknown, Has], (vec![2], vec![], vec![0])),
            ("nothing can serve",
                vec![drained(eu0), eu1], vec![Has, Lacks], (vec![], vec![], vec![])),
        ];
        for (name, views, holdings, want) in table {
            assert_eq!(plan(&views, &holdings), want, "{name}");
        }
    }

    #[test]
    fn the_plan_explains_itself() {
        let p = plan_digest(
            "eu",
            &[drained(view(0, "eu")), view(1, "eu"), view(2, "us")],
            &[Has, Lacks, Unknown],
        );
        assert_eq!(
            p.assessed,
            vec![
                Assessed {
                    backend: 0,
                    holding: Has,
                    excluded: Some(Excluded::Drained)
                },
                Assessed {
                    backend: 1,
                    holding: Lacks,
                    excluded: Some(Excluded::Lacks)
                },
                Assessed {
                    backend: 2,
                    holding: Unknown,
                    excluded: None
                },
            ]
        );
        assert!(!p.nobody_has_it());
        let none = plan_digest("eu", &[view(0, "eu")], &[Lacks]);
        assert!(none.nobody_has_it());
        let down = health(view(0, "eu"), Health::Down);
        let rest_lacks = plan_digest("eu", &[down, view(1, "eu")], &[Unknown, Lacks]);
        assert!(
            rest_lacks.nobody_has_it(),
            "a down backend keeps nothing maybe-there"
        );
        let down_holds = plan_digest("eu", &[down, view(1, "eu")], &[Has, Lacks]);
        assert!(
            !down_holds.nobody_has_it(),
            "known to be on the down backend"
        );
        let only_down = plan_digest("eu", &[down], &[Unknown]);
        assert!(!only_down.nobody_has_it(), "no backend answered");
        let blip = plan_digest(
            "eu",
            &[failing(view(0, "eu")), view(1, "eu")],
            &[Unknown, Lacks],
        );
        assert!(
            !blip.nobody_has_it(),
            "failing a moment ago may still hold it"
        );
        assert_eq!(p.attempts().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn region_is_the_reason_only_when_holders_are_elsewhere_too() {
        let both = plan_digest("eu", &[view(0, "us"), view(1, "eu")], &[Has, Has]);
        assert!(both.region_chose);
        let local_only = plan_digest("eu", &[view(0, "eu"), view(1, "eu")], &[Has, Has]);
        assert!(!local_only.region_chose);
        let far_only = plan_digest("eu", &[view(0, "us")], &[Has]);
        assert!(!far_only.region_chose);
    }

    #[test]
    fn tag_plan_table() {
        let a = view(0, "us");
        let b = view(1, "eu");
        let c = view(2, "eu");
        #[rustfmt::skip]
        let table: Vec<(&str, Vec<BackendView<'static>>, Idxs)> = vec![
            ("authority order, not region or latency", vec![a, slow(b), c], vec![0, 1, 2]),
            ("drained authority skipped", vec![drained(a), b], vec![1]),
            ("down authority skipped", vec![health(a, Health::Down), b], vec![1]),
            ("degraded authority still asked in order", vec![health(a, Health::Degraded), b], vec![0, 1]),
            ("failing authority skipped", vec![failing(a), b], vec![1]),
            ("weight does not reorder authorities", vec![weight(a, 0), b], vec![0, 1]),
            ("none left", vec![drained(a), health(b, Health::Down)], vec![]),
        ];
        for (name, views, want) in table {
            assert_eq!(plan_tag(&views), want, "{name}");
        }
    }
}
