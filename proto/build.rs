//! Compiles the agent protocol (and KubeVirt's vsock CA service, which the agent calls) with protox (a pure-Rust protobuf compiler), so no `protoc` is needed on any machine.
//! The encoded descriptor set is kept for gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wukong/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("wukong_descriptor.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    // KubeVirt's vsock CA service: the agent is its client, the lab's virt-handler its server.
    let kubevirt = "proto/kubevirt/vsock/system/v1/system.proto";
    println!("cargo:rerun-if-changed={kubevirt}");
    tonic_prost_build::configure().compile_fds(protox::compile([kubevirt], ["proto"])?)?;
    Ok(())
}
