//! Runs the agent: starts the inventory and the udev source, then serves gRPC (the agent service, standard health
//! and reflection) on every TCP and vsock address and the Unix socket until shutdown.

use crate::agent_info::AgentFacts;
use crate::config::{Config, Listen};
use crate::instance::{InstanceLock, StateDirError};
use crate::kubevirt::KubeVirtTls;
use crate::limits::Admission;
use crate::release::Releaser;
use crate::release::journal::Journal;
use crate::service::DiskAgentService;
use crate::tls::{self, TlsConfigError};
use crate::transport::{self, BindError, Listener, Security};
use crate::usage::{ActiveSource, UsageScanner};
use crate::{inventory, udev_source};
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::Server;
use wukong_proto::v1::disk_agent_server::DiskAgentServer;

/// How long running calls may take to finish after shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(transparent)]
    Udev(#[from] udev_source::UdevSourceError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot create the Unix socket {path}: {source}")]
    BindUnix { path: PathBuf, source: std::io::Error },
    #[error("{0} exists and is not a socket; remove it or choose another --socket path")]
    NotASocket(PathBuf),
    #[error(
        "{0} is served by another running process (another wukong-agent?); stop it or choose another --socket path"
    )]
    SocketInUse(PathBuf),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(
        "{0}; start the agent with --usage-scanner auto (or procfs), or give it what the README's BPF section lists"
    )]
    UsageScanner(#[from] crate::usage::Unavailable),
}

/// Serves until `shutdown` completes, then stops accepting, lets running calls finish, and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    // First of all: the journal is replayed and the socket replaced below, neither of which another agent's may be.
    let _lock = InstanceLock::acquire(&config.state_dir)?;
    let (updates, inventory) = inventory::spawn();
    let _udev_thread = udev_source::spawn(config.roots.clone(), updates.clone())?;
    inventory.wait_synced().await;
    tracing::info!(disks = inventory.snapshot().disks.len(), "initial disk inventory complete");

    let (stop_tx, stop_rx) = watch::channel(false);
    let tls = config.tls.clone().map(tls::ReloadingTls::new).transpose()?.map(Arc::new);
    let usage = UsageScanner::new(config.roots.clone(), ActiveSource::choose(config.usage_scanner, &config.roots)?);
    tracing::info!(scanner = usage.source().name(), why = %usage.source().reason, "usage scanner chosen");
    let facts = Arc::new(AgentFacts::new(config.roots.proc.clone(), tls.clone(), usage.source()));
    let journal = Journal::new(Some(config.state_dir.clone()));
    let releaser = Releaser::new(config.roots.clone(), inventory.clone(), updates, usage.clone(), journal);
    releaser.recover().await;
    let admission = Admission::new(config.limits);
    let service =
        DiskAgentService::new(inventory, facts, usage, releaser, config.access.clone(), admission, stop_rx.clone());
    let agent = DiskAgentServer::new(service).max_decoding_message_size(config.limits.max_message_bytes);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<DiskAgentServer<DiskAgentService>>().await;
    // Both reflection versions: grpc.reflection.v1 for current clients, v1alpha for those that still speak only
    // it (older grpcurl, grpcui, Postman, evans).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wukong_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let routes = Routes::new(agent)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    let timeout = Duration::from_secs(config.limits.request_timeout_seconds);
    // Streams are not capped at the HTTP/2 level: a client would queue silently there. The service counts them and
    // refuses with a sentence instead.
    let serve = {
        let (routes, stop_rx) = (routes.clone(), stop_rx.clone());
        move |listener: Listener, address: Listen, security: Security| {
            log_serving(&address, &security);
            let router = Server::builder().timeout(timeout).add_routes(routes.clone());
            router.serve_with_incoming_shutdown(transport::incoming(listener, security), stopped(stop_rx.clone()))
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    // One for every kubevirt-vsock listener: they verify clients against the same fetched bundle.
    let mut kubevirt: Option<Arc<KubeVirtTls>> = None;
    let mut security = |address: &Listen| -> Result<Security, ServerError> {
        Ok(match address {
            Listen::KubeVirtVsock { .. } => Security::KubeVirt(match &kubevirt {
                Some(kubevirt) => kubevirt.clone(),
                None => kubevirt.insert(Arc::new(KubeVirtTls::new(config.kubevirt_ca.clone(), tls.clone())?)).clone(),
            }),
            Listen::Tcp(_) | Listen::Vsock { .. } => tls.clone().map_or(Security::Plaintext, Security::MutualTls),
        })
    };
    let bound = transport::bind_all(&config.listen, config.socket.is_some())?;
    for (listener, address) in bound.listeners {
        servers.spawn(serve(listener, address, security(&address)?));
    }
    for address in bound.later {
        let security = security(&address)?;
        let (serve, stop) = (serve.clone(), stopped(stop_rx.clone()));
        servers.spawn(async move {
            tokio::select! {
                (listener, address) = transport::bind_when_available(address) => {
                    serve(listener, address, security).await
                }
                () = stop => Ok(()),
            }
        });
    }
    if let Some(path) = &config.socket {
        let listener = bind_unix(path)?;
        tracing::info!(path = %path.display(), "serving gRPC on the Unix socket");
        let incoming = transport::incoming(Listener::Unix(listener), Security::Plaintext);
        servers.spawn(
            Server::builder()
                .add_routes(routes.clone())
                .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
        );
    }

    // Started once nothing can fail the start any more: a refused start leaves no task behind.
    let ca_refresh = kubevirt.map(|kubevirt| tokio::spawn(kubevirt.keep_current()));
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().map(|interval| tokio::spawn(ping_watchdog(interval)));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "wukong-agent ready");

    let mut result = Ok(());
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        Some(ended) = servers.join_next() => {
            // A server ended on its own: report why and stop the others.
            result = ended.unwrap_or(Ok(())).map_err(ServerError::from);
        }
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(ended) = servers.join_next().await {
            if let Ok(Err(e)) = ended {
                tracing::warn!(error = %e, "a listener ended with an error during shutdown");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still running after the shutdown grace period were cut off");
        servers.abort_all();
    }
    for task in watchdog.into_iter().chain(ca_refresh) {
        task.abort();
    }
    if let Some(path) = &config.socket {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Says how a listener serves, loudly when anyone who reaches it may use the agent.
fn log_serving(address: &Listen, security: &Security) {
    match (security, address) {
        (Security::MutualTls(_), _) => {
            tracing::info!(address = %address, "serving gRPC over mutual TLS (client certificates required)")
        }
        (Security::KubeVirt(kubevirt), _) => tracing::info!(
            ca = %kubevirt.ca_source(),
            address = %address,
            "serving gRPC to KubeVirt's vsock subresource (tls=true): virt-handler's client certificate is verified \
             against KubeVirt's CA"
        ),
        (Security::Plaintext, Listen::Tcp(addr)) if addr.ip().is_loopback() => {
            tracing::info!(address = %address, "serving plaintext gRPC on loopback")
        }
        (Security::Plaintext, Listen::Tcp(_)) => tracing::warn!(
            address = %address,
            "serving PLAINTEXT gRPC off loopback (--insecure-plaintext): anyone who reaches this address can use \
             the agent"
        ),
        (Security::Plaintext, _) => tracing::warn!(
            address = %address,
            "serving PLAINTEXT gRPC on vsock (--insecure-plaintext): the host, and anyone KubeVirt's vsock \
             subresource lets in, can use the agent"
        ),
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Binds the Unix socket, readable and writable by root only. A stale socket from a previous run is replaced; a
/// socket someone still serves (an agent with another state directory) and any other file are left alone and
/// reported.
fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| ServerError::BindUnix { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?
        }
        Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed (not started by systemd?)");
    }
}

/// Pings systemd's watchdog at half its interval, from the runtime: if the runtime wedges, pings stop and systemd
/// restarts the agent.
async fn ping_watchdog(interval: Duration) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        notify_systemd(&[sd_notify::NotifyState::Watchdog]);
    }
}
