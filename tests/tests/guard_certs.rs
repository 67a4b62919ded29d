//! The admission guard's certificates managed by the operator itself (`--guard-cert-secret`), through a genuine
//! kube-apiserver, with the operator running as the ServiceAccount of deploy/operator.yaml: from nothing (no
//! Secret, an empty caBundle) a replica is unready until the leader made the Secret and the caBundle; with
//! lifetimes of seconds, the serving certificate and the CA rotate while the API server sends reviews without a
//! pause, and not one review fails; a standby replica serves the rotated certificate; a deleted Secret is made again.

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use wukong_e2e::cluster::{ADMIN, Cluster};
use wukong_e2e::kubevirt_lab::{API_SERVER, CONTROLLER, HANDLER, HotplugMode, KubeVirtLab, resource};
use wukong_e2e::operator_lab::{OPERATOR, Operator, install_guard, install_operator, reviews};

const NS: &str = "certs";
const SECRET: &str = "wukong-guard-certs";

/// Every webhook's caBundle of the guard's configuration, as text.
async fn ca_bundles(admin: &kube::Client) -> Result<Vec<String>> {
    let configuration = wukong_e2e::operator_lab::webhook_configurations(admin).get("wukong-guard").await?;
    let hooks = configuration.data["webhooks"].as_array().context("webhooks")?.clone();
    hooks
        .iter()
        .map(|h| {
            let b64 = h["clientConfig"]["caBundle"].as_str().unwrap_or_default();
            Ok(String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64)?)?)
        })
        .collect()
}

/// The Secret's key, as text.
fn key(secret: &Secret, key: &str) -> String {
    let bytes = secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone()).unwrap_or_default();
    String::from_utf8(bytes).unwrap_or_default()
}

/// The certificate a webhook server presents (openssl s_client), as PEM.
fn served_certificate(address: &str) -> Result<String> {
    let output = std::process::Command::new("bash")
        .args(["-c", &format!("openssl s_client -connect {address} </dev/null 2>/dev/null | openssl x509")])
        .output()?;
    ensure!(output.status.success(), "no certificate from {address}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?)
}

async fn ready(operator: &Operator, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    while operator.get("/readyz").await?.0 != 200 {
        if started.elapsed() > within {
            bail!("not ready within {within:?}: {}", operator.get("/readyz").await?.1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_makes_and_rotates_its_certificates_and_no_review_fails() -> Result<()> {
    let cluster = Cluster::start(&[OPERATOR, API_SERVER, CONTROLLER, HANDLER]).await?;
    let kubevirt = KubeVirtLab::start(&cluster, None, NS, HotplugMode::Declarative).await?;
    install_operator(&cluster).await?;
    kubevirt.create_vm("db", true, "127.0.0.1").await?;
    let admin = cluster.client(ADMIN).await?;
    let (a_address, b_address) = (wukong_e2e::ports::free_address()?, wukong_e2e::ports::free_address()?);
    install_guard(&cluster, &format!("https://{a_address}/validate"), None).await?;
    assert!(ca_bundles(&admin).await?.iter().all(String::is_empty), "the guard starts with no caBundle");

    let agent_port = wukong_e2e::ports::free_port()?.to_string();
    let (a_dir, b_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let replica = |identity: &str, address: &str, dir: &tempfile::TempDir| {
        let dir = dir.path().to_str().unwrap().to_string();
        let flags = [
            "--agent-plaintext",
            "--agent-port",
            &agent_port,
            "--webhook-address",
            address,
            "--webhook-cert-dir",
            &dir,
            "--guard-cert-secret",
            SECRET,
            "--guard-cert-extra-names",
            "127.0.0.1",
            // Lifetimes of seconds: a new serving certificate every 8 s, a new CA every 20 s.
            "--guard-cert-validity-seconds",
            "12",
            "--guard-ca-validity-seconds",
            "30",
        ];
        Operator::start_with(&cluster, identity, &flags)
    };
    // Another holder's Lease, running out in 4 s: until this replica leads, nobody makes a certificate, and a
    // replica without one is not ready.
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("wukong-operator".into()),
            namespace: Some("wukong-system".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("ghost".into()),
            lease_duration_seconds: Some(4),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    let mut lease = serde_json::to_value(&lease)?;
    (lease["apiVersion"], lease["kind"]) = ("coordination.k8s.io/v1".into(), "Lease".into());
    wukong_e2e::cluster::apply(&admin, &lease).await?;
    let a = replica("certs-a", &a_address, &a_dir)?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "wukong-system");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, body) = a.get("/readyz").await?;
    assert_ne!(code, 200, "ready without a certificate");
    assert!(body.contains("no usable serving certificate"), "{body}");
    assert!(secrets.get_opt(SECRET).await?.is_none(), "a replica that does not lead made the Secret");
    let took = ready(&a, Duration::from_secs(30)).await?;
    println!("from nothing to a ready replica with its own certificate: {:.1} s", took.as_secs_f64());
    let secret = secrets.get(SECRET).await?;
    let keys: BTreeSet<&str> = secret.data.as_ref().context("data")?.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["ca.crt", "ca.key", "tls.crt", "tls.key"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let bundle = key(&secrets.get(SECRET).await?, "ca.crt");
        if ca_bundles(&admin).await?.iter().all(|b| *b == bundle) {
            break;
        }
        ensure!(Instant::now() < deadline, "the caBundles never became the Secret's CA bundle");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = replica("certs-b", &b_address, &b_dir)?;
    ready(&b, Duration::from_secs(30)).await?;

    // Reviews without a pause for 45 s: the VM opted in, then an annotation changed every 100 ms, each change an
    // update the API server sends to the webhook (a change that unplugs nothing is allowed without a guest).
    let vms = Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        NS,
        &resource("VirtualMachine", "kubevirt.io", "v1", "virtualmachines"),
    );
    let patch = |n: usize| json!({"metadata": {"labels": {"vm.novasphere.dev/guard": "enabled"}, "annotations": {"n": n.to_string()}}});
    vms.patch("db", &PatchParams::default(), &Patch::Merge(patch(0))).await?;
    let before = reviews(&a).await?;
    let (mut certs, mut cas, mut failures, mut updates) = (BTreeSet::new(), BTreeSet::new(), Vec::new(), 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(45) {
        updates += 1;
        if let Err(e) = vms.patch("db", &PatchParams::default(), &Patch::Merge(patch(updates))).await {
            failures.push(format!("{:.1} s: {e}", started.elapsed().as_secs_f64()));
        }
        let secret = secrets.get(SECRET).await?;
        certs.insert(key(&secret, "tls.crt"));
        cas.insert(
            key(&secret, "ca.crt")
                .split_inclusive("-----END CERTIFICATE-----\n")
                .next()
                .unwrap_or_default()
                .to_string(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reviewed = reviews(&a).await? - before;
    println!("{updates} updates, {reviewed} reviews, {} serving certificates, {} CAs", certs.len(), cas.len());
    assert!(failures.is_empty(), "reviews failed during rotations: {failures:?}");
    assert!(reviewed >= updates as u64, "every update was reviewed: {reviewed} < {updates}");
    assert!(certs.len() >= 4, "the serving certificate rotated: {}", certs.len());
    assert!(cas.len() >= 2, "the CA rotated: {}", cas.len());

    // The standby serves the certificate the leader last wrote, without a restart.
    let current = key(&secrets.get(SECRET).await?, "tls.crt");
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(&b_address)?.trim() != current.trim() {
        ensure!(Instant::now() < deadline, "the standby does not serve the current certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A deleted Secret is made again (a new CA), trusted alongside the CA replicas may still serve.
    let old_ca = key(&secrets.get(SECRET).await?, "ca.crt");
    secrets.delete(SECRET, &DeleteParams::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let recreated = loop {
        if let Some(s) = secrets.get_opt(SECRET).await? {
            break s;
        }
        ensure!(Instant::now() < deadline, "the deleted Secret was not made again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let new_bundle = key(&recreated, "ca.crt");
    assert_ne!(new_bundle, old_ca);
    let first_old = old_ca.split_inclusive("-----END CERTIFICATE-----\n").next().unwrap_or_default();
    assert!(new_bundle.contains(first_old.trim()), "the CA replicas served until now stays trusted");
    for n in 0..20 {
        vms.patch("db", &PatchParams::default(), &Patch::Merge(patch(100_000 + n))).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
