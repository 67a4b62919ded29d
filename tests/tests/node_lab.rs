//! The lab's real node (kubelet, containerd, kube-proxy, kube-controller-manager, kube-scheduler; `node.rs`): Pods
//! from a locally imported image run as their spec says, get a ServiceAccount token and reach the API server; a
//! Service's ClusterIP reaches its Pods from the host and from the API server (a validating webhook served by a
//! Pod); the egress guard drops what would leave the lab; stopping the node leaves nothing on the host.
//!
//! Each test starts its own node; the node's machine lock runs them one after another. They need root and the
//! binaries of `scripts/lib/install-kube.sh`, and fail (never skip) without them.

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, Ca, apply};
use wukong_e2e::lab_pod::{self, DENY_LABEL, EGRESS_ENV, HTTP_PORT, WEBHOOK_PORT, report_name};
use wukong_e2e::node::{self, FORWARD_GUARD, METADATA_ADDRESS, Node, OUTPUT_GUARD, wait_for_pods};

const NS: &str = "lab";
/// The ServiceAccount the lab's Pods run as, allowed to write their reports.
const ACCOUNT: &str = "reporter";
/// From a Deployment's creation to its Pods Ready: 5–15 s on a quiet machine.
const POD_TIMEOUT: Duration = Duration::from_secs(180);
/// kube-proxy and the API server's webhook informer pick up new objects within a few seconds.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The namespace, the Pods' ServiceAccount and its right to create and read ConfigMaps (their reports), and the
/// lab's Pod image in containerd.
async fn prepare(node: &Node) -> Result<kube::Client> {
    node.import_image(&node::lab_images()?.pod)?;
    let admin = node.client(ADMIN).await?;
    let rbac = "rbac.authorization.k8s.io/v1";
    for document in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT, "namespace": NS}}),
        json!({"apiVersion": rbac, "kind": "Role", "metadata": {"name": ACCOUNT, "namespace": NS},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get"]}]}),
        json!({"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": ACCOUNT, "namespace": NS},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
               "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NS}]}),
    ] {
        apply(&admin, &document).await?;
    }
    Ok(admin)
}

/// A Deployment of the lab's Pod image as uid 65532 on a read-only root, with `env` and `tls` (a Secret's name,
/// mounted where the Pod serves its webhook from).
fn deployment(name: &str, env: Value, tls: Option<&str>) -> Value {
    let mut env = env.as_array().cloned().unwrap_or_default();
    for (var, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        env.push(json!({"name": var, "valueFrom": {"fieldRef": {"fieldPath": field}}}));
    }
    let mut pod = json!({
        "serviceAccountName": ACCOUNT,
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true},
        "containers": [{
            "name": "pod", "image": lab_pod::IMAGE, "imagePullPolicy": "Never", "env": env,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                "capabilities": {"drop": ["ALL"]}},
            "readinessProbe": {"httpGet": {"path": "/", "port": HTTP_PORT}, "periodSeconds": 1},
        }],
    });
    if let Some(secret) = tls {
        pod["volumes"] = json!([{"name": "tls", "secret": {"secretName": secret}}]);
        pod["containers"][0]["volumeMounts"] =
            json!([{"name": "tls", "mountPath": lab_pod::TLS_DIR, "readOnly": true}]);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": pod}},
    })
}

/// Deploys `document` and waits for its one Pod to be Ready; returns the Pod's name and how long that took.
async fn run_deployment(admin: &kube::Client, document: &Value) -> Result<(String, Duration)> {
    let started = Instant::now();
    apply(admin, document).await?;
    let app = document["metadata"]["name"].as_str().unwrap_or_default();
    let pods = wait_for_pods(admin, NS, &format!("app={app}"), 1, POD_TIMEOUT).await?;
    Ok((pods[0].metadata.name.clone().unwrap_or_default(), started.elapsed()))
}

/// The report Pod `pod` wrote (see `lab_pod`).
async fn report(admin: &kube::Client, pod: &str) -> Result<BTreeMap<String, String>> {
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let map = maps.get(&report_name(pod)).await.with_context(|| format!("Pod {pod} wrote no report"))?;
    Ok(map.data.unwrap_or_default())
}

/// GET / over plain HTTP; returns the body.
async fn http_get(address: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(address)).await??;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response without a body")?;
    ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{address} answered {head}");
    Ok(body.to_string())
}

#[tokio::test]
async fn a_deployment_from_a_local_image_runs_as_its_pod_spec_says_and_reaches_the_api_server_with_its_token()
-> Result<()> {
    let node = Node::start(&[]).await?;
    let admin = prepare(&node).await?;
    let (pod, first_pod) = run_deployment(&admin, &deployment("prober", json!([]), None)).await?;
    println!(
        "node: API server ready {:.1} s, node Ready {:.1} s, first Pod Ready {:.1} s later; RSS KiB {:?}",
        node.timings.api_server_ready.as_secs_f64(),
        node.timings.node_ready.as_secs_f64(),
        first_pod.as_secs_f64(),
        node.rss()
    );

    let report = report(&admin, &pod).await?;
    assert_eq!(report["uid"], "65532", "{report:?}");
    assert_eq!(report["rootReadOnly"], "true", "{report:?}");
    // Through the `kubernetes` Service's ClusterIP, which kube-proxy sends to the API server's node address.
    assert_eq!(report["apiServer"], "10.0.0.1:443", "{report:?}");
    // The API server authenticated the Pod's write as its ServiceAccount: the token controller minted the token,
    // the ServiceAccount admission plugin mounted it, the kubelet put it in the Pod.
    let writer = node
        .cluster()
        .audit()?
        .into_iter()
        .find(|e| {
            e.is_write()
                && e.verb == "create"
                && e.request_object.as_ref().is_some_and(|o| o["metadata"]["name"] == report_name(&pod).as_str())
        })
        .context("the audit log has no create of the Pod's report")?;
    assert_eq!(writer.user.username, format!("system:serviceaccount:{NS}:{ACCOUNT}"));
    assert_eq!(writer.code(), 201);
    let pods = Api::<Pod>::namespaced(admin.clone(), NS);
    let volumes = serde_json::to_value(pods.get(&pod).await?.spec.unwrap_or_default().volumes)?;
    assert!(volumes.to_string().contains(&format!("{ACCOUNT}-token-")), "no token volume: {volumes}");
    // The API server reaches the kubelet (`kubectl logs`), at the node's InternalIP.
    let logs = pods.logs(&pod, &Default::default()).await?;
    assert!(logs.contains(&lab_pod::reported(&pod)), "the Pod's log: {logs}");
    Ok(())
}

#[tokio::test]
async fn a_service_reaches_its_pod_from_the_host_and_the_api_server_calls_a_webhook_served_by_a_pod() -> Result<()> {
    use base64::Engine;
    let node = Node::start(&[]).await?;
    let admin = prepare(&node).await?;
    let ca = Ca::new("wukong lab webhook CA")?;
    let leaf = ca.leaf("webhook", &[&format!("webhook.{NS}.svc")], rcgen::ExtendedKeyUsagePurpose::ServerAuth)?;
    apply(
        &admin,
        &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                "metadata": {"name": "webhook-tls", "namespace": NS},
                "stringData": {"tls.crt": leaf.cert, "tls.key": leaf.key}}),
    )
    .await?;
    apply(
        &admin,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "webhook", "namespace": NS},
                "spec": {"selector": {"app": "webhook"},
                         "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT},
                                   {"name": "https", "port": 443, "targetPort": WEBHOOK_PORT}]}}),
    )
    .await?;
    let (pod, _) = run_deployment(&admin, &deployment("webhook", json!([]), Some("webhook-tls"))).await?;
    let service = Api::<Service>::namespaced(admin.clone(), NS).get("webhook").await?;
    let cluster_ip = service.spec.and_then(|s| s.cluster_ip).context("the Service has no ClusterIP")?;

    // Host → ClusterIP → Pod, through kube-proxy's iptables rules.
    let started = Instant::now();
    let body = loop {
        match http_get(&format!("{cluster_ip}:80")).await {
            Ok(body) => break body,
            Err(e) if started.elapsed() > SYNC_TIMEOUT => {
                bail!(
                    "the Service's ClusterIP {cluster_ip}:80 never answered: {e:#}; kube-proxy: {}",
                    node.log("kube-proxy")
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    assert_eq!(body.trim(), pod);

    // API server → the webhook's Service → Pod, as the operator's guard is registered.
    apply(
        &admin,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "lab-pod"},
            "webhooks": [{
                "name": "lab-pod.wukong-lab.invalid", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "timeoutSeconds": 5,
                "objectSelector": {"matchExpressions": [{"key": DENY_LABEL, "operator": "Exists"}]},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                           "resources": ["configmaps"]}],
                "clientConfig": {"service": {"namespace": NS, "name": "webhook", "path": "/validate", "port": 443},
                                 "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca.pem)},
            }],
        }),
    )
    .await?;
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let labelled = |name: &str| -> Result<ConfigMap> {
        Ok(serde_json::from_value(json!({"metadata": {"name": name, "labels": {DENY_LABEL: "yes"}}}))?)
    };
    let started = Instant::now();
    let refusal = loop {
        // Until the API server's informer has the configuration, the create passes: try again with a new name.
        let name = format!("refused-{}", started.elapsed().as_millis());
        match maps.create(&PostParams::default(), &labelled(&name)?).await {
            Err(kube::Error::Api(status)) => break status,
            Err(e) => bail!("creating a labelled ConfigMap failed otherwise: {e}"),
            Ok(_) if started.elapsed() > SYNC_TIMEOUT => bail!("the webhook was never called"),
            Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    assert_eq!(refusal.code, 403, "{refusal:?}");
    assert!(
        refusal.message.contains(&format!("Pod {pod} refuses objects labelled {DENY_LABEL}")),
        "the refusal does not come from the webhook's Pod: {refusal:?}"
    );
    let unlabelled: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "allowed"}}))?;
    maps.create(&PostParams::default(), &unlabelled).await.context("an unlabelled ConfigMap was refused")?;
    Ok(())
}

#[tokio::test]
async fn the_egress_guard_drops_what_would_leave_the_lab() -> Result<()> {
    let node = Node::start(&[]).await?;
    // With AWS_EC2_METADATA_DISABLED the kubelet's credential provider sent nothing (13 packets a start without).
    assert_eq!(node.dropped(OUTPUT_GUARD)?, 0, "something on the node sent packets to {METADATA_ADDRESS}");
    let forwarded_before = node.dropped(FORWARD_GUARD)?;
    let admin = prepare(&node).await?;
    // 198.51.100.1 (TEST-NET-2) is routed through the machine's default route, as any address outside would be.
    let targets = format!("198.51.100.1:80,{METADATA_ADDRESS}:80");
    let env = json!([{"name": EGRESS_ENV, "value": targets}]);
    let (pod, _) = run_deployment(&admin, &deployment("egress", env, None)).await?;
    let report = report(&admin, &pod).await?;
    assert_eq!(report["egress-198.51.100.1-80"], "timed out", "{report:?}");
    assert_eq!(report[&format!("egress-{METADATA_ADDRESS}-80")], "timed out", "{report:?}");
    let forwarded = node.dropped(FORWARD_GUARD)? - forwarded_before;
    // Each connect's SYN and at least one retransmission within the Pod's 3 s.
    assert!(forwarded >= 4, "the FORWARD guard dropped {forwarded} packets");

    let host =
        tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect((METADATA_ADDRESS, 80))).await;
    assert!(!matches!(host, Ok(Ok(_))), "the host connected to {METADATA_ADDRESS}");
    assert!(node.dropped(OUTPUT_GUARD)? >= 1, "the OUTPUT guard dropped nothing");
    Ok(())
}

#[tokio::test]
async fn stopping_the_node_removes_what_it_made_on_the_host() -> Result<()> {
    let node = Node::start(&[]).await?;
    let admin = prepare(&node).await?;
    run_deployment(&admin, &deployment("doomed", json!([]), None)).await?;
    // The check sees the node's state while it runs.
    let during = node::leftovers();
    for expected in ["address 10.89.255.1/32 on lo", "link wukong-lab0"] {
        assert!(during.iter().any(|l| l == expected), "{expected} not seen: {during:?}");
    }
    for expected in ["chain KUBE-SERVICES", "chain KUBE-FIREWALL", "chain WUKONG-LAB-FORWARD", "kubepods"] {
        assert!(during.iter().any(|l| l.contains(expected)), "{expected} not seen: {during:?}");
    }
    let teardown = node.stop();
    assert!(teardown.errors.is_empty(), "{:?}", teardown.errors);
    assert!(teardown.leftovers.is_empty(), "left behind: {:?}", teardown.leftovers);
    assert_eq!(teardown.before, teardown.after, "host paths, sysctls or network namespaces changed");
    assert!(teardown.alive.is_empty(), "processes still running: {:?}", teardown.alive);
    Ok(())
}
