//! Loopback ports for the lab's servers (etcd, kube-apiserver, QEMU's forwards, operators, agents), chosen before
//! the server that binds them starts.
//!
//! A port learnt by binding port 0 and closing again comes from the kernel's ephemeral range: until its server
//! binds it, any `connect()` on the machine may take it as a source port, and a test running in parallel may be
//! handed the same port. CI met the second ("etcd: bind: address already in use"). Ports here come from below the
//! ephemeral range, which the kernel never hands out by itself, and each at most once per test process.

use anyhow::{Result, bail};
use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out; below it live well-known and registered services.
const FIRST: u32 = 20_000;

/// How many ports this process has handed out (or skipped as taken).
static HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A loopback port nothing listens on, below the kernel's ephemeral range, never returned before by this process.
pub fn free_port() -> Result<u16> {
    let ephemeral_start = ephemeral_start();
    let Some(span) = ephemeral_start.checked_sub(FIRST).filter(|span| *span >= 1_000) else {
        bail!(
            "the ephemeral port range starts at {ephemeral_start}, leaving the lab fewer than 1000 ports above \
             {FIRST}; raise net.ipv4.ip_local_port_range's first value"
        );
    };
    // Test binaries run one after another; starting each at its own offset keeps them off each other's ports.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port between {FIRST} and {ephemeral_start}; stop the lab processes still running")
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
}
