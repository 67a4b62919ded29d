//! The Helm chart deploy/chart/wukong-operator, the one source of the cluster manifests: the committed deploy/*.yaml
//! are its rendering (scripts/render-manifests.sh), and the real `helm install`, `helm upgrade` and `helm uninstall`
//! run against the lab node's genuine API server (v1.20) with the operator's image.

use anyhow::{Context, Result, ensure};
use base64::Engine;
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DynamicObject};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, Ca};
use wukong_e2e::kubevirt_lab::resource;
use wukong_e2e::node::{Node, wait_for_pods};
use wukong_e2e::{helm, workspace_root};
use wukong_operator::access::{Permission, Scope, required};
use wukong_operator::cli::{Cli, Command};

const FILES: [&str; 6] = [
    "crd.yaml",
    "operator.yaml",
    "guard.yaml",
    "network-policy.yaml",
    "companion-rbac.yaml",
    "operator-namespaced.yaml",
];

#[test]
fn the_committed_manifests_are_the_charts_rendering() -> Result<()> {
    let out = tempfile::tempdir()?;
    let script = workspace_root().join("scripts/render-manifests.sh");
    let output = std::process::Command::new("bash").arg(&script).arg(out.path()).output()?;
    ensure!(output.status.success(), "render-manifests.sh failed: {}", String::from_utf8_lossy(&output.stderr));
    for file in FILES {
        let fresh = std::fs::read_to_string(out.path().join(file)).with_context(|| format!("rendered {file}"))?;
        let committed = std::fs::read_to_string(workspace_root().join("deploy").join(file))?;
        assert!(
            fresh == committed,
            "deploy/{file} is not the chart's rendering: run scripts/render-manifests.sh and commit the result"
        );
        assert!(committed.starts_with("# generated from deploy/chart by scripts/render-manifests.sh; do not edit\n"));
    }
    Ok(())
}

/// The chart rendered with `values` (files under the chart's ci/) for Kubernetes `version`: its documents.
fn render(values: &[&str], version: &str) -> Result<Vec<Value>> {
    render_set(values, &[], version)
}

/// [`render`] with `set` (`key=value`) too.
fn render_set(values: &[&str], set: &[&str], version: &str) -> Result<Vec<Value>> {
    let chart = helm::chart();
    let chart = chart.to_str().context("a UTF-8 chart path")?;
    let mut args = vec!["template", "wukong-operator", chart, "--namespace", NS, "--kube-version", version];
    let files: Vec<String> = values.iter().map(|v| format!("{chart}/ci/{v}")).collect();
    for file in &files {
        args.extend(["--values", file.as_str()]);
    }
    for value in set {
        args.extend(["--set", value]);
    }
    let text = helm::run(&args)?;
    Ok(serde_saphyr::from_multiple::<Value>(&text)?.into_iter().filter(|d| !d.is_null()).collect())
}

fn one<'a>(documents: &'a [Value], kind: &str) -> Result<&'a Value> {
    documents.iter().find(|d| d["kind"] == kind).with_context(|| format!("no {kind} rendered"))
}

/// What the switches change: with cert-manager the webhooks carry no caBundle field at all (the injector owns it)
/// and the annotation, a Certificate for the Service's name and its Issuer; a digest pins the image; the
/// ServiceMonitor comes with its Service. Without the guard: no webhook, Service or webhook port, flag or mount.
/// For a 1.20 server: a policy/v1beta1 PDB and no matchConditions.
#[test]
fn the_values_switch_what_the_chart_renders() -> Result<()> {
    let docs = render(&["cert-manager-values.yaml"], "1.31.0")?;
    let config = one(&docs, "ValidatingWebhookConfiguration")?;
    assert_eq!(config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"], "wukong-system/wukong-guard");
    for hook in config["webhooks"].as_array().context("webhooks")? {
        assert!(hook["clientConfig"].get("caBundle").is_none(), "no caBundle field: {}", hook["clientConfig"]);
        let expressions = &hook["namespaceSelector"]["matchExpressions"];
        assert_eq!(expressions[0]["values"], json!(["kube-system"]), "the extra namespaceSelector: {hook}");
    }
    let certificate = one(&docs, "Certificate")?;
    assert_eq!(certificate["spec"]["dnsNames"], json!(["wukong-guard.wukong-system.svc"]));
    assert_eq!(certificate["spec"]["secretName"], "wukong-guard-tls");
    assert_eq!(one(&docs, "Issuer")?["metadata"]["name"], certificate["spec"]["issuerRef"]["name"]);
    let pod = &one(&docs, "Deployment")?["spec"]["template"]["spec"];
    let image = pod["containers"][0]["image"].as_str().context("image")?;
    assert!(image.starts_with("ghcr.io/wukong-disk-agent/wukong-operator@sha256:"), "{image}");
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(one(&docs, "ServiceMonitor")?["metadata"]["labels"]["release"], "prometheus");
    assert!(docs.iter().any(|d| d["kind"] == "Service" && d["metadata"]["name"] == "wukong-operator-metrics"));

    let docs = render(&["guard-disabled-values.yaml"], "1.31.0")?;
    for kind in ["ValidatingWebhookConfiguration", "Service", "PodDisruptionBudget"] {
        assert!(docs.iter().all(|d| d["kind"] != kind), "guard disabled, yet a {kind}");
    }
    let container = &one(&docs, "Deployment")?["spec"]["template"]["spec"]["containers"][0];
    let text = container.to_string();
    assert!(!text.contains("8443") && !text.contains("--webhook") && !text.contains("guard-tls"), "{text}");
    let ingress = &one(&docs, "NetworkPolicy")?["spec"]["ingress"];
    assert_eq!(ingress.as_array().map(Vec::len), Some(1), "only the metrics port is open: {ingress}");

    let docs = render(&[], "1.20.2")?;
    assert_eq!(one(&docs, "PodDisruptionBudget")?["apiVersion"], "policy/v1beta1");
    let config = one(&docs, "ValidatingWebhookConfiguration")?;
    assert!(config["webhooks"].as_array().context("webhooks")?.iter().all(|h| h.get("matchConditions").is_none()));
    Ok(())
}

/// Whether RBAC `rules` allow `permission` (no aggregation, no non-resource URLs: the chart has neither).
fn grants(rules: &Value, permission: &Permission) -> bool {
    let has = |list: &Value, item: &str| list.as_array().is_some_and(|l| l.iter().any(|v| v == item || v == "*"));
    rules.as_array().into_iter().flatten().any(|rule| {
        let names = rule["resourceNames"].as_array().filter(|n| !n.is_empty());
        has(&rule["apiGroups"], permission.group)
            && has(&rule["resources"], permission.resource)
            && has(&rule["verbs"], permission.verb)
            && names.is_none_or(|n| permission.name.as_ref().is_some_and(|name| n.iter().any(|v| v == name.as_str())))
    })
}

/// Whether the rendered RBAC gives the operator's ServiceAccount `permission`: a ClusterRole bound cluster-wide, or
/// a Role bound in the permission's namespace.
fn granted(documents: &[Value], permission: &Permission) -> bool {
    let operator = |binding: &Value| {
        binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == "wukong-operator" && s["namespace"] == NS)
    };
    let role = |kind: &str, name: &Value, namespace: Option<&Value>| {
        documents.iter().find(|d| {
            d["kind"] == kind
                && &d["metadata"]["name"] == name
                && namespace.is_none_or(|ns| &d["metadata"]["namespace"] == ns)
        })
    };
    documents.iter().filter(|d| operator(d)).any(|binding| {
        let (kind, name) = (&binding["roleRef"]["kind"], &binding["roleRef"]["name"]);
        match (binding["kind"].as_str(), &permission.scope) {
            (Some("ClusterRoleBinding"), _) => {
                role("ClusterRole", name, None).is_some_and(|r| grants(&r["rules"], permission))
            }
            (Some("RoleBinding"), Scope::Namespace(ns)) if binding["metadata"]["namespace"] == ns.as_str() => {
                let found = match kind.as_str() {
                    Some("Role") => role("Role", name, Some(&binding["metadata"]["namespace"])),
                    _ => role("ClusterRole", name, None),
                };
                found.is_some_and(|r| grants(&r["rules"], permission))
            }
            _ => false,
        }
    })
}

/// The operator's settings from the rendered Deployment's arguments, parsed by its own command line.
fn deployed_config(documents: &[Value]) -> Result<wukong_operator::Config> {
    let deployment = one(documents, "Deployment")?;
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().context("args")?;
    let args = std::iter::once("wukong-operator").chain(args.iter().filter_map(Value::as_str));
    let Command::Run(run) = Cli::try_parse_from(args)?.command else { anyhow::bail!("the Deployment does not run") };
    Ok(run.config("chart-test".into()))
}

/// Every permission the operator checks at start (`access::required`, its SelfSubjectAccessReviews) is granted by
/// the chart's RBAC, cluster-wide and namespaced, guard or not, with each way of providing its certificate.
#[test]
fn the_charts_rbac_grants_what_the_operator_checks_at_start() -> Result<()> {
    let namespaced = ["watchNamespace=prod", "guard.certificates=secret"];
    let cases: [(&[&str], &[&str]); 5] = [
        (&[], &[]),
        (&["guard-disabled-values.yaml"], &[]),
        (&["secret-values.yaml"], &[]),
        (&["namespaced-values.yaml"], &[]),
        (&[], &namespaced),
    ];
    for (values, set) in cases {
        let documents = render_set(values, set, "1.31.0")?;
        let config = deployed_config(&documents)?;
        let missing: Vec<String> =
            required(&config).iter().filter(|p| !granted(&documents, p)).map(ToString::to_string).collect();
        assert!(missing.is_empty(), "with {values:?} {set:?} the chart does not grant: {missing:#?}");
    }
    // And the check itself: a Role bound in another namespace grants nothing here.
    let documents = render_set(&[], &namespaced, "1.31.0")?;
    let mut config = deployed_config(&documents)?;
    config.namespace = Some("dev".into());
    assert!(required(&config).iter().any(|p| !granted(&documents, p)), "a Role in prod grants nothing in dev");
    Ok(())
}

/// watchNamespace: the operator's ClusterRole becomes a Role with the same rules in the watched namespace (and the
/// namespace itself, by name), the optional read-only ClusterRole holds what a Role cannot grant, the Deployment
/// watches that namespace, and both webhooks select it by kubernetes.io/metadata.name. The operator's own
/// certificates are refused with the reason.
#[test]
fn a_namespaced_install_binds_a_role_in_its_namespace_and_guards_only_it() -> Result<()> {
    let cluster_wide = render(&[], "1.31.0")?;
    let docs = render(&["namespaced-values.yaml"], "1.31.0")?;
    let named = |kind: &str, name: &str| docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name);
    assert!(
        named("ClusterRole", "wukong-operator").is_none() && named("ClusterRoleBinding", "wukong-operator").is_none()
    );
    let role = named("Role", "wukong-operator").context("the Role")?;
    assert_eq!(role["metadata"]["namespace"], "prod");
    let rules = role["rules"].as_array().context("rules")?;
    let (last, same) = rules.split_last().context("rules")?;
    let operator_role =
        cluster_wide.iter().find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "wukong-operator");
    let cluster_rules = &operator_role.context("the cluster-wide ClusterRole")?["rules"];
    assert_eq!(Some(same), cluster_rules.as_array().map(|r| &r[..same.len()]), "the ClusterRole's namespaced rules");
    assert_eq!(
        last,
        &json!({"apiGroups": [""], "resources": ["namespaces"], "resourceNames": ["prod"], "verbs": ["get"]})
    );
    let binding = named("RoleBinding", "wukong-operator").context("the RoleBinding")?;
    assert_eq!(binding["metadata"]["namespace"], "prod");
    assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": "wukong-operator", "namespace": NS}]));
    let reads = named("ClusterRole", "wukong-operator-cluster-reads").context("the optional ClusterRole")?;
    for rule in reads["rules"].as_array().context("rules")? {
        let verbs = rule["verbs"].as_array().context("verbs")?;
        assert!(verbs.iter().all(|v| v == "get" || v == "list"), "read-only: {rule}");
    }
    let args = one(&docs, "Deployment")?["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("\"--watch-namespace=prod\""), "{args}");
    let watched = json!([{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["prod"]}]);
    let hooks = one(&docs, "ValidatingWebhookConfiguration")?["webhooks"].clone();
    assert_eq!(hooks[0]["namespaceSelector"], json!({"matchExpressions": watched}), "{hooks}");
    assert_eq!(
        hooks[1]["namespaceSelector"],
        json!({"matchLabels": {"vm.novasphere.dev/guard": "enabled"}, "matchExpressions": watched}),
        "{hooks}"
    );

    // Without the optional ClusterRole nothing cluster-wide is bound to the operator.
    let docs = render_set(&["namespaced-values.yaml"], &["clusterReads=false"], "1.31.0")?;
    let cluster_bound = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRoleBinding")
        .any(|d| d["subjects"].to_string().contains("\"wukong-operator\""));
    assert!(!cluster_bound, "a ClusterRoleBinding of the operator with clusterReads=false");

    let refused = render_set(&[], &["watchNamespace=prod"], "1.31.0").expect_err("the operator's own certificates");
    assert!(refused.to_string().contains("needs guard.certificates=secret or certManager"), "{refused:#}");
    Ok(())
}

const NS: &str = "wukong-system";
const SELECTOR: &str = "app.kubernetes.io/name=wukong-operator";

/// The Secrets the chart's Deployment mounts, made before the install as the README says: the agents' client
/// Secret and the guard's serving certificate for its Service. Returns the guard CA's caBundle (base64 of its PEM).
async fn create_secrets(admin: &kube::Client) -> Result<String> {
    let engine = base64::engine::general_purpose::STANDARD;
    let agents = Ca::new("wukong-agents-ca")?;
    let client = agents.leaf("wukong-companion", &[], rcgen::ExtendedKeyUsagePurpose::ClientAuth)?;
    let guard_ca = Ca::new("wukong-guard-ca")?;
    let host = format!("wukong-guard.{NS}.svc");
    let serving = guard_ca.leaf(&host, &[&host], rcgen::ExtendedKeyUsagePurpose::ServerAuth)?;
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    wukong_e2e::cluster::apply(admin, &namespace).await?;
    let secrets = [
        (
            "wukong-agent-client-tls",
            "Opaque",
            json!({"ca.crt": engine.encode(&agents.pem),
            "tls.crt": engine.encode(&client.cert), "tls.key": engine.encode(&client.key)}),
        ),
        (
            "wukong-guard-tls",
            "kubernetes.io/tls",
            json!({"tls.crt": engine.encode(&serving.cert), "tls.key": engine.encode(&serving.key)}),
        ),
    ];
    for (name, type_, data) in secrets {
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
            "metadata": {"name": name, "namespace": NS}, "data": data});
        wukong_e2e::cluster::apply(admin, &secret).await?;
    }
    Ok(engine.encode(&guard_ca.pem))
}

/// The chart's objects by kind, namespace (empty: cluster-scoped) and name, as the API server has them now.
async fn present(admin: &kube::Client) -> Result<Vec<String>> {
    let kinds = [
        ("ServiceAccount", "", "v1", "serviceaccounts", true),
        ("ClusterRole", "rbac.authorization.k8s.io", "v1", "clusterroles", false),
        ("ClusterRoleBinding", "rbac.authorization.k8s.io", "v1", "clusterrolebindings", false),
        ("Role", "rbac.authorization.k8s.io", "v1", "roles", true),
        ("RoleBinding", "rbac.authorization.k8s.io", "v1", "rolebindings", true),
        ("Deployment", "apps", "v1", "deployments", true),
        ("Pod", "", "v1", "pods", true),
        ("Service", "", "v1", "services", true),
        ("PodDisruptionBudget", "policy", "v1beta1", "poddisruptionbudgets", true),
        ("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies", true),
        (
            "ValidatingWebhookConfiguration",
            "admissionregistration.k8s.io",
            "v1",
            "validatingwebhookconfigurations",
            false,
        ),
        ("Secret", "", "v1", "secrets", true),
        ("ConfigMap", "", "v1", "configmaps", true),
        ("Lease", "coordination.k8s.io", "v1", "leases", true),
        ("CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions", false),
    ];
    let ours = |name: &str| name.starts_with("wukong") || name.starts_with("sh.helm.release");
    let mut found = Vec::new();
    for (kind, group, version, plural, namespaced) in kinds {
        let r = resource(kind, group, version, plural);
        let api: Api<DynamicObject> = match namespaced {
            true => Api::namespaced_with(admin.clone(), NS, &r),
            false => Api::all_with(admin.clone(), &r),
        };
        for object in api.list(&Default::default()).await?.items {
            let name = object.metadata.name.unwrap_or_default();
            if ours(&name) && object.metadata.deletion_timestamp.is_none() {
                found.push(format!("{kind} {name}"));
            }
        }
    }
    Ok(found)
}

/// The Pods' arguments, once `count` Ready Pods of the Deployment's current template run and no other Pod is left.
async fn rolled_out(
    admin: &kube::Client,
    count: usize,
    timeout: Duration,
) -> Result<Vec<k8s_openapi::api::core::v1::Pod>> {
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let started = Instant::now();
    loop {
        let deployment = deployments.get("wukong-operator").await?;
        let status = deployment.status.clone().unwrap_or_default();
        let generation = deployment.metadata.generation.unwrap_or_default();
        let done = status.observed_generation == Some(generation)
            && status.updated_replicas == Some(count as i32)
            && status.ready_replicas == Some(count as i32)
            && status.replicas == Some(count as i32);
        if done {
            let pods = wait_for_pods(admin, NS, SELECTOR, count, Duration::from_secs(5)).await?;
            let all: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), NS);
            let listed = all.list(&kube::api::ListParams::default().labels(SELECTOR)).await?.items;
            if listed.iter().all(|p| p.metadata.deletion_timestamp.is_none()) && listed.len() == count {
                return Ok(pods);
            }
        }
        ensure!(
            started.elapsed() < timeout,
            "the Deployment did not roll out {count} replicas in {timeout:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Issue 22: the chart as a platform engineer installs it. The operator's image (scripts/build-image.sh) imported
/// into the lab's node, the two Secrets made first, then `helm install` with `guard.certificates=secret` and the
/// guard's caBundle: both replicas
/// Ready from that image, the webhook configuration with that caBundle in both webhooks (and, on this 1.20 server,
/// without matchConditions, which it does not know); `helm upgrade` with a changed value rolls the Pods to the new
/// arguments; `helm uninstall` leaves nothing of the chart but its CRD (helm never deletes what crds/ installed).
#[tokio::test(flavor = "multi_thread")]
async fn helm_installs_upgrades_and_uninstalls_the_chart_on_a_real_node() -> Result<()> {
    let archive = wukong_e2e::operator_lab::build_operator_image(None)?;
    let node = Node::start(&[]).await?;
    node.import_image_as(&archive, "ghcr.io/wukong-disk-agent/wukong-operator")?;
    let admin = node.client(ADMIN).await?;
    let kubeconfig = node.cluster().kubeconfig(ADMIN)?;
    let kubeconfig = kubeconfig.to_str().context("a UTF-8 kubeconfig path")?;
    let ca_bundle = create_secrets(&admin).await?;
    let chart = helm::chart();
    let chart = chart.to_str().context("a UTF-8 chart path")?;
    let before = present(&admin).await?;

    let started = Instant::now();
    let bundle = format!("guard.caBundle={ca_bundle}");
    let common = ["--kubeconfig", kubeconfig, "--namespace", NS];
    // The guard's certificate from a Secret of the user's (the operator's own is the default: the README's install
    // journey runs that one).
    let install = ["install", "wukong-operator", chart, "--set", "guard.certificates=secret", "--set", &bundle];
    helm::run(&[&install[..], &common[..]].concat())?;
    let pods = rolled_out(&admin, 2, Duration::from_secs(180)).await?;
    println!("helm install → both replicas Ready in {:.1} s", started.elapsed().as_secs_f64());
    for pod in &pods {
        let spec = pod.spec.as_ref().context("a Pod spec")?;
        assert_eq!(spec.containers[0].image.as_deref(), Some("ghcr.io/wukong-disk-agent/wukong-operator:0.1.0"));
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
        assert!(statuses.iter().all(|c| c.ready && c.restart_count == 0), "probes pass, no restarts: {statuses:?}");
        let image_id = statuses.first().map(|c| c.image_id.clone()).unwrap_or_default();
        assert!(image_id.contains("sha256:"), "the imported image runs: {image_id}");
    }
    let webhooks = wukong_e2e::operator_lab::webhook_configurations(&admin);
    let config = webhooks.get("wukong-guard").await?;
    let hooks = config.data["webhooks"].as_array().context("webhooks")?;
    assert_eq!(hooks.len(), 2);
    for hook in hooks {
        assert_eq!(hook["clientConfig"]["caBundle"], json!(ca_bundle), "{}", hook["name"]);
        assert_eq!(
            hook["clientConfig"]["service"],
            json!({"namespace": NS, "name": "wukong-guard", "path": "/validate", "port": 443})
        );
        assert!(hook.get("matchConditions").is_none(), "1.20 has no matchConditions: {hook}");
    }
    // helm 4 applies server-side by default, and does here: the Deployment's fields are helm's by an Apply.
    let deployment = Api::<Deployment>::namespaced(admin.clone(), NS).get("wukong-operator").await?;
    let managers = deployment.metadata.managed_fields.unwrap_or_default();
    let applied =
        managers.iter().any(|m| m.manager.as_deref() == Some("helm") && m.operation.as_deref() == Some("Apply"));
    assert!(applied, "helm's server-side apply owns the Deployment's fields: {managers:?}");
    let args = |pod: &k8s_openapi::api::core::v1::Pod| pod.spec.as_ref().map(|s| s.containers[0].args.clone());
    assert!(pods.iter().all(|p| args(p).flatten().is_some_and(|a| a.contains(&"--log-json".to_string()))));
    let first: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();

    // A changed value rolls the Pods: the new ones run without --log-json, the old ones are gone.
    let started = Instant::now();
    helm::run(
        &[&["upgrade", "wukong-operator", chart, "--reuse-values", "--set", "logJson=false"][..], &common[..]].concat(),
    )?;
    let pods = rolled_out(&admin, 2, Duration::from_secs(180)).await?;
    println!("helm upgrade → rolled to 2 new Ready replicas in {:.1} s", started.elapsed().as_secs_f64());
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        assert!(!first.contains(&name), "{name} is a Pod of the first release");
        let args = args(pod).flatten().unwrap_or_default();
        assert!(
            !args.contains(&"--log-json".to_string()) && args.contains(&"--shutdown-delay-seconds=5".to_string()),
            "{args:?}"
        );
    }
    let status = helm::run(&[&["status", "wukong-operator", "-o", "json"][..], &common[..]].concat())?;
    let status: Value = serde_json::from_str(&status)?;
    assert_eq!((status["version"].as_i64(), status["info"]["status"].as_str()), (Some(2), Some("deployed")));
    assert_eq!(webhooks.get("wukong-guard").await?.data["webhooks"][0]["clientConfig"]["caBundle"], json!(ca_bundle));

    // Uninstall: nothing of the chart is left (the Pods go with their ReplicaSets), but the CRD (crds/ is never
    // deleted: that would delete every Wukong) and the Secrets made before the install. The leader Lease is the
    // operator's own record, not the chart's: it stays with the namespace.
    helm::run(&[&["uninstall", "wukong-operator", "--wait"][..], &common[..]].concat())?;
    let expected = ["Lease wukong-operator", "CustomResourceDefinition wukongs.vm.novasphere.dev"];
    let deadline = Instant::now() + Duration::from_secs(120);
    let left = loop {
        let mut left: Vec<String> = present(&admin).await?.into_iter().filter(|o| !before.contains(o)).collect();
        left.sort();
        if left.iter().all(|o| expected.contains(&o.as_str())) || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut expected = expected.map(str::to_string).to_vec();
    expected.sort();
    assert_eq!(left, expected, "left after helm uninstall");
    let secrets: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &resource("Secret", "", "v1", "secrets"));
    for name in ["wukong-agent-client-tls", "wukong-guard-tls"] {
        secrets.get(name).await.with_context(|| format!("our Secret {name} stays"))?;
    }
    Ok(())
}
