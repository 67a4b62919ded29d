//! The lab's Kubernetes API server is genuine and well-behaved: it reports v1.20.2, enforces RBAC per token
//! identity, records writes in its audit log, and leaves no process or port behind when dropped.

use anyhow::Result;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use wukong_e2e::cluster::{ADMIN, Cluster};

#[tokio::test(flavor = "multi_thread")]
async fn a_real_api_server_with_rbac_and_an_audit_log_that_leaves_nothing_behind() -> Result<()> {
    let cluster = Cluster::start(&["nobody"]).await?;
    let admin = cluster.client(ADMIN).await?;
    let version = admin.apiserver_version().await?;
    assert_eq!((version.major.as_str(), version.minor.as_str(), version.git_version.as_str()), ("1", "20", "v1.20.2"));

    let namespaces: Api<Namespace> = Api::all(admin);
    let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": "lab-ns"}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;

    // A least-privileged identity has no rights until a test binds some: RBAC is the real thing.
    let nobody: Api<Namespace> = Api::all(cluster.client("nobody").await?);
    let denied = nobody.list(&ListParams::default()).await.unwrap_err();
    let kube::Error::Api(status) = &denied else { panic!("expected a 403, got {denied}") };
    assert_eq!(status.code, 403);
    assert!(status.message.contains("User \"nobody\" cannot list resource \"namespaces\""), "{}", status.message);

    let created = cluster.audit()?.into_iter().find(|e| {
        e.is_write() && e.verb == "create" && e.object_ref.as_ref().is_some_and(|r| r.name.as_deref() == Some("lab-ns"))
    });
    let created = created.expect("the namespace's creation is in the audit log");
    assert_eq!(created.user.username, ADMIN);
    assert_eq!(created.code(), 201);
    assert_eq!(created.request_object.as_ref().map(|o| o["metadata"]["name"].clone()), Some("lab-ns".into()));
    println!("cluster ready in {:.1} s", cluster.started_in.as_secs_f64());

    let (pids, ports) = cluster.footprint();
    drop(cluster);
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} is gone");
    }
    for port in ports {
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("port {port} is free again: {e}"));
    }
    Ok(())
}
