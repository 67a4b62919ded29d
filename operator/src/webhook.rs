//! The admission guard's HTTPS endpoint (`POST /validate`, AdmissionReview v1): every replica serves it, leader or
//! not. A review is planned by [`crate::guard`]; a removal is carried out here by asking the guest's agent, and the
//! update is allowed only if the guest released the disk in that call (the fence: nothing in the guest can touch
//! the disk any more, so the unplug that follows the stored update is safe). The serving certificate is read from
//! a directory (`tls.crt`, `tls.key`, as a mounted Secret) and read again when the files change.
//!
//! Nothing reaches a guest on a caller's word alone. With a client CA (`--webhook-client-ca`), only a caller with
//! the API server's client certificate gets a review answered; without one, every release is first checked against
//! the live objects ([`crate::verify`]). Every release is recorded in the cluster ([`crate::ledger`]) before the
//! guest is asked, and given back at once when the review ends in a denial.

use crate::agent_certificate::CertificateCheck;
use crate::guard::{FORCE_ANNOTATION, Plan, Removal, UNMOUNT_ANNOTATION, plan, read_review};
use crate::ledger::{Ledger, Release};
use crate::metrics::Metrics;
use crate::server::Health;
use crate::{AgentAccess, Error, Result, get};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use kube::runtime::events::{Event, EventType};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tonic::Code;
use wukong_controller_client::agent_client::AgentClient;
use wukong_controller_client::kubevirt::{VirtualMachine, VirtualMachineInstance, vm_resource, vmi_resource};
use wukong_proto::v1::{BlockerKind, UsageReport};

/// How long one attempt to reach a guest's agent may take during a review. A review may dial twice (the agent's
/// certificate check, then the release) and each dial makes three attempts with backoff: 2 x (3 x 3 s + 0.75 s)
/// stays within the 30 s the API server gives the webhook, so an unreachable guest is refused with our sentence,
/// not the API server's timeout.
const GUARD_CONNECT_ATTEMPT: Duration = Duration::from_secs(3);

/// Who may call the webhook: the API server, known by its client certificate (its AdmissionConfiguration gives it
/// one per webhook). `None`: anyone who reaches the port, and every review is checked against the live objects.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// The CA that signed the API server's webhook client certificate (PEM).
    pub ca: PathBuf,
    /// The names (common name or DNS subject alternative name) a client certificate must carry; empty: any
    /// certificate of the CA. Set it when the CA signs other clients too (a cluster CA).
    pub names: Vec<String>,
}

/// How this replica's reviews end: while it shuts down, new reviews are refused at once and the ones under way are
/// waited for.
#[derive(Debug, Default)]
pub struct Drain {
    closing: AtomicBool,
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl Drain {
    /// Refuses new reviews from now on and waits (at most `bound`) for those under way; returns how many were left.
    pub async fn close(&self, bound: Duration) -> usize {
        self.closing.store(true, Ordering::SeqCst);
        let idle = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(bound, idle).await;
        self.in_flight.load(Ordering::SeqCst)
    }

    fn enter(&self) -> Option<InFlight<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let review = InFlight(self);
        (!self.closing.load(Ordering::SeqCst)).then_some(review)
    }
}

/// A review under way; its end wakes a closing [`Drain`].
struct InFlight<'a>(&'a Drain);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_waiters();
    }
}

/// What the webhook needs.
pub struct Guard {
    pub client: kube::Client,
    pub agent: AgentAccess,
    /// Whether a review's body comes from the API server (the caller proved it with its client certificate).
    trusted: bool,
    /// How long the guest may take to release one disk: well under the webhook's `timeoutSeconds`, so a release
    /// that cannot finish is rolled back by the agent before the API server gives up on the review.
    release_deadline: Duration,
    ledger: Ledger,
    events: crate::events::Events,
    metrics: Arc<Metrics>,
    /// The agents' expiring certificates (shared with the reconciler).
    certificates: Arc<CertificateCheck>,
    pub drain: Drain,
    identity: String,
    /// The one namespace this replica guards (`--watch-namespace`); `None`: all.
    namespace: Option<String>,
}

impl Guard {
    /// The guard of the operator set up by `config`, serving as `settings` say.
    pub fn new(
        client: kube::Client,
        config: &crate::Config,
        settings: &crate::WebhookConfig,
        metrics: Arc<Metrics>,
        certificates: Arc<CertificateCheck>,
    ) -> Self {
        Self {
            certificates,
            events: crate::guard_events(&client, &config.identity),
            ledger: Ledger::new(client.clone(), &config.lease_namespace),
            trusted: settings.client_auth.is_some(),
            release_deadline: settings.release_deadline,
            client,
            agent: config.agent.clone(),
            metrics,
            drain: Drain::default(),
            identity: config.identity.clone(),
            namespace: config.namespace.clone(),
        }
    }
}

/// Answers one review from `peer`. Never fails: a review that cannot be read is denied with the reason.
pub async fn review(guard: &Guard, body: &[u8], peer: SocketAddr) -> AdmissionResponse {
    let request = match read_review(body) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "admission review refused");
            return AdmissionResponse::invalid(e);
        }
    };
    let response = AdmissionResponse::from(&request);
    match plan(&request) {
        Err(e) => forbid(response, e.to_string()),
        Ok(Plan::Refuse(refusal)) => {
            tracing::info!(%peer, object = %request.name, "denied: {refusal}");
            forbid(response, refusal.to_string())
        }
        Ok(Plan::Allow(why)) => {
            tracing::debug!(%peer, object = %request.name, why, "allowed");
            response
        }
        Ok(Plan::Kept { warning }) => {
            tracing::info!(%peer, object = %request.name, "allowed without a release: {warning}");
            let mut response = response;
            response.warnings = Some(vec![warning]);
            response
        }
        Ok(Plan::Release { namespace, vmi, removals, force, unmount, dry_run, user, catching_up }) => {
            if let Some(refusal) = outside(guard.namespace.as_deref(), &namespace, &vmi) {
                tracing::warn!(%peer, %namespace, object = %request.name, %user, "denied: {refusal}");
                return forbid(response, refusal);
            }
            let target = Target { namespace: &namespace, vmi: &vmi, user: &user, request: &request };
            if !guard.trusted
                && let Err(e) = crate::verify::check(&guard.client, &request, &removals).await
            {
                tracing::warn!(%peer, %namespace, object = %request.name, %user, "review does not match the live objects: {e}");
                guard.metrics.untrusted_review_refused();
                return forbid(response, format!("wukong guard: {e}"));
            }
            match release(guard, &target, removals, catching_up, force, unmount, dry_run).await {
                Ok(()) => response,
                Err(message) => {
                    tracing::info!(%peer, %namespace, %vmi, %user, dry_run, "denied: {message}");
                    forbid(response, message)
                }
            }
        }
    }
}

/// The denial of a release in `namespace` by a guard of namespace `watched` only: it may not read, or act on,
/// anything beyond it, and nothing unplugs unguarded (fail safe).
fn outside(watched: Option<&str>, namespace: &str, vmi: &str) -> Option<String> {
    let watched = watched.filter(|w| *w != namespace)?;
    Some(format!(
        "wukong guard guards namespace {watched} only (--watch-namespace) and cannot ask the guest of VMI \
         {namespace}/{vmi}; denied (fail safe). Make the webhooks of its ValidatingWebhookConfiguration select \
         namespace {watched} only (the chart's watchNamespace does, by the label kubernetes.io/metadata.name)"
    ))
}

/// A denial the caller sees as HTTP 403 Forbidden (the API server's default for a bare denial is 400).
fn forbid(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut response = response.deny(&message);
    response.result = kube::core::Status::failure(&message, "Forbidden").with_code(403);
    response
}

struct Target<'a> {
    namespace: &'a str,
    vmi: &'a str,
    user: &'a str,
    request: &'a AdmissionRequest<DynamicObject>,
}

fn advice() -> String {
    format!(
        "Stop what uses the disk in the guest and retry; annotate the object {UNMOUNT_ANNOTATION}=true to let the \
         guest unmount idle filesystems, or {FORCE_ANNOTATION}=true to unplug anyway at the risk of losing data"
    )
}

fn sentences(report: &UsageReport, unmount: bool) -> Vec<String> {
    report
        .blockers
        .iter()
        // With unmount, an idle mount (or an overlay on it) is the agent's to take down; a busy one also has its
        // users listed.
        .filter(|b| !(unmount && matches!(b.kind(), BlockerKind::Mount | BlockerKind::StackedMount)))
        .map(|b| b.message.clone())
        .collect()
}

/// The record of releasing `removal` for this review.
fn release_record(target: &Target<'_>, removal: &Removal) -> Release {
    let kind = target.request.kind.kind.clone();
    let old = target.request.old_object.as_ref();
    let definition = old
        .and_then(|o| crate::guard::spec_of(o, &kind)["volumes"].as_array())
        .and_then(|volumes| volumes.iter().find(|v| v["name"] == removal.volume.as_str()).cloned())
        .unwrap_or_default();
    Release {
        namespace: target.namespace.to_string(),
        kind,
        name: target.request.name.clone(),
        vmi: target.vmi.to_string(),
        volume: removal.volume.clone(),
        serial: removal.serial.clone(),
        definition,
        user: target.user.to_string(),
    }
}

/// Asks the guest to release every removed disk (with `catching_up`, also those the live VMI has and the new
/// template lacks); the error is the denial's message. A denial leaves nothing released: the disks this review
/// released before the one that was refused are given back before it answers.
async fn release(
    guard: &Guard,
    target: &Target<'_>,
    mut removals: Vec<Removal>,
    catching_up: bool,
    force: bool,
    unmount: bool,
    dry_run: bool,
) -> Result<(), String> {
    let (ns, name) = (target.namespace, target.vmi);
    let object: DynamicObject = match get(&guard.client, ns, &vmi_resource(), name).await {
        Ok(Some(vmi)) => vmi,
        // Not running: nothing is plugged, nothing to protect.
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("wukong guard cannot read VMI {ns}/{name} ({e}); denied (fail safe)")),
    };
    if catching_up && let Some(vm) = target.request.object.as_ref() {
        let kept = crate::guard::removals(&object.data["spec"], crate::guard::spec_of(vm, "VirtualMachine"), false);
        for removal in kept {
            if !removals.iter().any(|r| r.volume == removal.volume) {
                removals.push(removal);
            }
        }
    }
    if removals.is_empty() {
        return Ok(());
    }
    let vmi: VirtualMachineInstance = crate::typed(&object)
        .map_err(|e| format!("wukong guard cannot read VMI {ns}/{name} ({e}); denied (fail safe)"))?;
    let unreachable = |why: String| {
        format!(
            "wukong guard cannot ask the guest of VMI {ns}/{name} to release its disks ({why}); denied (fail safe). \
             Annotate the object {FORCE_ANNOTATION}=true to unplug anyway at the risk of losing data"
        )
    };
    // The VM's annotations, as stored, choose the way to its agent. Unreadable, the VMI's choose: either way leads
    // to this VMI's guest, only perhaps by another path.
    let owned = vmi.metadata.owner_references.iter().any(|o| o.kind == "VirtualMachine");
    let vm: Option<VirtualMachine> = match target.request.kind.kind.as_str() {
        "VirtualMachine" => target.request.old_object.as_ref().and_then(|vm| crate::typed(vm).ok()),
        _ if owned => get(&guard.client, ns, &vm_resource(), name).await.ok().flatten(),
        _ => None,
    };
    let agent = guard
        .agent
        .connect_within(&guard.client, vm.as_ref(), &vmi, GUARD_CONNECT_ATTEMPT)
        .map_err(|e| unreachable(e.to_string()))?;
    if guard.agent.tls.is_some()
        && let Some(note) = guard.certificates.check(&agent, ns, name).await
    {
        publish(guard, target.request, "AgentCertificateExpiring", "CheckAgent", &note).await;
    }
    let mut released = Vec::new();
    for removal in &removals {
        let outcome = release_one(guard, target, &agent, removal, force, unmount, dry_run, &unreachable).await;
        match outcome {
            Ok(Some(record)) => released.push(record),
            Ok(None) => {}
            Err(message) => {
                give_back(guard, &agent, &released).await;
                return Err(message);
            }
        }
    }
    Ok(())
}

/// Releases one disk; `Some` with its record when the guest released it for this review.
#[allow(clippy::too_many_arguments)]
async fn release_one(
    guard: &Guard,
    target: &Target<'_>,
    agent: &AgentClient,
    removal: &Removal,
    force: bool,
    unmount: bool,
    dry_run: bool,
    unreachable: &(dyn Fn(String) -> String + Sync),
) -> Result<Option<Release>, String> {
    let (ns, name) = (target.namespace, target.vmi);
    let Removal { volume, serial } = removal;
    let what = format!("disk '{serial}' (volume {volume}) of VMI {ns}/{name}");
    // A system disk stays, forced too: unforced, the release (or usage check) below refuses it itself; forced,
    // the agent is asked which disk it is, when it answers.
    if force
        && let Ok(disk) = agent.get_disk(serial, false).await
        && disk.system
    {
        return Err(format!(
            "wukong guard: {what} is a system disk of the guest ({}); it is never unplugged, even with \
             {FORCE_ANNOTATION}",
            disk.system_reason
        ));
    }
    if force {
        let note =
            format!("{} unplugs {what} with {FORCE_ANNOTATION}=true: the guest was not asked", requester(target.user));
        tracing::warn!(user = target.user, %serial, "FORCED unplug allowed: {note}");
        if !dry_run {
            publish(guard, target.request, "ForcedUnplug", "Admit", &note).await;
        }
        return Ok(None);
    }
    let refused = |sentences: Vec<String>| {
        format!("wukong guard refused to unplug {what}: {}. {}", sentences.join("; "), advice())
    };
    let record = release_record(target, removal);
    let outcome = match dry_run {
        true => agent.check_usage(serial).await.map(|report| (sentences(&report, unmount), false)),
        false => {
            // Recorded first: whatever happens to this replica from here on, another one finds the release.
            guard.ledger.record(&record).await.map_err(|e| format!("wukong guard: {e}; denied (fail safe)"))?;
            let outcome = agent.prepare_detach_within(serial, unmount, false, guard.release_deadline).await.map(|r| {
                match r.released {
                    true => (Vec::new(), true),
                    false => (r.usage.map(|u| sentences(&u, false)).unwrap_or_default(), false),
                }
            });
            if !matches!(outcome, Ok((_, true)))
                && let Err(e) = guard.ledger.forget(&record).await
            {
                tracing::warn!(error = %e, "a refused release stays recorded; the leader will forget it");
            }
            outcome
        }
    };
    match outcome {
        Ok((_, true)) => Ok(Some(record)),
        Ok((blockers, _)) if blockers.is_empty() => Ok(None),
        Ok((blockers, _)) => Err(refused(blockers)),
        // The guest does not have it: nothing in it can use it.
        Err(e) if e.code() == Some(Code::NotFound) => Ok(None),
        Err(e) if e.code() == Some(Code::FailedPrecondition) => {
            let blockers = e.refusal().and_then(|r| r.usage).map(|u| sentences(&u, false)).unwrap_or_default();
            Err(refused(if blockers.is_empty() { vec![e.to_string()] } else { blockers }))
        }
        Err(e) if e.code() == Some(Code::DeadlineExceeded) => Err(format!(
            "wukong guard: the guest could not release {what} within {}s, so it undid the release: {e}. Retry; \
             raise --guard-release-deadline-seconds (below the webhook's timeoutSeconds) if releases of this disk \
             need longer",
            guard.release_deadline.as_secs()
        )),
        Err(e) if e.is_unreachable() => Err(unreachable(e.to_string())),
        Err(e) => Err(refused(vec![e.to_string()])),
    }
}

/// Who unplugs, in words: the review's user, unless that is one of KubeVirt's ServiceAccounts (in whatever namespace
/// KubeVirt runs) acting for someone. virt-api writes a `removevolume` as `kubevirt-apiserver` and passes on nothing
/// of its caller (no impersonation, no `userInfo.extra`), so the review cannot name who asked; virt-controller
/// writes as `kubevirt-controller` what a VM's spec or volume requests say.
fn requester(user: &str) -> String {
    let account = user.strip_prefix("system:serviceaccount:").and_then(|a| a.split_once(':')).map(|(_, name)| name);
    match account {
        Some("kubevirt-apiserver") => format!("KubeVirt ({user}) acting for a removevolume request"),
        Some("kubevirt-controller") => format!("KubeVirt ({user}) acting for a change of the VM"),
        _ => user.to_string(),
    }
}

/// Gives back disks this review released before it was denied, so that no release outlives its review.
async fn give_back(guard: &Guard, agent: &AgentClient, released: &[Release]) {
    for record in released {
        match agent.cancel_detach(&record.serial).await {
            Ok(_) => {
                if let Err(e) = guard.ledger.forget(record).await {
                    tracing::warn!(error = %e, "a release given back stays recorded; the leader will forget it");
                }
            }
            Err(e) => tracing::warn!(
                serial = %record.serial, error = %e,
                "cannot give back a disk released for a denied review; the leader will after the grace period"
            ),
        }
    }
}

/// A Warning Event on the reviewed object (`reason`: ForcedUnplug, AgentCertificateExpiring); a failure to record
/// it is logged.
async fn publish(guard: &Guard, request: &AdmissionRequest<DynamicObject>, reason: &str, action: &str, note: &str) {
    let object = request.object.as_ref();
    let reference = ObjectReference {
        api_version: Some(format!("{}/{}", request.kind.group, request.kind.version)),
        kind: Some(request.kind.kind.clone()),
        name: Some(request.name.clone()),
        namespace: request.namespace.clone(),
        uid: object.and_then(|o| o.metadata.uid.clone()),
        // The version the update was made to: which change of the object this Event is about.
        resource_version: object.and_then(|o| o.metadata.resource_version.clone()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = guard.events.publish(&event, &reference).await {
        tracing::warn!(error = %e, reason, "cannot record an Event");
    }
}

/// When `tls.crt` and `tls.key` last changed.
type FileTimes = (SystemTime, SystemTime);

/// The serving certificate, read again when `tls.crt` or `tls.key` changes (a rotated Secret).
#[derive(Debug)]
struct Certificates {
    dir: PathBuf,
    current: Mutex<Option<(FileTimes, Arc<CertifiedKey>)>>,
    health: Arc<Health>,
}

impl Certificates {
    /// When each file last changed: any change (a Secret update swaps both) is a reason to read them again.
    fn modified(&self) -> Option<FileTimes> {
        let time = |f: &str| std::fs::metadata(self.dir.join(f)).and_then(|m| m.modified()).ok();
        Some((time("tls.crt")?, time("tls.key")?))
    }

    fn load(dir: &Path) -> Result<Arc<CertifiedKey>, String> {
        let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()));
        let certs = CertificateDer::pem_slice_iter(&read("tls.crt")?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", dir.join("tls.crt").display()))?;
        let key = PrivateKeyDer::from_pem_slice(&read("tls.key")?)
            .map_err(|e| format!("{}: {e}", dir.join("tls.key").display()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
        Ok(Arc::new(CertifiedKey::new(certs, key)))
    }

    /// The certificate to serve, reloaded if its files changed; `None` (and not ready) when unusable.
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let modified = self.modified();
        let mut current = self.current.lock().expect("never poisoned");
        if let Some((at, key)) = current.as_ref()
            && Some(*at) == modified
        {
            return Some(key.clone());
        }
        match Self::load(&self.dir) {
            Ok(key) => {
                tracing::info!(dir = %self.dir.display(), "serving certificate loaded");
                *current = modified.map(|m| (m, key.clone()));
                self.health.set_webhook_ready(true);
                Some(key)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the webhook's serving certificate");
                self.health.set_webhook_ready(false);
                current.as_ref().map(|(_, key)| key.clone())
            }
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// The verifier of callers' certificates, from `auth`'s CA file.
fn client_verifier(auth: &ClientAuth) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let unusable = || Error::ClientCa(auth.ca.clone());
    let pem = std::fs::read(&auth.ca).map_err(|_| unusable())?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.map_err(|_| unusable())?).map_err(|_| unusable())?;
    }
    if roots.is_empty() {
        return Err(unusable());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(|_| unusable())
}

/// The names a client certificate carries: its common name and its DNS subject alternative names.
fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert) else { return Vec::new() };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    names
}

/// Serves the webhook on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cert_dir: PathBuf,
    client_auth: Option<ClientAuth>,
    guard: Arc<Guard>,
    health: Arc<Health>,
) -> Result<std::convert::Infallible> {
    let certificates = Arc::new(Certificates { dir: cert_dir.clone(), current: Mutex::default(), health });
    if certificates.get().is_none() {
        return Err(Error::Certificate(cert_dir));
    }
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|_| Error::Certificate(cert_dir.clone()))?;
    let config = match &client_auth {
        Some(auth) => builder.with_client_cert_verifier(client_verifier(auth)?),
        None => builder.with_no_client_auth(),
    }
    .with_cert_resolver(certificates);
    let names = Arc::new(client_auth.map(|a| a.names).unwrap_or_default());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // As hyper's and axum's servers do: a connection that failed before it was accepted is that
            // connection's affair; running out of file descriptors or memory passes, so wait rather than spin or
            // stop serving (a webhook that stopped accepting would leave this replica in the Service, answering no
            // review).
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the admission webhook cannot accept connections; retrying in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (acceptor, guard, names) = (acceptor.clone(), guard.clone(), names.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                // Not debug: with client authentication, this is where a caller without the API server's
                // certificate is turned away, and who tried is worth knowing.
                Err(e) => return tracing::warn!(%peer, error = %e, "webhook TLS handshake refused"),
            };
            if !names.is_empty() {
                let presented = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(certificate_names);
                if !presented.unwrap_or_default().iter().any(|n| names.contains(n)) {
                    guard.metrics.untrusted_review_refused();
                    return tracing::warn!(%peer, allowed = ?names, "webhook caller's certificate names none of the allowed clients; connection closed");
                }
            }
            let service = hyper::service::service_fn(move |request| handle(guard.clone(), request, peer));
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
}

async fn handle(
    guard: Arc<Guard>,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.method() != Method::POST || request.uri().path() != "/validate" {
        return Ok(reply(StatusCode::NOT_FOUND, "{\"error\": \"POST an AdmissionReview to /validate\"}".into()));
    }
    // One byte more than the limit, so an oversized review is named as such.
    let body = match Limited::new(request.into_body(), crate::guard::MAX_REVIEW_BYTES + 1).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::from(vec![b' '; crate::guard::MAX_REVIEW_BYTES + 1]),
    };
    let started = std::time::Instant::now();
    let response = match guard.drain.enter() {
        Some(_in_flight) => review(&guard, &body, peer).await,
        // Shutting down: answered at once, so the API server's call ends well before the Pod is gone.
        None => match read_review(&body) {
            Ok(request) => forbid(
                AdmissionResponse::from(&request),
                format!(
                    "wukong guard replica {} is shutting down and reviewed nothing; retry the update (another \
                     replica answers)",
                    guard.identity
                ),
            ),
            Err(e) => AdmissionResponse::invalid(e),
        },
    };
    guard.metrics.reviewed(response.allowed, started.elapsed());
    let body = serde_json::to_string(&response.into_review()).expect("a review serialises");
    Ok(reply(StatusCode::OK, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_certificate(dir: &Path, name: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    }

    /// Shutting down: a review under way is waited for, a new one is turned away at once.
    #[tokio::test]
    async fn a_closing_drain_refuses_new_reviews_and_waits_for_those_under_way() {
        let drain = Arc::new(Drain::default());
        let under_way = drain.enter().expect("open: a review enters");
        let closing = tokio::spawn({
            let drain = drain.clone();
            async move { drain.close(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(drain.enter().is_none(), "closing: a new review is refused");
        assert!(!closing.is_finished(), "the review under way is waited for");
        drop(under_way);
        assert_eq!(closing.await.unwrap(), 0, "nothing left under way");
        let stuck = Drain::default();
        let _forever = stuck.enter();
        assert_eq!(stuck.close(Duration::from_millis(50)).await, 1, "bounded: a stuck review does not hold the exit");
    }

    #[test]
    fn a_client_certificate_is_known_by_its_common_name_and_dns_names() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["wukong-guard-client.example".to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver-webhook-client");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_names(cert.der()), ["kube-apiserver-webhook-client", "wukong-guard-client.example"]);
        assert!(certificate_names(&CertificateDer::from(vec![1, 2, 3])).is_empty(), "garbage names nobody");
    }

    #[test]
    fn a_namespaced_guard_releases_nothing_beyond_its_namespace() {
        assert_eq!(outside(None, "prod", "db"), None, "a cluster-wide guard");
        assert_eq!(outside(Some("prod"), "prod", "db"), None);
        let refusal = outside(Some("prod"), "dev", "db").expect("another namespace is refused");
        assert!(refusal.starts_with("wukong guard guards namespace prod only (--watch-namespace)"), "{refusal}");
        assert!(refusal.contains("VMI dev/db; denied (fail safe)"), "{refusal}");
    }

    #[test]
    fn kubevirt_acting_for_someone_is_said_so() {
        assert_eq!(requester("alice"), "alice");
        assert_eq!(
            requester("system:serviceaccount:kubevirt:kubevirt-apiserver"),
            "KubeVirt (system:serviceaccount:kubevirt:kubevirt-apiserver) acting for a removevolume request"
        );
        assert_eq!(
            requester("system:serviceaccount:openshift-cnv:kubevirt-controller"),
            "KubeVirt (system:serviceaccount:openshift-cnv:kubevirt-controller) acting for a change of the VM"
        );
        assert_eq!(requester("system:serviceaccount:ns1:builder"), "system:serviceaccount:ns1:builder");
    }

    #[test]
    fn an_unusable_client_ca_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "not a certificate").unwrap();
        let error = client_verifier(&ClientAuth { ca: ca.clone(), names: Vec::new() }).err().unwrap();
        assert!(matches!(&error, Error::ClientCa(path) if *path == ca), "{error}");
        assert!(error.to_string().contains("--webhook-client-ca"), "{error}");
    }

    /// A rotated Secret is served from the next handshake; a broken one keeps the last good certificate and makes
    /// the replica unready until it is fixed.
    #[test]
    fn the_serving_certificate_follows_its_files_and_readiness_says_when_they_are_broken() {
        let dir = tempfile::tempdir().unwrap();
        let health = Arc::new(Health::default());
        health.set_ready(true);
        health.expect_webhook();
        let certificates = Certificates { dir: dir.path().into(), current: Mutex::default(), health: health.clone() };
        assert!(certificates.get().is_none(), "no files: nothing to serve");
        assert!(health.not_ready().is_some());

        write_certificate(dir.path(), "first.example");
        let first = certificates.get().expect("a certificate");
        assert!(health.not_ready().is_none());
        assert!(Arc::ptr_eq(&first, &certificates.get().unwrap()), "unchanged files are not read again");

        // Rotated: file times move on (set explicitly: a fast rewrite can keep the same timestamp).
        write_certificate(dir.path(), "second.example");
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        for file in ["tls.crt", "tls.key"] {
            std::fs::File::options().append(true).open(dir.path().join(file)).unwrap().set_modified(later).unwrap();
        }
        let second = certificates.get().expect("the rotated certificate");
        assert_ne!(first.cert[0], second.cert[0], "the new certificate is served");

        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        let kept = certificates.get().expect("the last good certificate is kept");
        assert_eq!(kept.cert[0], second.cert[0]);
        assert_eq!(health.not_ready(), Some("not ready: the admission webhook has no usable serving certificate\n"));
    }
}
