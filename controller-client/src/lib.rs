//! Companion of the Wukong disk agent, for `wukongctl` and for operators written in Rust: the agent client, the
//! hypervisor backends (KubeVirt, QEMU) behind one trait, and safe attach and detach.

pub mod address;
pub mod agent_client;
pub mod companion;
pub mod hypervisor;
pub mod kubevirt;
pub mod output;
pub mod pki;
pub mod qemu;
pub mod qmp;
pub mod transport;
