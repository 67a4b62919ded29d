//! What the operator's identity may do, asked of the API server once at start (one `SelfSubjectAccessReview` per
//! permission; every authenticated identity may create them). A permission it needs and lacks stops it at once with
//! one error naming each missing permission and where, rather than a loop of 403s. A cluster-scoped read it can do
//! without (a namespaced install whose optional ClusterRole was not granted) is never sent: what it would have
//! checked is skipped, and said so once.

use crate::Config;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DynamicObject, PostParams};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::{HotplugMode, KubeVirt};

/// Reviews asked at once.
const CONCURRENT_REVIEWS: usize = 8;
/// The optional ClusterRole of a namespaced install (the chart's `clusterReads`).
const CLUSTER_READS_ROLE: &str = "wukong-operator-cluster-reads";

/// Where a permission applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Namespace(String),
    /// A namespaced resource in every namespace (a ClusterRole's).
    AllNamespaces,
    /// A cluster-scoped resource.
    Cluster,
}

/// One kind of request the operator makes, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub group: &'static str,
    /// `resource` or `resource/subresource`.
    pub resource: &'static str,
    pub scope: Scope,
    /// Only this object (a rule's `resourceNames`).
    pub name: Option<String>,
}

impl fmt::Display for Permission {
    /// As `kubectl auth can-i` spells it: `list wukongs.vm.novasphere.dev in namespace prod`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (resource, subresource) = self.resource.split_once('/').unwrap_or((self.resource, ""));
        write!(f, "{} {resource}", self.verb)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        if !subresource.is_empty() {
            write!(f, "/{subresource}")?;
        }
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        match &self.scope {
            Scope::Namespace(ns) => write!(f, " in namespace {ns}"),
            Scope::AllNamespaces => write!(f, " in every namespace"),
            Scope::Cluster => Ok(()),
        }
    }
}

impl Permission {
    fn attributes(&self) -> ResourceAttributes {
        let (resource, subresource) = self.resource.split_once('/').unwrap_or((self.resource, ""));
        ResourceAttributes {
            verb: Some(self.verb.into()),
            group: Some(self.group.into()),
            resource: Some(resource.into()),
            subresource: (!subresource.is_empty()).then(|| subresource.into()),
            namespace: match &self.scope {
                Scope::Namespace(ns) => Some(ns.clone()),
                Scope::AllNamespaces | Scope::Cluster => None,
            },
            name: self.name.clone(),
            ..Default::default()
        }
    }
}

/// Why the operator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("the operator's identity may not {}; {hint}", list(missing))]
    Missing { missing: Vec<Permission>, hint: String },
    #[error("cannot ask the API server what the operator's identity may do: {0}")]
    Review(#[source] kube::Error),
}

fn list(permissions: &[Permission]) -> String {
    permissions.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// `verbs` on `resource` of `group` in `scope` (only object `name`, if given).
fn each<'a>(
    verbs: &'a [&'static str],
    group: &'static str,
    resource: &'static str,
    scope: &'a Scope,
    name: Option<&'a str>,
) -> impl Iterator<Item = Permission> + 'a {
    verbs.iter().map(move |verb| Permission { verb, group, resource, scope: scope.clone(), name: name.map(Into::into) })
}

/// Every permission the operator needs with `config`: the controller's in the watched namespace (or every one), the
/// Lease's and the guard's records in its own, and the guard's reads. A create names no object (RBAC cannot limit
/// one to a name).
pub fn required(config: &Config) -> Vec<Permission> {
    const WUKONG: &str = "vm.novasphere.dev";
    let watched = match &config.namespace {
        Some(ns) => Scope::Namespace(ns.clone()),
        None => Scope::AllNamespaces,
    };
    let own = Scope::Namespace(config.lease_namespace.clone());
    let lease = Some(config.lease_name.as_str());
    let mut needed: Vec<Permission> = each(&["list", "watch", "patch"], WUKONG, "wukongs", &watched, None)
        .chain(each(&["patch"], WUKONG, "wukongs/status", &watched, None))
        .chain(each(&["list", "watch", "create", "patch", "delete"], "", "persistentvolumeclaims", &watched, None))
        .chain(each(&["get", "list", "create", "patch", "delete"], "cdi.kubevirt.io", "datavolumes", &watched, None))
        .chain(each(&["get", "list", "watch"], "kubevirt.io", "virtualmachineinstances", &watched, None))
        .chain(each(&["get", "list", "watch"], "kubevirt.io", "virtualmachines", &watched, None))
        .chain(
            [
                "virtualmachines/addvolume",
                "virtualmachines/removevolume",
                "virtualmachineinstances/addvolume",
                "virtualmachineinstances/removevolume",
            ]
            .into_iter()
            .flat_map(|hotplug| each(&["update"], "subresources.kubevirt.io", hotplug, &watched, None)),
        )
        // KubeVirt's vsock subresource, the way to the agents of VMIs with a vsock CID.
        .chain(
            each(&["get"], "subresources.kubevirt.io", "virtualmachineinstances/vsock", &watched, None)
                .filter(|_| config.agent.may_use_vsock()),
        )
        .chain(each(&["create"], "events.k8s.io", "events", &watched, None))
        .chain(each(&["create"], "coordination.k8s.io", "leases", &own, None))
        .chain(each(&["get", "patch"], "coordination.k8s.io", "leases", &own, lease))
        .collect();
    let Some(webhook) = &config.webhook else { return needed };
    // The guard's release records.
    needed.extend(each(&["get", "list", "create", "update", "delete"], "", "configmaps", &own, None));
    // Whether a namespace opted in. A namespaced install reads only its own, which a Role in it grants (RBAC
    // authorizes a request for namespace N as one in N).
    match &config.namespace {
        Some(ns) => needed.extend(each(&["get"], "", "namespaces", &watched, Some(ns))),
        None => needed.extend(each(&["get", "list"], "", "namespaces", &Scope::Cluster, None)),
    }
    if let Some(managed) = &webhook.managed {
        let configuration = Some(managed.webhook_configuration.as_str());
        needed.extend(each(&["create"], "", "secrets", &own, None));
        needed.extend(each(&["get", "list", "watch", "update"], "", "secrets", &own, Some(&managed.secret)));
        let webhooks = "validatingwebhookconfigurations";
        let group = "admissionregistration.k8s.io";
        needed.extend(each(&["get", "update"], group, webhooks, &Scope::Cluster, configuration));
    }
    needed
}

/// A cluster-scoped read the operator can do without: allowed until the API server says otherwise.
struct Optional {
    permission: Permission,
    /// What is not done without it.
    without: &'static str,
    allowed: AtomicBool,
}

impl Optional {
    fn new(
        verb: &'static str,
        group: &'static str,
        resource: &'static str,
        scope: Scope,
        without: &'static str,
    ) -> Self {
        Self {
            permission: Permission { verb, group, resource, scope, name: None },
            without,
            allowed: AtomicBool::new(true),
        }
    }

    fn allowed(&self) -> bool {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Refused (by the review at start, or by a 403 later: a ClusterRole taken away): never asked again, said once.
    fn refused(&self) {
        if self.allowed.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "the operator's identity may not {}: {}; bind the ClusterRole {CLUSTER_READS_ROLE} (the chart's \
                 clusterReads) to its ServiceAccount for that",
                self.permission,
                self.without
            );
        }
    }
}

/// The cluster-scoped reads that only make the operator's checks better, each skipped when refused.
pub struct ClusterReads {
    storage_classes: Optional,
    storage_profiles: Optional,
    kubevirt_config: Optional,
    /// The last read of StorageClasses, and when it was made.
    classes: Mutex<Option<Dated<Arc<Vec<StorageClass>>>>>,
    /// The last read of each class's StorageProfile (`None`: there is none), and when it was made.
    profiles: Mutex<HashMap<String, Dated<Option<Arc<DynamicObject>>>>>,
    /// When a read last found CDI's DataVolumes unknown to the API server (CDI not installed).
    no_cdi: Mutex<Option<Instant>>,
}

/// What a read returned, and when it was made.
type Dated<T> = (Instant, T);

impl Default for ClusterReads {
    fn default() -> Self {
        Self {
            storage_classes: Optional::new(
                "list",
                "storage.k8s.io",
                "storageclasses",
                Scope::Cluster,
                "a StorageClass named in spec.disks is not checked for existence (a misspelt one leaves its claim \
                 Pending instead of failing SpecValid), and a Pending claim is hot-plugged whatever its class's \
                 binding mode (KubeVirt's attach then waits for the bind)",
            ),
            storage_profiles: Optional::new(
                "get",
                "cdi.kubevirt.io",
                "storageprofiles",
                Scope::Cluster,
                "a disk's access and volume modes default to ReadWriteOnce and Filesystem rather than its class's, \
                 and a mode the class cannot give is refused by the provisioner instead of failing SpecValid",
            ),
            kubevirt_config: Optional::new(
                "list",
                "kubevirt.io",
                "kubevirts",
                Scope::AllNamespaces,
                "the cluster's hot-plug feature gates are not read, and KubeVirt 1.9's default, declarative \
                 hot-plug, is assumed",
            ),
            classes: Mutex::default(),
            profiles: Mutex::default(),
            no_cdi: Mutex::default(),
        }
    }
}

/// Whether a read made at `at` still serves a caller that accepts reads `max_age` old.
fn fresh(at: Instant, max_age: Duration) -> bool {
    at.elapsed() < max_age
}

impl ClusterReads {
    fn all(&self) -> [&Optional; 3] {
        [&self.storage_classes, &self.storage_profiles, &self.kubevirt_config]
    }

    /// The cluster's StorageClasses, read at most `max_age` ago; `None` when the operator may not read them.
    pub async fn storage_classes(
        &self,
        client: &kube::Client,
        max_age: Duration,
    ) -> Result<Option<Arc<Vec<StorageClass>>>, kube::Error> {
        if !self.storage_classes.allowed() {
            return Ok(None);
        }
        if let Some((at, classes)) = &*self.classes.lock().expect("never poisoned")
            && fresh(*at, max_age)
        {
            return Ok(Some(classes.clone()));
        }
        match Api::<StorageClass>::all(client.clone()).list(&Default::default()).await {
            Ok(list) => {
                let classes = Arc::new(list.items);
                *self.classes.lock().expect("never poisoned") = Some((Instant::now(), classes.clone()));
                Ok(Some(classes))
            }
            Err(kube::Error::Api(status)) if status.code == 403 => {
                self.storage_classes.refused();
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// CDI's StorageProfile of class `class`, read at most `max_age` ago; `None` when there is none (no CDI, or no
    /// profile) or the operator may not read them.
    pub async fn storage_profile(
        &self,
        client: &kube::Client,
        class: &str,
        max_age: Duration,
    ) -> Result<Option<Arc<DynamicObject>>, kube::Error> {
        if !self.storage_profiles.allowed() {
            return Ok(None);
        }
        if let Some((at, profile)) = self.profiles.lock().expect("never poisoned").get(class)
            && fresh(*at, max_age)
        {
            return Ok(profile.clone());
        }
        let api = Api::<DynamicObject>::all_with(client.clone(), &crate::storage::storage_profile_resource());
        let read = match api.get_opt(class).await {
            Ok(profile) => profile.map(Arc::new),
            // No CDI in this cluster: the resource is unknown.
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(kube::Error::Api(status)) if status.code == 403 => {
                self.storage_profiles.refused();
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        self.profiles.lock().expect("never poisoned").insert(class.to_string(), (Instant::now(), read.clone()));
        Ok(read)
    }

    /// Whether a read at most `max_age` ago found CDI not installed ([`ClusterReads::saw_no_cdi`]): then a pass need
    /// not ask again for its objects' DataVolumes, one read per object less while thousands converge.
    pub fn no_cdi(&self, max_age: Duration) -> bool {
        self.no_cdi.lock().expect("never poisoned").is_some_and(|at| fresh(at, max_age))
    }

    /// Records that the API server does not know CDI's DataVolumes.
    pub fn saw_no_cdi(&self) {
        *self.no_cdi.lock().expect("never poisoned") = Some(Instant::now());
    }

    /// `backend`, told the hot-plug mode when the operator may not read it (it would be refused on every route).
    pub fn kubevirt(&self, backend: KubeVirt) -> KubeVirt {
        match self.kubevirt_config.allowed() {
            true => backend,
            false => backend.with_hotplug_mode(HotplugMode::Declarative),
        }
    }
}

/// Asks the API server whether this identity may do each thing `config` needs, and each optional read. An identity
/// that may not even ask (no `system:basic-user`) is not checked.
pub async fn check(client: &kube::Client, config: &Config) -> Result<ClusterReads, AccessError> {
    let needed = required(config);
    let reads = ClusterReads::default();
    let asked: Vec<&Permission> = needed.iter().chain(reads.all().map(|o| &o.permission)).collect();
    let answers = futures::stream::iter(asked.into_iter().map(|p| allowed(client, p)))
        .buffered(CONCURRENT_REVIEWS)
        .try_collect::<Vec<bool>>()
        .await;
    let answers = match answers {
        Ok(answers) => answers,
        Err(kube::Error::Api(status)) if status.code == 403 => {
            tracing::warn!(
                "the operator's identity may not create SelfSubjectAccessReviews, so what it may do is not checked: \
                 a missing permission shows as refused requests"
            );
            return Ok(reads);
        }
        Err(e) => return Err(AccessError::Review(e)),
    };
    let (required, optional) = answers.split_at(needed.len());
    let missing: Vec<Permission> =
        needed.into_iter().zip(required).filter(|(_, allowed)| !**allowed).map(|(p, _)| p).collect();
    if !missing.is_empty() {
        return Err(AccessError::Missing { missing, hint: hint(config) });
    }
    for (read, allowed) in reads.all().into_iter().zip(optional) {
        if !allowed {
            read.refused();
        }
    }
    Ok(reads)
}

/// Where the permissions come from, for the error.
fn hint(config: &Config) -> String {
    let own = &config.lease_namespace;
    match &config.namespace {
        Some(ns) => format!(
            "with --watch-namespace={ns} they come from the Role wukong-operator and its RoleBinding in namespace \
             {ns} and the Role wukong-operator-leader in {own}: install the chart with watchNamespace={ns}, or apply \
             its rendering for that namespace"
        ),
        None => format!(
            "they come from the ClusterRole wukong-operator and its ClusterRoleBinding and the Role \
             wukong-operator-leader in {own}: install the chart, or apply deploy/operator.yaml"
        ),
    }
}

async fn allowed(client: &kube::Client, permission: &Permission) -> Result<bool, kube::Error> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec { resource_attributes: Some(permission.attributes()), ..Default::default() },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone()).create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Api as MockApi, config};
    use http::Method;
    use serde_json::json;

    fn forbidden() -> (u16, serde_json::Value) {
        (403, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403}))
    }

    /// A mock API server whose reviews allow everything but `refused` ("verb resource[/subresource] namespace",
    /// `-` for none), and that answers other requests with `other`.
    fn reviewing(
        refused: &'static [&'static str],
        other: impl Fn(&crate::fixtures::Seen) -> Option<(u16, serde_json::Value)> + Send + Sync + 'static,
    ) -> MockApi {
        MockApi::start(move |s| {
            if s.path != "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
                return other(s);
            }
            let a = &s.body["spec"]["resourceAttributes"];
            let text = |k: &str| a[k].as_str().unwrap_or_default();
            let resource = match text("subresource") {
                "" => text("resource").to_string(),
                sub => format!("{}/{sub}", text("resource")),
            };
            let key = format!("{} {resource} {}", text("verb"), a["namespace"].as_str().unwrap_or("-"));
            let allowed = !refused.contains(&key.as_str());
            Some((
                201,
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                       "spec": s.body["spec"], "status": {"allowed": allowed}}),
            ))
        })
    }

    /// A namespaced operator asks for nothing beyond its namespace and its own, but its own namespace object; a
    /// cluster-wide one lists in every namespace.
    #[test]
    fn a_namespaced_operator_needs_nothing_beyond_its_namespaces() {
        let mut config = config();
        config.namespace = Some("prod".into());
        config.webhook = Some(crate::fixtures::webhook());
        let needed = required(&config);
        for permission in &needed {
            let own = [Scope::Namespace("prod".into()), Scope::Namespace("wukong-system".into())];
            assert!(own.contains(&permission.scope), "{permission}");
        }
        let texts: Vec<String> = needed.iter().map(ToString::to_string).collect();
        assert!(texts.contains(&"list wukongs.vm.novasphere.dev in namespace prod".into()), "{texts:?}");
        assert!(texts.contains(&"update virtualmachines.subresources.kubevirt.io/addvolume in namespace prod".into()));
        assert!(texts.contains(&"get namespaces prod in namespace prod".into()), "{texts:?}");
        assert!(texts.contains(&"patch leases.coordination.k8s.io wukong-operator in namespace wukong-system".into()));

        assert!(texts.contains(&"get virtualmachineinstances.subresources.kubevirt.io/vsock in namespace prod".into()));

        config.namespace = None;
        let texts: Vec<String> = required(&config).iter().map(ToString::to_string).collect();
        assert!(texts.contains(&"watch persistentvolumeclaims in every namespace".into()), "{texts:?}");
        assert!(texts.contains(&"list namespaces".into()), "{texts:?}");
        let vsock = "get virtualmachineinstances.subresources.kubevirt.io/vsock in every namespace".to_string();
        assert!(texts.contains(&vsock), "{texts:?}");
        // Agents reached over the network only: the vsock subresource is not needed.
        config.agent.route.transport = Some(wukong_controller_client::kubevirt::AgentTransport::Network);
        let texts: Vec<String> = required(&config).iter().map(ToString::to_string).collect();
        assert!(!texts.contains(&vsock), "{texts:?}");
    }

    #[tokio::test]
    async fn a_missing_permission_stops_the_start_naming_it_and_where_it_comes_from() {
        let api = reviewing(&["watch persistentvolumeclaims prod", "get namespaces prod"], |_| None);
        let mut config = config();
        config.namespace = Some("prod".into());
        config.webhook = Some(crate::fixtures::webhook());
        let error = check(&api.client(), &config).await.err().expect("refused").to_string();
        assert_eq!(
            error,
            "the operator's identity may not watch persistentvolumeclaims in namespace prod, get namespaces prod in \
             namespace prod; with --watch-namespace=prod they come from the Role wukong-operator and its RoleBinding \
             in namespace prod and the Role wukong-operator-leader in wukong-system: install the chart with \
             watchNamespace=prod, or apply its rendering for that namespace"
        );
    }

    /// Refused at start: never asked (no request at all); refused later (a 403): asked no more.
    #[tokio::test]
    async fn a_refused_cluster_read_is_skipped_and_never_sent_again() {
        let api = reviewing(&["list storageclasses -", "get storageprofiles -", "list kubevirts -"], |_| None);
        let mut config = config();
        config.namespace = Some("prod".into());
        let reads = check(&api.client(), &config).await.unwrap();
        let before = api.seen().len();
        assert!(reads.storage_classes(&api.client(), Duration::ZERO).await.unwrap().is_none());
        assert!(reads.storage_profile(&api.client(), "fast", Duration::ZERO).await.unwrap().is_none());
        assert_eq!(api.seen().len(), before, "nothing sent");
        assert!(!reads.kubevirt_config.allowed());

        let api = MockApi::start(|s| {
            (s.path.starts_with("/apis/storage.k8s.io/") || s.path.starts_with("/apis/cdi.kubevirt.io/"))
                .then(forbidden)
        });
        let reads = ClusterReads::default();
        for _ in 0..2 {
            assert!(reads.storage_classes(&api.client(), Duration::ZERO).await.unwrap().is_none());
            assert!(reads.storage_profile(&api.client(), "fast", Duration::ZERO).await.unwrap().is_none());
        }
        let sent: Vec<(Method, String)> = api.seen().into_iter().map(|s| (s.method, s.path)).collect();
        assert_eq!(
            sent,
            [
                (Method::GET, "/apis/storage.k8s.io/v1/storageclasses".to_string()),
                (Method::GET, "/apis/cdi.kubevirt.io/v1beta1/storageprofiles/fast".to_string())
            ]
        );
    }

    /// Every pass that makes a disk needs the classes and the class's profile: one read serves those within
    /// `max_age`, and a caller that needs a fresher one (a class named but not among those read) gets it.
    #[tokio::test]
    async fn a_cluster_read_serves_the_passes_that_follow_until_it_is_too_old() {
        let api = MockApi::start(|s| match s.path.as_str() {
            "/apis/storage.k8s.io/v1/storageclasses" => Some((
                200,
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClassList", "metadata": {},
                       "items": [{"metadata": {"name": "fast"}, "provisioner": "x"}]}),
            )),
            _ => Some((
                200,
                json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "StorageProfile",
                                   "metadata": {"name": "fast"}}),
            )),
        });
        let reads = ClusterReads::default();
        let minute = Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(reads.storage_classes(&api.client(), minute).await.unwrap().unwrap().len(), 1);
            assert!(reads.storage_profile(&api.client(), "fast", minute).await.unwrap().is_some());
        }
        assert_eq!(api.seen().len(), 2, "one read of each");
        reads.storage_classes(&api.client(), Duration::ZERO).await.unwrap();
        reads.storage_profile(&api.client(), "fast", Duration::ZERO).await.unwrap();
        assert_eq!(api.seen().len(), 4, "read again when asked for a fresh one");
    }

    #[tokio::test]
    async fn an_allowed_cluster_read_is_made() {
        let api = reviewing(&[], |s| match s.path.as_str() {
            "/apis/storage.k8s.io/v1/storageclasses" => Some((
                200,
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClassList", "metadata": {},
                       "items": [{"metadata": {"name": "fast"}, "provisioner": "x"}]}),
            )),
            p if p.starts_with("/apis/cdi.kubevirt.io/") => Some((
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
            )),
            _ => None,
        });
        let reads = check(&api.client(), &config()).await.unwrap();
        let classes = reads.storage_classes(&api.client(), Duration::ZERO).await.unwrap().expect("allowed");
        assert_eq!(classes.iter().map(|c| c.metadata.name.clone().unwrap()).collect::<Vec<_>>(), ["fast"]);
        assert!(
            reads.storage_profile(&api.client(), "fast", Duration::ZERO).await.unwrap().is_none(),
            "no CDI: no profile"
        );
        assert!(reads.kubevirt_config.allowed());
    }
}
