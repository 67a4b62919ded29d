//! The plain-QEMU backend: volumes are image files plugged over QMP (`blockdev-add` + `device_add` with the
//! serial; `device_del`, then, once QEMU has deleted the device, `blockdev-del`). The volume name is the QEMU device
//! id.
//!
//! QEMU does not show whether a device's unplug is pending (a PCIe unplug waits for the guest, about 5 s), but it
//! refuses a second `device_del` for it, without side effects, saying "already in the process of unplug"; that
//! refusal is how a retried detach learns it must join the removal instead of failing.

use crate::hypervisor::{DiskBus, Hypervisor, HypervisorError, Removal, VolumeSource, VolumeSpec, VolumeState};
use crate::qmp::{DiskDevice, DiskPlug, QmpClient, QmpError, UnplugRequest};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A QEMU process reached over its QMP socket.
pub struct Qemu {
    qmp: QmpClient,
    socket: PathBuf,
    scsi_bus: String,
    virtio_bus: Option<String>,
}

impl Qemu {
    /// Connects to QMP. SCSI disks go on `scsi0.0` unless [`Qemu::with_scsi_bus`] says otherwise.
    pub async fn connect(socket: &Path) -> Result<Self, HypervisorError> {
        let qmp = QmpClient::connect(socket).await.map_err(|source| qmp_error(socket, source))?;
        Ok(Self { qmp, socket: socket.into(), scsi_bus: "scsi0.0".into(), virtio_bus: None })
    }

    /// The virtio-scsi bus for SCSI disks, e.g. `scsi0.0`.
    pub fn with_scsi_bus(mut self, bus: &str) -> Self {
        self.scsi_bus = bus.into();
        self
    }

    /// The free hot-plug port (e.g. a `pcie-root-port` id) for a virtio-blk disk.
    pub fn with_virtio_bus(mut self, bus: Option<String>) -> Self {
        self.virtio_bus = bus;
        self
    }

    fn node(name: &str) -> String {
        format!("{name}-node")
    }

    fn error(&self, source: QmpError) -> HypervisorError {
        qmp_error(&self.socket, source)
    }
}

fn qmp_error(socket: &Path, source: QmpError) -> HypervisorError {
    HypervisorError::Qmp { what: socket.display().to_string(), source }
}

/// Image formats [`QmpClient::plug_disk`] opens over a file with nothing else to say.
const PLUGGABLE_FORMATS: &[&str] = &["raw", "qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc"];

impl Hypervisor for Qemu {
    fn describe(&self) -> String {
        format!("QEMU at {}", self.socket.display())
    }

    async fn add_volume(&self, volume: &VolumeSpec) -> Result<(), HypervisorError> {
        let VolumeSource::Image { path, format } = &volume.source else {
            return Err(HypervisorError::Invalid {
                what: self.describe(),
                message: "QEMU plugs image files; give --image PATH".into(),
            });
        };
        let kind = match volume.bus {
            DiskBus::Scsi => DiskDevice::Scsi { bus: self.scsi_bus.clone(), device_id: None },
            DiskBus::Virtio => DiskDevice::VirtioBlk {
                bus: self.virtio_bus.clone().ok_or_else(|| HypervisorError::Invalid {
                    what: self.describe(),
                    message: "a virtio-blk disk needs a free hot-plug port; give --virtio-bus".into(),
                })?,
            },
        };
        // A detach interrupted after the unplug leaves the block node behind; it would make blockdev-add fail.
        self.finish_removal(&volume.name).await?;
        let plug = DiskPlug {
            device: volume.name.clone(),
            node: Self::node(&volume.name),
            image: path.clone(),
            format: format.clone(),
            serial: volume.serial.clone(),
            kind,
        };
        self.qmp.plug_disk(&plug).await.map_err(|e| self.error(e))
    }

    async fn remove_volume(&self, name: &str) -> Result<Removal, HypervisorError> {
        match self.qmp.request_unplug(name).await.map_err(|e| self.error(e))? {
            UnplugRequest::Sent => Ok(Removal::Requested),
            UnplugRequest::AlreadyPending => Ok(Removal::AlreadyInProgress),
        }
    }

    async fn finish_removal(&self, name: &str) -> Result<(), HypervisorError> {
        self.qmp.delete_node(&Self::node(name)).await.map_err(|e| self.error(e))
    }

    /// The image file behind device `name`, as `query-block` lists it: the device's block backend names the device
    /// by its id, or, for a virtio-blk-pci (whose backend belongs to its inner virtio-blk device), by that inner
    /// device's path under the id. Whoever plugged it (this client, the lab, a person over QMP), the file and format
    /// QEMU has open are what a move plugs elsewhere.
    async fn volume_source(&self, name: &str) -> Result<Option<VolumeSource>, HypervisorError> {
        if self.volume_state(name).await? == VolumeState::Absent {
            return Ok(None);
        }
        let blocks = self.qmp.execute("query-block", None).await.map_err(|e| self.error(e))?;
        let path = format!("/machine/peripheral/{name}");
        let backend =
            blocks.as_array().into_iter().flatten().find(|b| {
                b["qdev"].as_str().is_some_and(|q| q == name || q == path || q.starts_with(&format!("{path}/")))
            });
        let inserted = backend.map(|b| &b["inserted"]).filter(|i| i.is_object());
        let file = inserted.and_then(|i| i["file"].as_str()).map(Path::new);
        // What this client plugs again: an image file under a format driver alone (a bare file node reads as raw).
        // Anything else (a block device, a network protocol, a "json:{...}" graph, encryption needing secrets)
        // cannot be rebuilt from a file name and a format, and is refused before a move changes anything.
        let format = match inserted.and_then(|i| i["drv"].as_str()) {
            Some("file") => Some("raw"),
            Some(f) if PLUGGABLE_FORMATS.contains(&f) => Some(f),
            _ => None,
        };
        let encrypted = inserted.is_some_and(|i| i["encrypted"] == serde_json::Value::Bool(true));
        match (file, format) {
            (Some(file), Some(format)) if file.is_absolute() && file.is_file() && !encrypted => {
                Ok(Some(VolumeSource::Image { path: file.into(), format: format.into() }))
            }
            _ => Err(HypervisorError::NotFound {
                what: format!("the image file of device '{name}' in {}", self.describe()),
                message: match inserted {
                    Some(i) => format!(
                        "QEMU has it open with driver {} over {}{}, which this client cannot plug elsewhere; give the \
                         file to plug (--image)",
                        i["drv"],
                        i["file"],
                        if encrypted { ", encrypted" } else { "" }
                    ),
                    None => "query-block shows no image in it; give the file to plug (--image)".into(),
                },
            }),
        }
    }

    async fn volume_state(&self, name: &str) -> Result<VolumeState, HypervisorError> {
        let devices = self
            .qmp
            .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await
            .map_err(|e| self.error(e))?;
        let present = devices.as_array().is_some_and(|list| list.iter().any(|d| d["name"] == json!(name)));
        if !present {
            return Ok(VolumeState::Absent);
        }
        let serial = self
            .qmp
            .execute("qom-get", Some(json!({ "path": format!("/machine/peripheral/{name}"), "property": "serial" })))
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        Ok(VolumeState::Ready { serial, target: name.to_string() })
    }
}
