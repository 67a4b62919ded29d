//! The namespaced install (issue 23, item 5) through a genuine kube-apiserver (v1.20): the chart rendered by
//! `helm template` with `watchNamespace`, as a user without cluster-wide grants for the operator renders it, its
//! RBAC created and nothing else granted to the operator's identity, which runs with `--watch-namespace` (never as
//! admin). A `Wukong` in the watched namespace converges through the lab's KubeVirt and a QEMU guest, one in another
//! namespace is never touched, the guard reviews updates of the watched namespace only and its loop-closer gives a
//! released disk back there; the audit log shows no list or watch beyond the two namespaces and no refused request.
//! Then the optional read-only ClusterRole is bound: the StorageClass check it allows is made.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wukong_controller_client::kubevirt::{KubeVirt, vm_resource};
use wukong_e2e::cluster::{ADMIN, AuditEvent, Cluster, create_all};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, attach_claim};
use wukong_e2e::operator_lab::{OPERATOR, given_back, label, reviews, start_guarded_with, wait_for_wukong as wait_for};
use wukong_e2e::{Guest, helm};
use wukong_operator::crd::{Phase, Wukong};

/// The watched namespace (the lab's KubeVirt runs there), the operator's own, and one it must leave alone.
const NS: &str = "ns1";
const OWN: &str = "wukong-system";
const OTHER: &str = "elsewhere";
/// The optional read-only ClusterRole (and its binding).
const CLUSTER_READS: &str = "wukong-operator-cluster-reads";

/// helm `command` (`template`, `install`, ...) of the chart for a namespaced install of NS (the guard's certificate
/// from a Secret), with `more` arguments: its output.
fn helm_namespaced(command: &str, more: &[&str]) -> Result<String> {
    let chart = helm::chart();
    let chart = chart.to_str().context("a UTF-8 chart path")?;
    let watched = format!("watchNamespace={NS}");
    let args = [command, "wukong-operator", chart, "--namespace", OWN, "--set", &watched];
    helm::run(&[&args[..], &["--set", "guard.certificates=secret"], more].concat())
}

/// The chart's documents for a namespaced install of NS, for the lab's 1.20, as `helm template` renders them.
fn render() -> Result<Vec<Value>> {
    let text = helm_namespaced("template", &["--kube-version", "1.20.2", "--include-crds"])?;
    Ok(serde_saphyr::from_multiple::<Value>(&text)?.into_iter().filter(|d| !d.is_null()).collect())
}

fn wukong(name: &str, spec: Value) -> Result<Wukong> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "vm.novasphere.dev/v1alpha1", "kind": "Wukong", "metadata": {"name": name}, "spec": spec,
    }))?)
}

fn condition<'a>(w: &'a Wukong, kind: &str) -> Option<&'a wukong_operator::crd::Condition> {
    w.status.as_ref()?.conditions.iter().find(|c| c.type_ == kind)
}

/// The namespace a request is for (from its path), if any.
fn namespace_of(event: &AuditEvent) -> Option<&str> {
    let path = event.request_uri.split('?').next().unwrap_or_default();
    path.split_once("/namespaces/").map(|(_, rest)| rest.split('/').next().unwrap_or_default())
}

/// What the operator's identity asked of the API server: none refused, every list and watch in NS or OWN but those
/// of `cluster_lists` (paths), nothing about OTHER; the cluster-scoped requests, as "verb path" (the access reviews
/// counted, not listed).
fn audit_operator(events: &[AuditEvent], cluster_lists: &[&str]) -> Vec<String> {
    let ours: Vec<&AuditEvent> = events.iter().filter(|e| e.user.username == OPERATOR).collect();
    let refused: Vec<String> = ours.iter().filter(|e| e.code() == 403).map(|e| e.request_uri.clone()).collect();
    assert!(refused.is_empty(), "refused requests of the operator: {refused:#?}");
    let mut cluster_scoped = Vec::new();
    for event in &ours {
        let namespace = namespace_of(event);
        // `/api/v1/namespaces/NS` is the namespace object itself: cluster-scoped, in NS for RBAC.
        let object = event.object_ref.as_ref().map(|o| o.resource.as_str()) == Some("namespaces");
        match namespace {
            Some(ns) if !object => {
                assert!(ns == NS || ns == OWN, "a request in namespace {ns}: {} {}", event.verb, event.request_uri)
            }
            _ if matches!(event.verb.as_str(), "list" | "watch") => {
                let path = event.request_uri.split('?').next().unwrap_or_default();
                assert!(cluster_lists.contains(&path), "a cluster-wide {} by the operator: {}", event.verb, path);
            }
            _ if event.request_uri.contains("selfsubjectaccessreviews") => {}
            _ => cluster_scoped.push(format!("{} {}", event.verb, event.request_uri)),
        }
    }
    let reviews = ours.iter().filter(|e| e.request_uri.contains("selfsubjectaccessreviews")).count();
    println!("the operator's requests: {} ({reviews} access reviews); cluster-scoped: {cluster_scoped:?}", ours.len());
    cluster_scoped
}

#[tokio::test(flavor = "multi_thread")]
async fn a_namespaced_install_works_with_only_its_role_and_stays_in_its_namespace() -> Result<()> {
    let started = Instant::now();
    let guest = Guest::boot().await?;
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, Some(&guest), NS, HotplugMode::Declarative).await?;
    let images = tempfile::tempdir()?;
    kubevirt.provision(images.path(), "lab-images").await?;
    let admin = cluster.client(ADMIN).await?;

    // Kubernetes 1.20 sets no kubernetes.io/metadata.name label (1.21 does), which the webhooks select NS by: helm
    // install (a server-side dry run here) says so; labelled as the README says, it goes through.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": OWN}}))?).await?;
    let labels = namespaces.get(NS).await?.labels().clone();
    println!("namespace {NS}'s labels as the 1.20 API server made it: {labels:?}");
    assert!(!labels.contains_key("kubernetes.io/metadata.name"), "{labels:?}");
    let kubeconfig = cluster.kubeconfig(ADMIN)?;
    let dry_run = ["--dry-run=server", "--kubeconfig", kubeconfig.to_str().context("a UTF-8 path")?];
    let refused = helm_namespaced("install", &dry_run).expect_err("an unlabelled namespace");
    let label_it = format!("kubectl label namespace {NS} kubernetes.io/metadata.name={NS}");
    assert!(refused.to_string().contains(&label_it), "{refused:#}");
    let watched = json!({"metadata": {"labels": {"kubernetes.io/metadata.name": NS}}});
    namespaces.patch(NS, &Default::default(), &kube::api::Patch::Merge(&watched)).await?;
    helm_namespaced("install", &dry_run).context("helm install, the namespace labelled")?;

    // The rendering's RBAC and CRD, the optional ClusterRole aside for now; its guard's webhooks are registered
    // with the operator below (pointed at it on loopback: the lab has no Service network).
    let documents = render()?;
    let kinds = ["CustomResourceDefinition", "ServiceAccount", "Role", "RoleBinding"];
    let install = documents.iter().filter(|d| kinds.contains(&d["kind"].as_str().unwrap_or_default())).cloned();
    let cluster_reads: Vec<Value> =
        documents.iter().filter(|d| d["metadata"]["name"] == CLUSTER_READS).cloned().collect();
    assert_eq!(cluster_reads.len(), 2, "the optional ClusterRole and its binding");
    let bound_cluster_wide = documents
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding")
        .any(|d| d["metadata"]["name"] != CLUSTER_READS && d["subjects"].to_string().contains("\"wukong-operator\""));
    assert!(!bound_cluster_wide, "the namespaced rendering binds the operator to nothing else cluster-wide");
    create_all(&admin, install.collect()).await?;
    let guard: Vec<Value> =
        documents.iter().filter(|d| d["kind"] == "ValidatingWebhookConfiguration").cloned().collect();
    namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": OTHER}}))?).await?;

    // The Wukong's VM, a guarded VM of NS (no Wukong: only the loop-closer looks after it) and a guarded VM of OTHER.
    kubevirt.create_vm("db-vm", true, "127.0.0.1").await?;
    kubevirt.create_vm("solo-vm", true, "127.0.0.1").await?;
    let vms = Api::<DynamicObject>::namespaced_with(admin.clone(), NS, &vm_resource());
    let opt_in = json!({"vm.novasphere.dev/guard": "enabled"});
    label(&vms, "solo-vm", opt_in.clone(), json!({})).await?;
    let other_vms = Api::<DynamicObject>::namespaced_with(admin.clone(), OTHER, &vm_resource());
    let other_vm = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                          "metadata": {"name": "far-vm", "labels": opt_in},
                          "spec": {"running": false, "template": {"spec": {"domain": {"devices": {}}}}}});
    other_vms.create(&PostParams::default(), &serde_json::from_value(other_vm)?).await?;

    let mark = cluster.audit()?.len();
    let flags = ["--watch-namespace", NS, "--guard-grace-seconds", "3", "--shutdown-delay-seconds", "0"];
    let port = guest.agent_port().to_string();
    let agent = ["--agent-plaintext", "--agent-port", &port];
    let mut operator = start_guarded_with(&cluster, "op-ns", &agent, &flags, guard.clone()).await?;
    let log = operator.log();
    for read in [
        "list storageclasses.storage.k8s.io",
        "get storageprofiles.cdi.kubevirt.io",
        "list kubevirts.kubevirt.io in every namespace",
    ] {
        let said = log.matches(&format!("the operator's identity may not {read}")).count();
        assert_eq!(said, 1, "the skipped read {read} is said once: {log}");
    }

    // A Wukong in NS converges: its claim made, its disk hot-plugged into the guest.
    let api: Api<Wukong> = Api::namespaced(admin.clone(), NS);
    let disks = json!([{"name": "rootdisk", "system": true}, {"name": "data", "size": "16Mi"}]);
    let created = Instant::now();
    api.create(&PostParams::default(), &wukong("db", json!({"disks": disks}))?).await?;
    let phase = |disk: &'static str, phase: Phase| {
        move |w: &Wukong| {
            w.status.as_ref().is_some_and(|s| s.volumes.iter().any(|v| v.name == disk && v.phase == phase))
        }
    };
    wait_for(&api, "db", 60, phase("data", Phase::Attached)).await?;
    println!("a disk in the watched namespace Attached in {:.1} s", created.elapsed().as_secs_f64());
    assert!(guest.has_disk("data").await, "hot-plugged into the guest");
    // A StorageClass the operator may not read is not checked: the spec is valid, its VM the only problem.
    let typo = json!({"vmName": "nowhere", "disks": [{"name": "rootdisk", "system": true},
                      {"name": "data", "size": "16Mi", "storageClassName": "no-such-class"}]});
    api.create(&PostParams::default(), &wukong("typo", typo)?).await?;
    let w = wait_for(&api, "typo", 30, |w| condition(w, "VMAvailable").is_some()).await?;
    assert_eq!(condition(&w, "SpecValid").map(|c| c.status.as_str()), Some("True"), "{:?}", w.status);

    // The guard: an update of a guarded VM of NS is reviewed (a hot-plug adds a volume: allowed), one of OTHER is not.
    let before = reviews(&operator).await?;
    kubevirt.create_claim("pvc-solo", &guest.new_image(16 << 20)?).await?;
    attach_claim(&guest, &KubeVirt::new(admin.clone(), NS, "solo-vm", false), "solo", "pvc-solo").await?;
    let reviewed = reviews(&operator).await?;
    assert!(reviewed > before, "the hot-plug into a guarded VM of {NS} was reviewed");
    label(&other_vms, "far-vm", json!({}), json!({"touched": "yes"})).await?;
    assert_eq!(reviews(&operator).await?, reviewed, "an update in {OTHER} never reaches the guard");
    // The loop-closer: a disk the guest released while still in the spec is given back after the grace period.
    assert!(guest.agent().prepare_detach("solo", false, false).await?.released);
    given_back(&guest, &admin, NS, "solo").await.context("the loop-closer in the watched namespace")?;

    // A Wukong in OTHER is never touched: no finalizer, no status.
    let other: Api<Wukong> = Api::namespaced(admin.clone(), OTHER);
    other.create(&PostParams::default(), &wukong("stray", json!({"disks": disks}))?).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stray = other.get("stray").await?;
    assert!(stray.status.is_none() && stray.finalizers().is_empty(), "{OTHER}/stray was touched: {stray:?}");

    let cluster_scoped = audit_operator(&cluster.audit()?[mark..], &[]);
    let expected = [format!("get /api/v1/namespaces/{NS}")];
    assert!(cluster_scoped.iter().all(|r| expected.contains(r)), "cluster-scoped requests: {cluster_scoped:#?}");

    // The optional read-only ClusterRole, bound: a restarted operator reads StorageClasses, and the misspelt one
    // fails the spec.
    create_all(&admin, cluster_reads).await?;
    let status = operator.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "the operator stops cleanly on SIGTERM: {status}");
    let mark = cluster.audit()?.len();
    let operator = start_guarded_with(&cluster, "op-ns-2", &agent, &flags, guard).await?;
    let w = wait_for(&api, "typo", 30, |w| {
        condition(w, "SpecValid").is_some_and(|c| c.status == "False" && c.message.contains("no-such-class"))
    })
    .await?;
    println!("with {CLUSTER_READS}: {:?}", condition(&w, "SpecValid").map(|c| &c.message));
    assert!(!operator.log().contains("the operator's identity may not"), "{}", operator.log());
    // The ClusterRole lets it read the cluster's hot-plug mode too, should a disk be routed.
    let classes = "/apis/storage.k8s.io/v1/storageclasses";
    let events = &cluster.audit()?[mark..];
    audit_operator(events, &["/apis/kubevirt.io/v1/kubevirts", classes]);
    let listed =
        |e: &&AuditEvent| e.user.username == OPERATOR && e.verb == "list" && e.request_uri.starts_with(classes);
    assert!(events.iter().any(|e| listed(&e)), "with {CLUSTER_READS} the operator lists StorageClasses");
    println!("the namespaced install's test took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
