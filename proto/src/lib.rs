//! The gRPC contract of `wukong.agent.v1.DiskAgent`, generated from `proto/wukong/agent/v1/agent.proto`.

/// Generated messages, client and server for `wukong.agent.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("wukong.agent.v1");
}

/// KubeVirt's `kubevirt.vsock.system.v1.System`, which virt-handler serves to guests at host CID 2, port 1: the CA
/// bundle of its vsock client certificate (`vsock?tls=true`).
pub mod kubevirt_system {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("kubevirt.vsock.system.v1");
}

/// Encoded `FileDescriptorSet` of the protocol, served by gRPC reflection so `grpcurl` needs no local proto files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("wukong_descriptor");

pub mod serial;

/// Default TCP port of the agent.
pub const DEFAULT_PORT: u16 = 7443;

/// The name every agent's certificate is issued for (README, "Declarative disks"): one name for all guests, since a
/// certificate rendered into cloud-init exists before the VM has an address. Clients verify agents against it.
pub const AGENT_SERVER_NAME: &str = "wukong-agent";
