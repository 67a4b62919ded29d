//! Facts about the agent and its guest for `GetAgentInfo`. Host facts come from sysinfo; the boot id, which
//! sysinfo does not know, from procfs.

use crate::tls::ReloadingTls;
use crate::usage::ActiveSource;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use sysinfo::System;
use wukong_proto::v1::AgentInfo;

/// Features this agent implements; clients check these rather than version numbers.
/// "release-deadline": PrepareDetach honours its deadline (an older agent ignores the field, and its release may
/// outlive the call).
pub const CAPABILITIES: &[&str] = &["list", "watch", "wait", "usage", "release", "release-deadline"];

/// What stays fixed for the life of the agent process.
#[derive(Clone)]
pub struct AgentFacts {
    pub started_at: SystemTime,
    pub proc_root: PathBuf,
    /// The TCP and vsock listeners' TLS identity, whose certificate is reported.
    pub tls: Option<Arc<ReloadingTls>>,
    /// The usage scan's process source ("bpf" or "procfs") and why that one.
    pub usage_scanner: (&'static str, String),
}

impl AgentFacts {
    pub fn new(proc_root: PathBuf, tls: Option<Arc<ReloadingTls>>, usage: &ActiveSource) -> Self {
        Self { started_at: SystemTime::now(), proc_root, tls, usage_scanner: (usage.name(), usage.reason.clone()) }
    }

    /// Current facts (uptime and memory are read at each call).
    pub fn info(&self) -> AgentInfo {
        let memory_bytes = System::new()
            .map(|mut sys| {
                sys.refresh_memory();
                sys.total_memory()
            })
            .unwrap_or(0);
        let boot_id = std::fs::read_to_string(self.proc_root.join("sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let certificate = self.tls.as_ref().map(|tls| tls.certificate());
        AgentInfo {
            certificate_not_after: certificate.as_ref().map_or(0, |c| c.not_after),
            certificate_subject: certificate.map(|c| c.subject).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: System::host_name().unwrap_or_default(),
            kernel_release: System::kernel_version().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            boot_id,
            uptime: System::uptime().ok().and_then(|s| Duration::from_secs(s).try_into().ok()),
            started_at: Some(self.started_at.into()),
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            read_only: false,
            disk_count: 0,
            arch: System::cpu_arch(),
            memory_bytes,
            usage_scanner: self.usage_scanner.0.to_string(),
            usage_scanner_reason: self.usage_scanner.1.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_this_machine() {
        let info = AgentFacts::new("/proc".into(), None, &ActiveSource::procfs()).info();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.boot_id.len(), 36, "boot id is a UUID: {:?}", info.boot_id);
        assert!(!info.kernel_release.is_empty());
        assert!(info.memory_bytes > 0);
        assert!(info.capabilities.contains(&"watch".to_string()));
        assert_eq!(info.usage_scanner, "procfs");
    }
}
