//! Starts a lab (etcd, kube-apiserver, an operator, a QEMU guest with its agent) and dies in a panic that skips
//! every `Drop`, as a release build's `panic = "abort"` does; before that it prints the lab's directory on a line,
//! then its processes, one `PID START NAME` per line. `tests/tests/lab_lifetime.rs` checks that none of them
//! survives, and that the directory goes too.

use std::io::Write;
use wukong_e2e::Guest;
use wukong_e2e::cluster::Cluster;
use wukong_e2e::operator_lab::{OPERATOR, Operator};
use wukong_e2e::process::{lab_dir, lab_processes};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("{info}");
        std::process::abort()
    }));
    let cluster = Cluster::start(&[OPERATOR]).await?;
    let guest = Guest::boot().await?;
    let _operator = Operator::start(&cluster, "op-abort", guest.agent_port())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", lab_dir()?.display())?;
    for process in lab_processes()? {
        writeln!(out, "{} {} {}", process.pid, process.started, process.name)?;
    }
    out.flush()?;
    panic!("lab-abort: dying on purpose, with the lab running and no Drop to stop it");
}
