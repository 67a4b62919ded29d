//! The admission guard's HTTPS endpoint (`POST /validate`, AdmissionReview v1): every replica serves it, leader or
//! not. A review is planned by [`crate::guard`]; a removal is carried out here by asking the guest's agent, and the
//! update is allowed only if the guest released the disk in that call (the fence: nothing in the guest can touch
//! the disk any more, so the unplug that follows the stored update is safe). The serving certificate is read from
//! a directory (`tls.crt`, `tls.key`, as a mounted Secret) and read again when the files change.

use crate::guard::{FORCE_ANNOTATION, Plan, Removal, UNMOUNT_ANNOTATION, plan, read_review};
use crate::metrics::Metrics;
use crate::server::Health;
use crate::{AgentAccess, Error, MANAGER, Result, get};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tonic::Code;
use wukong_controller_client::agent_client::ClientError;
use wukong_controller_client::kubevirt::{VirtualMachineInstance, vmi_resource};
use wukong_proto::v1::{BlockerKind, UsageReport};

/// What the webhook needs.
pub struct Guard {
    pub client: kube::Client,
    pub agent: AgentAccess,
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

impl Guard {
    pub fn new(client: kube::Client, agent: AgentAccess, identity: &str, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: format!("{MANAGER}-guard"), instance: Some(identity.to_string()) };
        Self { recorder: Recorder::new(client.clone(), reporter), client, agent, metrics }
    }
}

/// Answers one review. Never fails: a review that cannot be read is denied with the reason.
pub async fn review(guard: &Guard, body: &[u8]) -> AdmissionResponse {
    let request = match read_review(body) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!(error = %e, "admission review refused");
            return AdmissionResponse::invalid(e);
        }
    };
    let response = AdmissionResponse::from(&request);
    match plan(&request) {
        Err(e) => forbid(response, e.to_string()),
        Ok(Plan::Allow(why)) => {
            tracing::debug!(object = %request.name, why, "allowed");
            response
        }
        Ok(Plan::Release { namespace, vmi, removals, force, unmount, dry_run, user }) => {
            let target = Target { namespace: &namespace, vmi: &vmi, user: &user, request: &request };
            match release(guard, &target, &removals, force, unmount, dry_run).await {
                Ok(()) => response,
                Err(message) => {
                    tracing::info!(%namespace, %vmi, %user, dry_run, "denied: {message}");
                    forbid(response, message)
                }
            }
        }
    }
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

/// Asks the guest to release every removed disk; the error is the denial's message.
async fn release(
    guard: &Guard,
    target: &Target<'_>,
    removals: &[Removal],
    force: bool,
    unmount: bool,
    dry_run: bool,
) -> Result<(), String> {
    let (ns, name) = (target.namespace, target.vmi);
    let vmi: VirtualMachineInstance = match get(&guard.client, ns, &vmi_resource(), name).await {
        Ok(Some(vmi)) => vmi,
        // Not running: nothing is plugged, nothing to protect.
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("wukong guard cannot read VMI {ns}/{name} ({e}); denied (fail safe)")),
    };
    let unreachable = |why: String| {
        format!(
            "wukong guard cannot ask the guest of VMI {ns}/{name} to release its disks ({why}); denied (fail safe). \
             Annotate the object {FORCE_ANNOTATION}=true to unplug anyway at the risk of losing data"
        )
    };
    let agent = guard
        .agent
        .connect(&vmi)
        .ok_or_else(|| unreachable("it reports no IP".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    for removal in removals {
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
            let note = format!("{} unplugs {what} with {FORCE_ANNOTATION}=true: the guest was not asked", target.user);
            tracing::warn!(user = target.user, %serial, "FORCED unplug allowed: {note}");
            if !dry_run {
                publish(guard, target.request, &note).await;
            }
            continue;
        }
        let refused = |sentences: Vec<String>| {
            format!("wukong guard refused to unplug {what}: {}. {}", sentences.join("; "), advice())
        };
        let outcome = match dry_run {
            true => agent.check_usage(serial).await.map(|report| (sentences(&report, unmount), false)),
            false => agent.prepare_detach(serial, unmount, false).await.map(|r| match r.released {
                true => (Vec::new(), true),
                false => (r.usage.map(|u| sentences(&u, false)).unwrap_or_default(), false),
            }),
        };
        match outcome {
            Ok((blockers, _)) if blockers.is_empty() => {}
            Ok((blockers, _)) => return Err(refused(blockers)),
            // The guest does not have it: nothing in it can use it.
            Err(e) if e.code() == Some(Code::NotFound) => {}
            Err(e) if e.code() == Some(Code::FailedPrecondition) => {
                let blockers = e.refusal().and_then(|r| r.usage).map(|u| sentences(&u, false)).unwrap_or_default();
                return Err(refused(if blockers.is_empty() { vec![e.to_string()] } else { blockers }));
            }
            Err(e @ (ClientError::Unreachable { .. } | ClientError::Timeout { .. } | ClientError::TlsRefused(_))) => {
                return Err(unreachable(e.to_string()));
            }
            Err(e) => return Err(refused(vec![e.to_string()])),
        }
    }
    Ok(())
}

/// A Warning Event on the object of a forced unplug; a failure to record it is logged.
async fn publish(guard: &Guard, request: &AdmissionRequest<DynamicObject>, note: &str) {
    let object = request.object.as_ref();
    let reference = ObjectReference {
        api_version: Some(format!("{}/{}", request.kind.group, request.kind.version)),
        kind: Some(request.kind.kind.clone()),
        name: Some(request.name.clone()),
        namespace: request.namespace.clone(),
        uid: object.and_then(|o| o.metadata.uid.clone()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "ForcedUnplug".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Admit".into(),
        secondary: None,
    };
    if let Err(e) = guard.recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, "cannot record the ForcedUnplug Event");
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

/// Serves the webhook on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cert_dir: PathBuf,
    guard: Arc<Guard>,
    health: Arc<Health>,
) -> Result<()> {
    let certificates = Arc::new(Certificates { dir: cert_dir.clone(), current: Mutex::default(), health });
    if certificates.get().is_none() {
        return Err(Error::Certificate(cert_dir));
    }
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|_| Error::Certificate(cert_dir.clone()))?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    while let Ok((stream, peer)) = listener.accept().await {
        let (acceptor, guard) = (acceptor.clone(), guard.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(stream).await {
                Ok(tls) => tls,
                Err(e) => return tracing::debug!(%peer, error = %e, "webhook TLS handshake failed"),
            };
            let service = hyper::service::service_fn(move |request| handle(guard.clone(), request));
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(%peer, error = %e, "webhook connection ended");
            }
        });
    }
    Ok(())
}

async fn handle(
    guard: Arc<Guard>,
    request: Request<Incoming>,
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
    let response = review(&guard, &body).await;
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
