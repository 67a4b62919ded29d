//! Test fixtures: a kube client whose API server is a closure (kube-rs over a `tower-test` mock, as controller-rs
//! does), recording every request, and a `Wukong` to reconcile. The journeys run against the real API server in
//! `tests/tests/operator_cluster.rs`; these check each branch's exact requests.

use crate::crd::Wukong;
use crate::kubevirt_cache::{Cached, Kind, KubeVirtCache};
use crate::metrics::Metrics;
use crate::reconcile::Context;
use crate::storage::CachedClaim;
use crate::{AgentAccess, Config, WebhookConfig};
use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::client::Body;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the mock API server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

type Respond = dyn Fn(&Seen) -> Option<(u16, Value)> + Send + Sync;

/// A mock API server: `respond` answers what it knows; anything else is echoed back with 200 (a write returns
/// what was written, a list is empty).
pub struct Api {
    client: kube::Client,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Api {
    pub fn start(respond: impl Fn(&Seen) -> Option<(u16, Value)> + Send + Sync + 'static) -> Self {
        let respond: Arc<Respond> = Arc::new(respond);
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_string();
                let bytes = request.into_body().collect_bytes().await.expect("a request body");
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let s = Seen { method, path, body };
                let (status, answer) = respond(&s).unwrap_or_else(|| echo(&s));
                log.lock().unwrap().push(s);
                let response = Response::builder().status(status).body(Body::from(answer.to_string().into_bytes()));
                send.send_response(response.expect("a valid response"));
            }
        });
        Self { client: kube::Client::new(service, "default"), seen }
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// What the mock answers by default: an empty list for a read, the object written for a write (a status write:
/// the object with that status).
fn echo(seen: &Seen) -> (u16, Value) {
    match (&seen.method, seen.path.strip_suffix("/status")) {
        (&Method::GET, _) => (200, json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": []})),
        (_, Some(object)) => {
            let name = object.rsplit('/').next().unwrap_or_default();
            let mut answer = seen.body.clone();
            answer["metadata"] = json!({"name": name, "namespace": "ns1"});
            answer["spec"] = json!({});
            (200, answer)
        }
        _ => (200, seen.body.clone()),
    }
}

/// The settings of a cluster-wide operator without the guard.
pub fn config() -> Config {
    Config {
        agent: AgentAccess::plaintext(7443),
        namespace: None,
        lease_namespace: "wukong-system".into(),
        lease_name: "wukong-operator".into(),
        identity: "test".into(),
        http_address: "127.0.0.1:0".parse().unwrap(),
        attach_wait: Duration::from_secs(1),
        detach_wait: Duration::from_secs(1),
        webhook: None,
        agent_cert_warning: Duration::from_secs(30 * 86400),
    }
}

/// The guard's settings, its certificate from a mounted Secret.
pub fn webhook() -> WebhookConfig {
    WebhookConfig {
        address: "127.0.0.1:0".parse().unwrap(),
        cert_dir: "/etc/wukong/guard-tls".into(),
        client_auth: None,
        release_deadline: Duration::from_secs(15),
        shutdown_delay: Duration::from_secs(5),
        drain: Duration::from_secs(25),
        grace: Duration::from_secs(60),
        managed: None,
    }
}

/// A reconcile context on `client`, every cluster read allowed, no claim in the watch cache.
pub fn context(client: kube::Client) -> Context {
    context_with_claims(client, Vec::new())
}

/// A reconcile context on `client`, every cluster read allowed, the watch cache of claims holding `claims`, and the
/// caches of VMs and VMIs not listed yet (every pass reads its VM from the API server).
pub fn context_with_claims(client: kube::Client, claims: Vec<PersistentVolumeClaim>) -> Context {
    let kubevirt =
        KubeVirtCache { vms: kube::runtime::reflector::store().0, vmis: kube::runtime::reflector::store().0 };
    context_with_caches(client, claims, kubevirt)
}

/// A reconcile context on `client`, every cluster read allowed, the watch caches holding `claims` and `kubevirt`.
pub fn context_with_caches(
    client: kube::Client,
    claims: Vec<PersistentVolumeClaim>,
    kubevirt: KubeVirtCache,
) -> Context {
    context_with_objects(client, claims, kubevirt, Vec::new())
}

/// [`context_with_caches`], the watch cache of `Wukong`s holding `wukongs` too.
pub fn context_with_objects(
    client: kube::Client,
    claims: Vec<PersistentVolumeClaim>,
    kubevirt: KubeVirtCache,
    wukongs: Vec<Wukong>,
) -> Context {
    let config = config();
    let metrics = Arc::new(Metrics::default());
    let certificates =
        Arc::new(crate::agent_certificate::CertificateCheck::new(config.agent_cert_warning, metrics.clone()));
    let caches = crate::reconcile::Caches { claims: claims_store(claims), wukongs: store_of(wukongs), kubevirt };
    // Nothing reads what the passes wake here.
    Context::new(client, config, metrics, certificates, Arc::default(), caches, futures::channel::mpsc::unbounded().0)
}

/// Watch caches that have listed `vms` and `vmis`, trimmed as the controller's are.
pub fn kubevirt_cache(vms: Vec<Value>, vmis: Vec<Value>) -> KubeVirtCache {
    KubeVirtCache {
        vms: store_of(vms.into_iter().map(cached).collect()),
        vmis: store_of(vmis.into_iter().map(cached).collect()),
    }
}

fn cached<Spec, Status>(object: Value) -> Cached<Spec, Status>
where
    Spec: Kind + Serialize + DeserializeOwned + Default,
    Status: Serialize + DeserializeOwned + Default,
{
    let mut cached: Cached<Spec, Status> = serde_json::from_value(object).expect("a valid object");
    cached.trim();
    cached
}
/// A watch cache that has listed `objects`.
pub fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = kube::runtime::reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// A watch cache of claims that has listed `claims`, kept as the controller keeps them.
pub fn claims_store(claims: Vec<PersistentVolumeClaim>) -> Store<CachedClaim> {
    store_of(claims.into_iter().map(CachedClaim::from).collect())
}

/// Claim ns1/`name`, labelled as `Wukong` `owner`'s, in `phase`.
pub fn claim(name: &str, owner: &str, phase: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "ns1", "labels": {"vm.novasphere.dev/wukong": owner}},
        "status": {"phase": phase}}))
    .expect("a valid claim")
}

/// `Wukong` ns1/db (VM `db-vm`) with `disks`, as the API server returns it.
pub fn wukong(disks: Value) -> Wukong {
    serde_json::from_value(json!({
        "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong",
        "metadata": {"name": "db", "namespace": "ns1", "uid": "7d2b9c1e-0000-4000-8000-000000000001", "generation": 1,
                     "resourceVersion": "1", "finalizers": ["vm.novasphere.dev/claims"]},
        "spec": {"disks": disks},
    }))
    .expect("a valid Wukong")
}
