//! The QMP client against a real QEMU (no guest: `-machine none` answers QMP at once).

use serde_json::json;
use std::time::Duration;
use wukong_controller_client::qmp::{DiskDevice, DiskPlug, QmpClient, QmpError};

struct Qemu {
    _child: tokio::process::Child,
    dir: tempfile::TempDir,
}

async fn qemu() -> (Qemu, QmpClient) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 is installed (scripts/lib/install-deps.sh)");
    for _ in 0..200 {
        if let Ok(client) = QmpClient::connect(&sock).await {
            return (Qemu { _child: child, dir }, client);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("QEMU's QMP socket did not come up");
}

#[tokio::test]
async fn commands_return_values_and_named_errors() {
    let (_qemu, qmp) = qemu().await;
    let version = qmp.execute("query-version", None).await.unwrap();
    assert!(version["qemu"]["major"].as_u64().unwrap() >= 8, "{version}");
    let err = qmp.execute("no-such-command", None).await.unwrap_err();
    match err {
        QmpError::Command { command, class, desc } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn failed_device_add_leaves_no_block_node_behind() {
    let (qemu, qmp) = qemu().await;
    let image = qemu.dir.path().join("d.raw");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let plug = DiskPlug {
        device: "disk0".into(),
        node: "node0".into(),
        image,
        format: "raw".into(),
        serial: "s1".into(),
        // `-machine none` has no SCSI bus, so device_add fails after blockdev-add succeeded.
        kind: DiskDevice::Scsi { bus: "scsi0.0".into(), device_id: None },
    };
    let err = qmp.plug_disk(&plug).await.unwrap_err();
    assert!(matches!(err, QmpError::Command { ref command, .. } if command == "device_add"), "{err}");
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({"flat": true}))).await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 0, "block node rolled back: {nodes}");
}

#[tokio::test]
async fn connecting_to_a_missing_socket_is_a_named_error() {
    let err = QmpClient::connect(std::path::Path::new("/nonexistent/qmp.sock")).await.err().unwrap();
    assert!(matches!(err, QmpError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/qmp.sock"), "{err}");
}
