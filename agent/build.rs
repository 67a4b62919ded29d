//! Compiles the in-kernel usage scanner (bpf/usage.bpf.c) to a BPF object that the agent embeds. It needs clang
//! with the BPF target and libbpf's headers (Debian: clang, libbpf-dev; scripts/lib/install-deps.sh installs
//! them). The object is the same for every architecture the agent runs on: CO-RE relocations, resolved against
//! the running kernel's BTF at load time, place every member it reads.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = PathBuf::from("bpf/usage.bpf.c");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("usage.bpf.o");
    println!("cargo:rerun-if-changed=bpf/usage.bpf.c");
    println!("cargo:rerun-if-changed=bpf/vmlinux.h");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".to_string());
    // Little-endian BPF whatever the host: every architecture the agent is built for (x86_64, aarch64) is.
    let status = Command::new(&clang)
        .args(["-target", "bpfel", "-O2", "-g", "-Wall", "-Werror", "-Ibpf", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} to compile {}: {e}; install clang and libbpf-dev (scripts/lib/install-deps.sh), \
                 or name another clang in BPF_CLANG",
                source.display()
            )
        });
    assert!(status.success(), "{clang} could not compile {} ({status})", source.display());
}
