//! Loopback ports for the lab's servers (etcd, kube-apiserver, QEMU's forwards, operators, agents), chosen before
//! the server that binds them starts.
//!
//! A port learnt by binding port 0 and closing again comes from the kernel's ephemeral range: until its server
//! binds it, any `connect()` on the machine may take it as a source port, and a test running in parallel may be
//! handed the same port. CI met the second ("etcd: bind: address already in use"). Ports here come from below the
//! ephemeral range, which the kernel never hands out by itself, and each at most once on the machine while the
//! process that took it lives: `scripts/lib/run-tests.sh` runs test binaries side by side, and two of them probing
//! the same free port before either server binds it would both take it. The reservation is an abstract Unix socket
//! named after the port, held until the process ends: the kernel frees it then, even after SIGKILL, and it leaves
//! no file behind.

use anyhow::{Result, bail};
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The lowest port handed out; below it live well-known and registered services.
const FIRST: u32 = 20_000;

/// How many ports this process has handed out (or skipped as taken).
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// The reservations of the ports this process handed out, held until it ends.
static RESERVED: Mutex<Vec<UnixListener>> = Mutex::new(Vec::new());

/// A loopback port nothing listens on, below the kernel's ephemeral range, not handed out before to this or any
/// other process that still runs.
pub fn free_port() -> Result<u16> {
    let ephemeral_start = ephemeral_start();
    let Some(span) = ephemeral_start.checked_sub(FIRST).filter(|span| *span >= 1_000) else {
        bail!(
            "the ephemeral port range starts at {ephemeral_start}, leaving the lab fewer than 1000 ports above \
             {FIRST}; raise net.ipv4.ip_local_port_range's first value"
        );
    };
    // Test binaries run side by side; starting each at its own offset keeps them from racing for the same ports.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && reserve(port)? {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {FIRST} and {ephemeral_start}; stop the lab processes still running")
}

/// Takes the machine-wide reservation of `port`: false if a live process holds it.
fn reserve(port: u16) -> Result<bool> {
    let name = SocketAddr::from_abstract_name(format!("wukong-lab-port-{port}"))?;
    match UnixListener::bind_addr(&name) {
        Ok(held) => {
            RESERVED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(held);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(false),
        Err(e) => bail!("cannot reserve loopback port {port} (abstract Unix socket): {e}"),
    }
}

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read), read once.
fn ephemeral_start() -> u32 {
    static START: OnceLock<u32> = OnceLock::new();
    *START.get_or_init(|| {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32_768)
    })
}

/// `127.0.0.1:PORT` with a port from [`free_port`].
pub fn free_address() -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> Result<()> {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect::<Result<_>>()?;
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
        assert!(ports.iter().all(|p| (FIRST..ephemeral_start()).contains(&u32::from(*p))), "{ports:?}");
        let held: Vec<TcpListener> =
            ports.iter().map(|p| TcpListener::bind(("127.0.0.1", *p))).collect::<Result<_, _>>()?;
        assert_eq!(held.len(), 200);
        Ok(())
    }

    #[test]
    fn a_port_handed_out_is_reserved_for_every_other_process() -> Result<()> {
        let port = free_port()?;
        assert!(!reserve(port)?, "port {port} could be reserved a second time");
        // Another process sees the reservation too: binding its name fails there as well.
        let held = std::process::Command::new("python3")
            .args(["-c", &format!("import socket; socket.socket(socket.AF_UNIX).bind('\\0wukong-lab-port-{port}')")])
            .output()?;
        assert!(!held.status.success(), "another process took port {port}'s reservation");
        assert!(String::from_utf8_lossy(&held.stderr).contains("Address already in use"), "{held:?}");
        Ok(())
    }
}
