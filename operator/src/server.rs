//! The operator's HTTP port: `/metrics` (Prometheus text), `/healthz` (liveness: restarting the process would
//! help) and `/readyz` (its watches are up, as leader or as a standby ready to take over).
//!
//! Liveness after kube-controller-manager's leader-election health check: a replica that leads must still renew
//! its Lease. One that has not for longer than the Lease lasts (its API server unreachable or its renewals stuck)
//! may no longer be the only replica acting, and kube-lease-manager keeps calling it the leader until it reaches the
//! API server again; failing liveness gets it restarted. A standby is never unhealthy for an API outage: restarting
//! it would not bring the API server back.

use crate::metrics::Metrics;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpSocket};

/// What the probes report: ready once the leader election runs (leader or standby) and, when this replica serves
/// the admission webhook, while the webhook has a usable certificate; never again once it is shutting down.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    webhook_expected: AtomicBool,
    webhook_ready: AtomicBool,
    stopping: AtomicBool,
    /// While this replica leads: its Lease, how long a renewal lasts, and the last renewal it saw stored.
    leading: Mutex<Option<Leading>>,
}

#[derive(Debug, Clone)]
struct Leading {
    lease: String,
    overdue_after: Duration,
    renewed: SystemTime,
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

    /// This replica leads on `lease` from now on: it is unhealthy once no renewal has been seen stored for
    /// `overdue_after`.
    pub fn lead(&self, lease: &str, overdue_after: Duration) {
        let leading = Leading { lease: lease.to_string(), overdue_after, renewed: SystemTime::now() };
        *self.leading.lock().expect("health lock") = Some(leading);
    }

    /// The API server has this replica's Lease renewed at `at` (its own clock wrote it).
    pub fn lease_renewed(&self, at: SystemTime) {
        if let Some(leading) = self.leading.lock().expect("health lock").as_mut() {
            leading.renewed = leading.renewed.max(at);
        }
    }

    /// Why a restart is due, or `None` while alive.
    pub(crate) fn not_alive(&self) -> Option<String> {
        let leading = self.leading.lock().expect("health lock").clone()?;
        let since = SystemTime::now().duration_since(leading.renewed).unwrap_or_default();
        (since > leading.overdue_after).then(|| {
            format!(
                "not alive: this replica leads but its Lease {} has not been renewed for {} s (the API server \
                 unreachable?); another replica may hold it by now\n",
                leading.lease,
                since.as_secs()
            )
        })
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
        "/healthz" => match health.not_alive() {
            None => (StatusCode::OK, "text/plain", "ok\n".into()),
            Some(why) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", why),
        },
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

/// Binds one of the operator's ports. The unspecified IPv6 address (the default, `[::]`) takes IPv4 connections too,
/// whatever the node's `net.ipv6.bindv6only` says, so one listener serves IPv4-only, IPv6-only and dual-stack
/// clusters (a Pod's IPv6 address is not served by `0.0.0.0`); on a kernel without IPv6 (`ipv6.disable=1`) it is
/// `0.0.0.0` instead. Any other address is bound as given.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let any_v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, address.port()));
    let socket = match address.ip() {
        IpAddr::V6(ip) if ip.is_unspecified() => match TcpSocket::new_v6() {
            Ok(socket) => {
                nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)?;
                socket
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
                tracing::info!(%address, instead = %any_v4, "this kernel has no IPv6: listening on IPv4 only");
                return bind_socket(TcpSocket::new_v4()?, any_v4);
            }
            Err(e) => return Err(e),
        },
        IpAddr::V6(_) => TcpSocket::new_v6()?,
        IpAddr::V4(_) => TcpSocket::new_v4()?,
    };
    bind_socket(socket, address)
}

fn bind_socket(socket: TcpSocket, address: SocketAddr) -> std::io::Result<TcpListener> {
    // As TcpListener::bind: a restarted replica binds while its old connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `[::]` takes IPv6 and IPv4 connections; an address given is bound as given.
    #[tokio::test]
    async fn the_unspecified_ipv6_address_serves_both_families() {
        let listener = bind("[::]:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        for peer in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            let (connected, accepted) = tokio::join!(tokio::net::TcpStream::connect(&peer), listener.accept());
            connected.unwrap_or_else(|e| panic!("{peer}: {e}"));
            accepted.unwrap();
        }
        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        assert!(tokio::net::TcpStream::connect(format!("[::1]:{port}")).await.is_err(), "IPv4 only, as given");
    }

    #[test]
    fn only_a_leader_whose_renewals_stopped_is_not_alive() {
        let health = Health::default();
        assert_eq!(health.not_alive(), None, "a standby is alive whatever its API server does");
        health.lease_renewed(SystemTime::now() - Duration::from_secs(3600));
        assert_eq!(health.not_alive(), None, "a renewal seen by a standby means nothing");
        health.lead("ns/lease", Duration::from_secs(20));
        assert_eq!(health.not_alive(), None, "leading from now on");
        *health.leading.lock().unwrap() = Some(Leading {
            lease: "ns/lease".into(),
            overdue_after: Duration::from_secs(20),
            renewed: SystemTime::UNIX_EPOCH,
        });
        let why = health.not_alive().expect("overdue");
        assert!(
            why.starts_with("not alive: this replica leads but its Lease ns/lease has not been renewed for "),
            "{why}"
        );
        health.lease_renewed(SystemTime::now());
        assert_eq!(health.not_alive(), None, "renewed again");
        health.lease_renewed(SystemTime::UNIX_EPOCH);
        assert_eq!(health.not_alive(), None, "an older renewal read late does not undo a newer one");
    }
}
