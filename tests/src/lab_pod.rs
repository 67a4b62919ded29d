//! The node lab's test workload, `wukong-lab-pod` (in the image [`IMAGE`], built by
//! `scripts/lab/build-pod-images.sh`). A Pod made from it reports what it sees in a ConfigMap `report-<pod>` that it
//! creates with its own ServiceAccount token, through the `kubernetes` Service: one object proves that the kubelet
//! honoured the Pod's security context, mounted a token, and that Pods reach the API server. It then serves HTTP on
//! [`HTTP_PORT`] (its Pod's name, for Service tests) and, when a certificate is mounted at [`TLS_DIR`], a validating
//! webhook on [`WEBHOOK_PORT`] that refuses objects labelled [`DENY_LABEL`].

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

/// The image, as `build-pod-images.sh` names it in its archive.
pub const IMAGE: &str = "localhost/wukong-lab/pod:1";
/// Plain HTTP: any request gets the Pod's name.
pub const HTTP_PORT: u16 = 8080;
/// HTTPS: the validating webhook, when [`TLS_DIR`] holds `tls.crt` and `tls.key` (a `kubernetes.io/tls` Secret).
pub const WEBHOOK_PORT: u16 = 8443;
pub const TLS_DIR: &str = "/tls";
/// The webhook refuses any object with this label.
pub const DENY_LABEL: &str = "wukong-lab/deny";
/// Comma-separated `ip:port` targets the Pod tries to connect to before reporting (the egress guard's test).
pub const EGRESS_ENV: &str = "EGRESS_PROBES";
/// How long an egress attempt may take before it counts as dropped.
const EGRESS_TIMEOUT: Duration = Duration::from_secs(3);
/// errno for a write to a read-only filesystem.
const EROFS: i32 = 30;

/// The report's ConfigMap for Pod `pod`.
pub fn report_name(pod: &str) -> String {
    format!("report-{pod}")
}

/// The line the Pod prints once its report is written.
pub fn reported(pod: &str) -> String {
    format!("{pod} created {}", report_name(pod))
}

/// Reports, then serves until killed.
pub async fn run() -> Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set; set it in the Pod spec"));
    let (pod, namespace) = (var("POD_NAME")?, var("POD_NAMESPACE")?);
    let mut report = BTreeMap::new();
    report.insert("uid".to_string(), std::fs::metadata("/proc/self")?.uid().to_string());
    let root_read_only = match std::fs::write("/wukong-lab-pod-probe", b"") {
        Err(e) if e.raw_os_error() == Some(EROFS) => "true".to_string(),
        Ok(()) => "false".to_string(),
        Err(e) => format!("writing / failed otherwise: {e}"),
    };
    report.insert("rootReadOnly".to_string(), root_read_only);
    report.insert(
        "apiServer".to_string(),
        format!("{}:{}", var("KUBERNETES_SERVICE_HOST")?, var("KUBERNETES_SERVICE_PORT")?),
    );
    for target in std::env::var(EGRESS_ENV).unwrap_or_default().split(',').filter(|t| !t.is_empty()) {
        let outcome = match tokio::time::timeout(EGRESS_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(_)) => "connected".to_string(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(_) => "timed out".to_string(),
        };
        report.insert(format!("egress-{}", target.replace(':', "-")), outcome);
    }

    let config = kube::Config::incluster().context("no in-cluster configuration (ServiceAccount token)")?;
    let client = kube::Client::try_from(config)?;
    let map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": report_name(&pod), "namespace": namespace}, "data": report,
    }))?;
    Api::<ConfigMap>::namespaced(client, &namespace)
        .create(&PostParams::default(), &map)
        .await
        .context("creating the report through the kubernetes Service with the ServiceAccount token")?;
    // What `kubectl logs` shows: the API server fetches it from the kubelet.
    println!("{}", reported(&pod));

    let http = tokio::spawn(serve_name(pod.clone()));
    let tls = std::path::Path::new(TLS_DIR);
    if tls.join("tls.crt").exists() {
        let leaf = crate::cluster::Leaf {
            cert: std::fs::read_to_string(tls.join("tls.crt"))?,
            key: std::fs::read_to_string(tls.join("tls.key"))?,
        };
        serve_webhook(pod, leaf).await?;
    }
    http.await?
}

/// Answers every HTTP request with the Pod's name.
async fn serve_name(pod: String) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", HTTP_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let body = Bytes::from(format!("{pod}\n"));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let body = body.clone();
                async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body))) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// Serves the validating webhook over TLS.
async fn serve_webhook(pod: String, leaf: crate::cluster::Leaf) -> Result<()> {
    let acceptor = leaf.tls_acceptor()?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", WEBHOOK_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (acceptor, pod) = (acceptor.clone(), pod.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let pod = pod.clone();
                async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let answer = serde_json::to_vec(&admit(&pod, &review)).unwrap_or_default();
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(answer))))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// The AdmissionReview answering `review`: refused, naming this Pod, when the object carries [`DENY_LABEL`].
fn admit(pod: &str, review: &Value) -> Value {
    let request = &review["request"];
    let denied = !request["object"]["metadata"]["labels"][DENY_LABEL].is_null();
    let mut response = json!({"uid": request["uid"], "allowed": !denied});
    if denied {
        response["status"] = json!({"message": format!("Pod {pod} refuses objects labelled {DENY_LABEL}"),
                                    "code": 403});
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}
