//! The lab's Kubernetes API server is genuine and well-behaved: it reports v1.20.2, enforces RBAC per token
//! identity, records writes in its audit log, and leaves no process or port behind when dropped. Its etcd and API
//! server can be killed and restarted as they were, as a fault-injection soak does.

use anyhow::Result;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use std::time::Duration;
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

/// etcd and the API server each killed (SIGKILL) and started again as they were: what was stored is still there
/// (etcd recovers from its write-ahead log), a client made before the restarts works after them, and a watch started
/// before them sees what is created after (the watcher re-watches, or lists again, on its own).
#[tokio::test(flavor = "multi_thread")]
async fn etcd_and_the_api_server_restarted_keep_objects_clients_and_watches() -> Result<()> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let mut cluster = Cluster::start(&[]).await?;
    let admin = cluster.client(ADMIN).await?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "faults"}}))?)
        .await?;
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), "faults");
    let map = |name: &str| serde_json::from_value(json!({"metadata": {"name": name}, "data": {"kept": name}}));
    maps.create(&PostParams::default(), &map("before")?).await?;

    let (seen, mut names) = tokio::sync::mpsc::unbounded_channel();
    let watch = watcher(maps.clone(), watcher::Config::default()).default_backoff().applied_objects();
    let watching = tokio::spawn(watch.for_each(move |object| {
        if let Ok(object) = object {
            let _ = seen.send(object.metadata.name.unwrap_or_default());
        }
        std::future::ready(())
    }));
    assert_eq!(names.recv().await.as_deref(), Some("before"), "the watch is up before the restarts");

    let (pids, ports) = cluster.footprint();
    let etcd_down = cluster.restart_etcd().await?;
    let apiserver_down = cluster.restart_apiserver().await?;
    let (new_pids, same_ports) = cluster.footprint();
    assert!(pids.iter().zip(&new_pids).all(|(old, new)| old != new), "both restarted: {pids:?} → {new_pids:?}");
    assert_eq!(ports, same_ports);
    println!(
        "etcd down {:.2} s, kube-apiserver down {:.2} s (kill to ready)",
        etcd_down.as_secs_f64(),
        apiserver_down.as_secs_f64()
    );

    // The client made before the restarts, its connections to the killed server gone.
    let before = maps.get("before").await?;
    assert_eq!(before.data.unwrap_or_default().get("kept").map(String::as_str), Some("before"), "stored in etcd");
    maps.create(&PostParams::default(), &map("after")?).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        match tokio::time::timeout_at(deadline, names.recv()).await {
            Ok(Some(name)) if name == "after" => break,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the watch started before the restarts never saw the ConfigMap created after"),
        }
    }
    watching.abort();
    Ok(())
}
