//! A QEMU Machine Protocol (QMP) client: commands, events, and the block hot-plug sequences
//! (`blockdev-add` + `device_add`; `device_del` + `DEVICE_DELETED` + `blockdev-del`).
//!
//! QMP answers commands in order, so one command is in flight at a time (the connection lock) and a reader task
//! routes replies to the waiting command and events to subscribers.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, mpsc};

/// How long a single QMP command may take before the connection is considered stuck.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest QMP line accepted from QEMU; anything larger is treated as a protocol error.
const MAX_LINE: usize = 4 << 20;
/// How QEMU (6.2 and later) refuses a `device_del` for a device whose unplug is still pending. The refusal has no
/// side effect; older QEMUs would press a PCIe slot's attention button again, which the guest takes as "cancel".
const UNPLUG_PENDING: &str = "already in the process of unplug";

/// How long a deleted device may keep its block node in use.
const NODE_RELEASE: Duration = Duration::from_secs(10);
/// How often a node still in use is tried again. QEMU drops a deleted device's hold on its node in its RCU
/// thread, which batches for up to 50 ms (measured: 50–52 ms after the device is gone, every time): a short
/// interval ends the wait within a few ms of the node's release instead of up to one interval later.
const NODE_RETRY: Duration = Duration::from_millis(10);

/// What a `device_del` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnplugRequest {
    /// QEMU accepted it: the unplug has started.
    Sent,
    /// QEMU was already unplugging the device and changed nothing.
    AlreadyPending,
}

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}: {source}; is QEMU running with -qmp unix:{path},server=on?")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the QMP connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU sent something that is not QMP: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command { command: String, class: String, desc: String },
    #[error("QEMU did not answer {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("the QMP connection closed; has QEMU exited?")]
    Closed,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

/// How a disk is attached to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskDevice {
    /// `scsi-hd` on a virtio-scsi bus (e.g. `scsi0.0`).
    Scsi { bus: String, device_id: Option<String> },
    /// `virtio-blk-pci` on a hot-pluggable PCI(e) port (e.g. a `pcie-root-port`).
    VirtioBlk { bus: String },
}

/// A disk image to plug into a running guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlug {
    /// QEMU device id (for `device_del`).
    pub device: String,
    /// Block node name (for `blockdev-del`).
    pub node: String,
    /// Image file.
    pub image: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    pub serial: String,
    pub kind: DiskDevice,
}

struct Connection {
    writer: OwnedWriteHalf,
    replies: mpsc::Receiver<Value>,
}

/// A connected QMP client (capabilities negotiated).
pub struct QmpClient {
    connection: Mutex<Connection>,
    events: broadcast::Sender<QmpEvent>,
}

impl QmpClient {
    /// Connects to QEMU's QMP Unix socket and leaves capabilities-negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream =
            UnixStream::connect(path).await.map_err(|source| QmpError::Connect { path: path.into(), source })?;
        let (read, writer) = stream.into_split();
        let mut lines = BufReader::new(read);
        let greeting = read_message(&mut lines).await?.ok_or(QmpError::Closed)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        let (reply_tx, replies) = mpsc::channel(16);
        let (events, _) = broadcast::channel(1024);
        tokio::spawn(route_messages(lines, reply_tx, events.clone()));
        let client = Self { connection: Mutex::new(Connection { writer, replies }), events };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let mut conn = self.connection.lock().await;
        conn.writer.write_all(line.as_bytes()).await?;
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, conn.replies.recv())
            .await
            .map_err(|_| QmpError::Timeout { command: command.to_string(), timeout: COMMAND_TIMEOUT })?
            .ok_or(QmpError::Closed)?;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let err = reply.get("error").cloned().unwrap_or_default();
        Err(QmpError::Command {
            command: command.to_string(),
            class: err.get("class").and_then(Value::as_str).unwrap_or("GenericError").to_string(),
            desc: err.get("desc").and_then(Value::as_str).unwrap_or("no description").to_string(),
        })
    }

    /// Adds the image as a block node, then the disk device with its serial. On a failed `device_add` the block
    /// node is removed again, so a failed plug leaves nothing behind.
    pub async fn plug_disk(&self, plug: &DiskPlug) -> Result<(), QmpError> {
        self.execute(
            "blockdev-add",
            Some(json!({
                "driver": plug.format,
                "node-name": plug.node,
                "file": { "driver": "file", "filename": plug.image },
            })),
        )
        .await?;
        let mut device = json!({ "drive": plug.node, "serial": plug.serial, "id": plug.device });
        match &plug.kind {
            DiskDevice::Scsi { bus, device_id } => {
                device["driver"] = json!("scsi-hd");
                device["bus"] = json!(bus);
                if let Some(id) = device_id {
                    device["device_id"] = json!(id);
                }
            }
            DiskDevice::VirtioBlk { bus } => {
                device["driver"] = json!("virtio-blk-pci");
                device["bus"] = json!(bus);
            }
        }
        if let Err(e) = self.execute("device_add", Some(device)).await {
            let _ = self.execute("blockdev-del", Some(json!({ "node-name": plug.node }))).await;
            return Err(e);
        }
        Ok(())
    }

    /// Asks QEMU to unplug the device. A device whose unplug is already pending is not asked again.
    pub async fn request_unplug(&self, device: &str) -> Result<UnplugRequest, QmpError> {
        match self.execute("device_del", Some(json!({ "id": device }))).await {
            Ok(_) => Ok(UnplugRequest::Sent),
            Err(QmpError::Command { desc, .. }) if desc.contains(UNPLUG_PENDING) => Ok(UnplugRequest::AlreadyPending),
            Err(e) => Err(e),
        }
    }

    /// Removes a block node if it exists (idempotent): what is left of a disk once its device is gone. QEMU lets go
    /// of the node a moment after the device leaves its tree, so "in use" is waited out for a while.
    pub async fn delete_node(&self, node: &str) -> Result<(), QmpError> {
        let started = std::time::Instant::now();
        loop {
            let nodes = self.execute("query-named-block-nodes", Some(json!({ "flat": true }))).await?;
            if !nodes.as_array().is_some_and(|list| list.iter().any(|n| n["node-name"] == json!(node))) {
                return Ok(());
            }
            match self.execute("blockdev-del", Some(json!({ "node-name": node }))).await {
                Ok(_) => return Ok(()),
                Err(QmpError::Command { desc, .. }) if desc.contains("in use") && started.elapsed() < NODE_RELEASE => {
                    tokio::time::sleep(NODE_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Unplugs the device, waits until QEMU reports it gone (`DEVICE_DELETED`), then removes its block node.
    pub async fn unplug_disk(&self, device: &str, node: &str, timeout: Duration) -> Result<(), QmpError> {
        let mut events = self.subscribe();
        self.request_unplug(device).await?;
        let deleted = async {
            loop {
                match events.recv().await {
                    Ok(e) if e.name == "DEVICE_DELETED" && e.data.get("device") == Some(&json!(device)) => {
                        return Ok(());
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Closed),
                }
            }
        };
        tokio::time::timeout(timeout, deleted)
            .await
            .map_err(|_| QmpError::Timeout { command: format!("device_del {device}"), timeout })??;
        self.delete_node(node).await
    }
}

async fn read_message(lines: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Option<Value>, QmpError> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = lines.read_line(&mut line).await?;
        if n == 0 {
            return Ok(None);
        }
        if line.len() > MAX_LINE {
            return Err(QmpError::Protocol(format!("a {}-byte line exceeds the limit", line.len())));
        }
        if !line.trim().is_empty() {
            return serde_json::from_str(&line).map(Some).map_err(|e| QmpError::Protocol(e.to_string()));
        }
    }
}

async fn route_messages(
    mut lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    replies: mpsc::Sender<Value>,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let msg = match read_message(&mut lines).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed");
                return;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or(Value::Null);
            let _ = events.send(QmpEvent { name: name.to_string(), data });
        } else if replies.send(msg).await.is_err() {
            return;
        }
    }
}
