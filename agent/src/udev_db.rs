//! What udev recorded about a block device: its properties (ID_*, DEVLINKS, ...), read through libudev.
//!
//! The trait lets the disk model be built from fixture property maps in tests.

use std::collections::BTreeMap;

/// udev properties of one device.
pub type Properties = BTreeMap<String, String>;

/// Read access to udev's device database.
pub trait UdevDb {
    /// Properties of the block device `kernel_name`, or `None` when udev has not finished processing it.
    fn properties(&self, kernel_name: &str) -> Option<Properties>;
}

/// The real database, through libudev.
#[derive(Debug, Default, Clone, Copy)]
pub struct LibUdevDb;

impl UdevDb for LibUdevDb {
    fn properties(&self, kernel_name: &str) -> Option<Properties> {
        let device = udev::Device::from_subsystem_sysname("block".to_string(), kernel_name.to_string()).ok()?;
        if !device.is_initialized() {
            return None;
        }
        Some(properties_of(&device))
    }
}

/// Copies a device's properties out of libudev (whose types are `!Send`).
fn properties_of(device: &udev::Device) -> Properties {
    device
        .properties()
        .map(|p| (p.name().to_string_lossy().into_owned(), p.value().to_string_lossy().into_owned()))
        .collect()
}

/// A fixed map of devices to properties, for tests.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct FixtureUdevDb(pub BTreeMap<String, Properties>);

#[cfg(test)]
impl UdevDb for FixtureUdevDb {
    fn properties(&self, kernel_name: &str) -> Option<Properties> {
        self.0.get(kernel_name).cloned()
    }
}
