//! The agents' certificates, seen from the operator: each reconcile of a running VM, and each guarded unplug, asks
//! the agent for the certificate it serves (`GetAgentInfo`), and one that expires within
//! `--agent-cert-warning-days` is shown as a gauge and, at most once a day per VM, a Warning Event, so that a
//! guest's certificate is renewed before the operator (and the guard) can no longer reach its agent.

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wukong_controller_client::agent_client::AgentClient;

/// The same VM is warned about again only after this long, however often it is reconciled.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

/// What to say about a certificate that stops being valid at `not_after` (Unix seconds), seen at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// Valid for longer than the threshold (or the agent serves no TLS: `not_after` 0).
    Fine,
    /// Expires within the threshold: the seconds left (negative once expired).
    Soon(i64),
}

pub fn assess(not_after: i64, now: i64, threshold: Duration) -> Expiry {
    let left = not_after - now;
    match not_after != 0 && left <= threshold.as_secs() as i64 {
        true => Expiry::Soon(left),
        false => Expiry::Fine,
    }
}

/// The sentence of the Event and the log.
pub fn warning(namespace: &str, vm: &str, subject: &str, left: i64) -> String {
    let when = match left {
        ..0 => format!("expired {} days ago", -left / 86400),
        _ => format!("expires in {} days ({} hours)", left / 86400, left / 3600),
    };
    format!(
        "the agent of VM {namespace}/{vm} serves a certificate ({subject}) that {when}: issue a new one (`wukongctl \
         pki renew`) and replace the guest's tls_cert and tls_key files; the agent uses them without a restart"
    )
}

/// When each VM was last warned about, so that a VM reconciled every few seconds is not an Event storm.
#[derive(Default)]
pub struct Warned(Mutex<HashMap<(String, String), Instant>>);

impl Warned {
    /// Whether to warn about `namespace/vm` now (and, if so, remember that it was).
    pub fn due(&self, namespace: &str, vm: &str, now: Instant) -> bool {
        let mut warned = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (namespace.to_string(), vm.to_string());
        match warned.get(&key) {
            Some(at) if now.duration_since(*at) < WARN_EVERY => false,
            _ => {
                warned.insert(key, now);
                true
            }
        }
    }

    /// Forgets a VM whose certificate is fine again: its next expiry is warned about at once.
    pub fn clear(&self, namespace: &str, vm: &str) {
        let mut warned = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        warned.remove(&(namespace.to_string(), vm.to_string()));
    }
}

/// The check the reconciler and the guard share, so that a VM is warned about once a day whoever asked.
pub struct CertificateCheck {
    threshold: Duration,
    warned: Warned,
    metrics: Arc<Metrics>,
}

impl CertificateCheck {
    pub fn new(threshold: Duration, metrics: Arc<Metrics>) -> Self {
        Self { threshold, warned: Warned::default(), metrics }
    }

    /// Asks the agent of `namespace/vm` which certificate it serves and updates the gauge; the Warning Event's
    /// sentence when one is due. An agent that cannot be asked is left to the steps that need it.
    pub async fn check(&self, agent: &AgentClient, namespace: &str, vm: &str) -> Option<String> {
        let info = match agent.agent_info().await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(vm = %format!("{namespace}/{vm}"), error = %e, "cannot ask the agent for its certificate");
                return None;
            }
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        match assess(info.certificate_not_after, now, self.threshold) {
            Expiry::Fine => {
                self.metrics.agent_certificate_expiry(namespace, vm, None);
                self.warned.clear(namespace, vm);
                None
            }
            Expiry::Soon(left) => {
                self.metrics.agent_certificate_expiry(namespace, vm, Some(info.certificate_not_after));
                self.warned
                    .due(namespace, vm, Instant::now())
                    .then(|| warning(namespace, vm, &info.certificate_subject, left))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;

    #[test]
    fn only_a_certificate_within_the_threshold_is_expiring() {
        let threshold = Duration::from_secs(30 * DAY as u64);
        let now = 1_800_000_000;
        assert_eq!(assess(now + 31 * DAY, now, threshold), Expiry::Fine);
        assert_eq!(assess(now + 30 * DAY, now, threshold), Expiry::Soon(30 * DAY));
        assert_eq!(assess(now + 3600, now, threshold), Expiry::Soon(3600));
        assert_eq!(assess(now - DAY, now, threshold), Expiry::Soon(-DAY), "an expired one too");
        assert_eq!(assess(0, now, threshold), Expiry::Fine, "no TLS, no certificate to renew");
    }

    #[test]
    fn a_vm_is_warned_about_once_a_day_and_at_once_after_it_was_fine() {
        let warned = Warned::default();
        let start = Instant::now();
        assert!(warned.due("ns", "vm", start));
        assert!(!warned.due("ns", "vm", start + Duration::from_secs(3600)));
        assert!(warned.due("ns", "other", start + Duration::from_secs(3600)), "per VM");
        assert!(warned.due("ns", "vm", start + WARN_EVERY));
        warned.clear("ns", "vm");
        assert!(warned.due("ns", "vm", start + WARN_EVERY + Duration::from_secs(1)));
    }

    #[test]
    fn the_warning_says_when_and_what_to_do() {
        let text = warning("prod", "db", "CN=wukong-agent", 10 * DAY + 5);
        assert!(
            text.starts_with("the agent of VM prod/db serves a certificate (CN=wukong-agent) that expires in 10 days")
        );
        assert!(text.contains("wukongctl pki renew"), "{text}");
        assert!(warning("prod", "db", "CN=x", -2 * DAY).contains("expired 2 days ago"));
    }
}
