//! One active replica: every replica serves its probes and metrics and waits for the `coordination.k8s.io/v1`
//! Lease (kube-lease-manager); the holder reconciles. A leader that loses the Lease stops at once and the process
//! exits with an error, as controller-runtime's managers do, so two replicas never act on one disk.

use crate::access::ClusterReads;
use crate::agent_certificate::CertificateCheck;
use crate::metrics::Metrics;
use crate::server::{self, Health};
use crate::webhook::Guard;
use crate::{Config, Error, MANAGER, Result};
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::LeaseManagerBuilder;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Seconds a Lease stays valid without renewal, and how early its holder renews it.
const LEASE_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;
/// How often the leader reads its Lease back to see its renewals stored (for `/healthz`).
const LEASE_CHECK_SECONDS: u64 = 5;

/// Runs the operator until `shutdown` completes: probes and metrics at once, the controller while this replica
/// holds the Lease. Returns an error when the Lease is lost.
pub async fn run(
    client: kube::Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // Before anything is served: a replica that lacks a permission says which, once, and does nothing.
    let reads = Arc::new(crate::access::check(&client, &config).await?);
    let metrics = Arc::new(Metrics::default());
    let certificates = Arc::new(CertificateCheck::new(config.agent_cert_warning, metrics.clone()));
    let health = Arc::new(Health::default());
    let listener =
        server::bind(config.http_address).map_err(|source| Error::Listen { address: config.http_address, source })?;
    let server = tokio::spawn(server::serve(listener, metrics.clone(), health.clone()));
    // Every replica serves the webhook, leader or not: the API server calls whichever the Service picks.
    let (mut webhook, guard) = match &config.webhook {
        Some(settings) => {
            health.expect_webhook();
            let listener =
                server::bind(settings.address).map_err(|source| Error::Listen { address: settings.address, source })?;
            let guard = Arc::new(Guard::new(client.clone(), &config, settings, metrics.clone(), certificates.clone()));
            let (dir, auth) = (settings.cert_dir.clone(), settings.client_auth.clone());
            let serve = crate::webhook::serve(listener, dir.clone(), auth, guard.clone(), health.clone());
            let task = match settings.managed.clone() {
                None => tokio::spawn(serve),
                // The certificate comes from the Secret the leader makes: until this replica has written one, it
                // serves nothing and stays unready.
                Some(managed) => tokio::spawn({
                    let client = client.clone();
                    async move {
                        let (ready, mut written) = tokio::sync::watch::channel(false);
                        let follow = crate::guard_certs::follow(client, managed, dir, ready);
                        tokio::select! {
                            never = follow => match never {},
                            served = async {
                                let _ = written.wait_for(|written| *written).await;
                                serve.await
                            } => served,
                        }
                    }
                }),
            };
            (Some(task), Some((guard, settings.shutdown_delay, settings.drain)))
        }
        None => (None, None),
    };
    let shutdown = shutdown.boxed().shared();
    // On SIGTERM: unready at once (the Service stops sending reviews here), reviews answered as usual while that
    // takes effect, then new reviews refused fast and those under way finished (bounded); meanwhile the leader
    // steps down.
    let stopping = tokio::spawn({
        let (shutdown, health) = (shutdown.clone(), health.clone());
        async move {
            shutdown.await;
            health.set_stopping();
            if let Some((guard, delay, bound)) = guard {
                tokio::time::sleep(delay).await;
                match guard.drain.close(bound).await {
                    0 => tracing::info!("every admission review under way was answered"),
                    left => tracing::warn!(left, ?bound, "admission reviews still under way when the drain ended"),
                }
            }
        }
    });
    // The webhook never ends while the replica runs (it fails only at start, on its certificate): if it does anyway
    // (a panic), the process exits, since a replica in the Service that answers no review is worse than a restart.
    let result = tokio::select! {
        result = lead(client, config, metrics, certificates, reads, &health, shutdown) => result,
        Some(ended) = async { match webhook.as_mut() { Some(task) => Some(task.await), None => None } } => {
            Err(match ended {
                Ok(Ok(never)) => match never {},
                Ok(Err(e)) => e,
                Err(panic) => Error::WebhookStopped(panic.to_string()),
            })
        }
    };
    match result.is_ok() {
        true => drop(stopping.await),
        false => stopping.abort(),
    }
    server.abort();
    if let Some(task) = webhook {
        task.abort();
    }
    result
}

async fn lead(
    client: kube::Client,
    config: Config,
    metrics: Arc<Metrics>,
    certificates: Arc<CertificateCheck>,
    reads: Arc<ClusterReads>,
    health: &Health,
    shutdown: futures::future::Shared<futures::future::BoxFuture<'static, ()>>,
) -> Result<()> {
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(&config.identity)
        .with_field_manager(format!("{MANAGER}-{}", config.identity))
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (mut leading, lease) = manager.watch().await;
    health.set_ready(true);
    let lease_name = format!("{}/{}", config.lease_namespace, config.lease_name);
    tracing::info!(identity = %config.identity, lease = %lease_name, "waiting to hold the leader lease");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => if changed.is_err() {
                // The Lease task ended on its own: its error says why.
                return lease.await.map_err(|e| Error::LostLease(format!("{lease_name} ({e})")))?.map(drop).map_err(Error::from);
            },
            () = shutdown.clone() => {
                drop(leading);
                let _ = lease.await;
                return Ok(());
            }
        }
    }
    tracing::info!(identity = %config.identity, lease = %lease_name, "holding the leader lease: reconciling");
    health.lead(&lease_name, Duration::from_secs(LEASE_SECONDS + LEASE_CHECK_SECONDS));
    let lost = async {
        let stepped_down = async {
            while leading.changed().await.is_ok() {
                if !*leading.borrow() {
                    return;
                }
            }
        };
        tokio::select! {
            () = stepped_down => {}
            never = watch_renewals(&client, &config, health) => match never {},
        }
    };
    let watch = async {
        match &config.webhook {
            Some(webhook) => {
                let watch = crate::release_watch::Watch::new(
                    client.clone(),
                    config.agent.clone(),
                    config.namespace.clone(),
                    &config.lease_namespace,
                    &config.identity,
                    metrics.clone(),
                );
                watch.run(webhook.grace).await
            }
            None => std::future::pending().await,
        }
    };
    let guard_certificates = async {
        match config.webhook.as_ref().and_then(|w| w.managed.clone()) {
            Some(managed) => match crate::guard_certs::lead(client.clone(), managed).await {},
            None => std::future::pending::<()>().await,
        }
    };
    let outcome = tokio::select! {
        () = crate::reconcile::run(client.clone(), config.clone(), metrics.clone(), certificates, reads, shutdown) => Ok(()),
        () = watch => Ok(()),
        () = guard_certificates => Ok(()),
        () = lost => Err(Error::LostLease(lease_name)),
    };
    // Closing the channel makes the Lease task release the Lease (if still held) and end.
    drop(leading);
    let _ = lease.await;
    outcome
}

/// Reads this replica's Lease back while it leads and tells `health` of every renewal stored: kube-lease-manager
/// reports no renewals, and keeps calling this replica the leader while it cannot reach the API server.
async fn watch_renewals(client: &kube::Client, config: &Config, health: &Health) -> Infallible {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.lease_namespace);
    let every = Duration::from_secs(LEASE_CHECK_SECONDS);
    loop {
        tokio::time::sleep(every).await;
        // Bounded: a stalled API server must not stall the check with it.
        match tokio::time::timeout(every, leases.get_opt(&config.lease_name)).await {
            Ok(Ok(lease)) => {
                let spec = lease.and_then(|l| l.spec).unwrap_or_default();
                if spec.holder_identity.as_deref() == Some(config.identity.as_str()) {
                    spec.renew_time.into_iter().for_each(|at| health.lease_renewed(at.0.into()));
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read the leader Lease back"),
            Err(_) => tracing::debug!(?every, "reading the leader Lease back timed out"),
        }
    }
}
