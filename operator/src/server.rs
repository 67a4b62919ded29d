//! The operator's HTTP port: `/metrics` (Prometheus text), `/healthz` (the process serves) and `/readyz` (its
//! watches are up, as leader or as a standby ready to take over).

use crate::metrics::Metrics;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;

/// What the probes report: ready once the leader election runs (leader or standby) and, when this replica serves
/// the admission webhook, while the webhook has a usable certificate; never again once it is shutting down.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    webhook_expected: AtomicBool,
    webhook_ready: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// This replica serves the webhook: readiness waits for it.
    pub fn expect_webhook(&self) {
        self.webhook_expected.store(true, Ordering::Relaxed);
    }

    pub fn set_webhook_ready(&self, ready: bool) {
        self.webhook_ready.store(ready, Ordering::Relaxed);
    }

    /// The process is shutting down: unready from now on, so no new review is sent here.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub(crate) fn not_ready(&self) -> Option<&'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            return Some("not ready: shutting down\n");
        }
        if !self.ready.load(Ordering::Relaxed) {
            return Some("not ready: the leader election is not running yet\n");
        }
        let webhook = self.webhook_ready.load(Ordering::Relaxed) || !self.webhook_expected.load(Ordering::Relaxed);
        (!webhook).then_some("not ready: the admission webhook has no usable serving certificate\n")
    }
}

fn respond(request: &Request<Incoming>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let (status, kind, body) = match request.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match health.not_ready() {
            None => (StatusCode::OK, "text/plain", "ok\n".into()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why.into()),
        },
        other => {
            (StatusCode::NOT_FOUND, "text/plain", format!("no such path {other}; try /metrics, /healthz, /readyz\n"))
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", kind)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    while let Ok((stream, _)) = listener.accept().await {
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(&request, &metrics, &health);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
