//! The operator's Prometheus metrics, in a registry owned by the context (no global): reconciles, failures by
//! reason (never by object: label values stay bounded), detach durations and the disks whose detach is blocked.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    reconcile_seconds: Histogram,
    failures: Family<Labels, Counter>,
    detach_seconds: Histogram,
    blocked: Gauge,
    reviews: Family<Labels, Counter>,
    review_seconds: Histogram,
    untrusted: Counter,
    watch_passes: Family<Labels, Counter>,
    given_back: Counter,
    watch_errors: Family<Labels, Counter>,
    pending_releases: Gauge,
    /// Per VM (only those whose agent's certificate expires soon, so the label set stays small).
    agent_certificate_expiry: Family<Vec<(&'static str, String)>, Gauge>,
    /// Blocked disks per object UID; the gauge is their sum.
    blocked_by_object: Mutex<HashMap<String, i64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wukong_operator");
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles of Wukong objects", reconciles.clone());
        // 1 ms to about 30 s: a pass that only reads takes milliseconds, one that waits for a guest seconds.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("reconcile_duration_seconds", "How long one reconcile took", reconcile_seconds.clone());
        let failures = Family::<Labels, Counter>::default();
        registry.register("reconcile_failures", "Reconciles that failed, by reason", failures.clone());
        // 0.5 s to about 17 min: a release takes seconds, a blocked disk can wait minutes.
        let detach_seconds = Histogram::new(exponential_buckets(0.5, 2.0, 12));
        registry.register(
            "detach_duration_seconds",
            "From a disk's removal from spec.disks to its detach",
            detach_seconds.clone(),
        );
        let blocked = Gauge::default();
        registry.register(
            "blocked_disks",
            "Disks whose detach the guest refused or could not be asked",
            blocked.clone(),
        );
        let reviews = Family::<Labels, Counter>::default();
        registry.register("admission_reviews", "Admission reviews answered by the guard, by verdict", reviews.clone());
        // 0.25 ms to about 32 s: a review that asks no guest takes well under a millisecond, a release seconds.
        let review_seconds = Histogram::new(exponential_buckets(0.00025, 2.0, 18));
        registry.register(
            "admission_duration_seconds",
            "How long the guard took to answer a review",
            review_seconds.clone(),
        );
        let untrusted = Counter::default();
        registry.register(
            "admission_untrusted_refused",
            "Reviews or callers refused because they did not come from the API server or do not match the live objects",
            untrusted.clone(),
        );
        let watch_passes = Family::<Labels, Counter>::default();
        registry.register(
            "guard_release_watch_passes",
            "Passes of the guard's loop-closer over released disks, by outcome",
            watch_passes.clone(),
        );
        let given_back = Counter::default();
        registry.register(
            "guard_releases_given_back",
            "Released disks given back to their guest because no unplug followed",
            given_back.clone(),
        );
        let watch_errors = Family::<Labels, Counter>::default();
        registry.register(
            "guard_release_watch_errors",
            "Objects the loop-closer could not look at in a pass, by reason",
            watch_errors.clone(),
        );
        let pending_releases = Gauge::default();
        registry.register(
            "guard_pending_releases",
            "Releases the guard recorded whose update or give-back has not been seen yet",
            pending_releases.clone(),
        );
        let agent_certificate_expiry = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "agent_certificate_expiry_timestamp_seconds",
            "When the certificate a VM's agent serves expires (Unix time), for agents within the warning threshold",
            agent_certificate_expiry.clone(),
        );
        Self {
            registry,
            agent_certificate_expiry,
            untrusted,
            watch_passes,
            given_back,
            watch_errors,
            pending_releases,
            reconciles,
            reconcile_seconds,
            failures,
            detach_seconds,
            blocked,
            reviews,
            review_seconds,
            blocked_by_object: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn failed(&self, reason: &'static str) {
        self.failures.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn reviewed(&self, allowed: bool, took: Duration) {
        let verdict = if allowed { "allowed" } else { "denied" };
        self.reviews.get_or_create(&vec![("verdict", verdict)]).inc();
        self.review_seconds.observe(took.as_secs_f64());
    }

    /// The expiry of `namespace/vm`'s agent certificate when it is soon (`Some`), or its series removed.
    pub fn agent_certificate_expiry(&self, namespace: &str, vm: &str, not_after: Option<i64>) {
        let labels = vec![("namespace", namespace.to_string()), ("vm", vm.to_string())];
        match not_after {
            Some(not_after) => {
                self.agent_certificate_expiry.get_or_create(&labels).set(not_after);
            }
            None => {
                self.agent_certificate_expiry.remove(&labels);
            }
        }
    }

    pub fn untrusted_review_refused(&self) {
        self.untrusted.inc();
    }

    /// One pass of the loop-closer: whether it could list what it looks at, and how many releases are pending.
    pub fn release_watch_pass(&self, listed: bool, pending: usize) {
        let outcome = if listed { "complete" } else { "failed" };
        self.watch_passes.get_or_create(&vec![("outcome", outcome)]).inc();
        if listed {
            self.pending_releases.set(pending as i64);
        }
    }

    pub fn release_given_back(&self) {
        self.given_back.inc();
    }

    pub fn release_watch_error(&self, reason: &'static str) {
        self.watch_errors.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn detached(&self, after: Duration) {
        self.detach_seconds.observe(after.as_secs_f64());
    }

    /// The number of blocked disks of one object (0 when it is deleted).
    pub fn set_blocked(&self, uid: &str, disks: usize) {
        let mut by_object = self.blocked_by_object.lock().expect("the metrics lock is never poisoned");
        match disks {
            0 => by_object.remove(uid),
            n => by_object.insert(uid.to_string(), n as i64),
        };
        self.blocked.set(by_object.values().sum());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_metric_with_bounded_labels() {
        let metrics = Metrics::default();
        metrics.reconciled(Duration::from_millis(3));
        metrics.failed("kubernetes_api");
        metrics.failed("kubernetes_api");
        metrics.detached(Duration::from_secs(3));
        metrics.set_blocked("uid-1", 2);
        metrics.set_blocked("uid-2", 1);
        metrics.set_blocked("uid-1", 0);
        let text = metrics.render();
        for line in [
            "wukong_operator_reconciles_total 1",
            "wukong_operator_reconcile_duration_seconds_bucket{le=\"0.004\"} 1",
            "wukong_operator_reconcile_failures_total{reason=\"kubernetes_api\"} 2",
            "wukong_operator_detach_duration_seconds_count 1",
            "wukong_operator_blocked_disks 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("uid-"), "object identities must not become labels:\n{text}");
    }
}
