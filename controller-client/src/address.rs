//! Where an agent listens, as a typed address with one spelling per transport (parsed from and printed to the same
//! text): TCP, a Unix socket, vsock (direct AF_VSOCK, or hybrid vsock through a VMM's Unix socket), and KubeVirt's
//! vsock subresource of a VMI.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use tonic::transport::Uri;

/// The largest vsock port and CID that name one peer: `u32::MAX` is `VMADDR_PORT_ANY` and `VMADDR_CID_ANY`.
const VSOCK_ANY: u32 = u32::MAX;

/// Who speaks TLS with the guest on KubeVirt's vsock subresource (its `tls` parameter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum VsockTls {
    /// `tls=false`: KubeVirt carries raw bytes, and this client's mutual TLS with the agent runs inside them (the
    /// agent's `vsock://` listener).
    #[default]
    Agent,
    /// `tls=true`: virt-handler is the guest's TLS client (with KubeVirt's certificate), so this client speaks
    /// plaintext gRPC inside the websocket and its own TLS files are not used (the agent's `kubevirt-vsock://`
    /// listener); who may connect is then the Kubernetes RBAC on the subresource.
    #[value(name = "kubevirt")]
    KubeVirt,
}

impl VsockTls {
    pub const ALLOWED: &str = "agent or kubevirt";

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::KubeVirt => "kubevirt",
        }
    }

    /// The subresource's `tls` parameter.
    pub fn query(self) -> bool {
        self == Self::KubeVirt
    }
}

impl fmt::Display for VsockTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentAddress {
    /// `http://IP:PORT` or `https://IP:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `vsock://CID:PORT`: AF_VSOCK from the VM's host (QEMU with vhost-vsock).
    Vsock { cid: u32, port: u32 },
    /// `hvsock://PATH:PORT`: hybrid vsock, the Unix socket of a VMM (Firecracker, Cloud Hypervisor,
    /// vhost-device-vsock) that forwards to the guest's vsock `port` after a `CONNECT` line.
    HybridVsock { path: PathBuf, port: u32 },
    /// `kubevirt://NAMESPACE/NAME:PORT[?tls=agent|kubevirt]`: KubeVirt's vsock subresource of a VMI, a websocket
    /// through the Kubernetes API (so it needs a Kubernetes client).
    KubeVirtVsock { namespace: String, name: String, port: u32, tls: VsockTls },
}

impl AgentAddress {
    /// Whether a failure that ends at once is worth trying again for a while, not only a few times: over vsock an
    /// agent that is not listening yet (a guest still booting, an agent restarting) is the common case, and its
    /// refusal comes back at once (over KubeVirt's subresource as a websocket that closes: virt-handler upgrades
    /// first and dials the guest after). Over TCP a refusal means that nothing listens, and is reported quickly.
    pub fn waits_for_listener(&self) -> bool {
        matches!(self, Self::Vsock { .. } | Self::HybridVsock { .. } | Self::KubeVirtVsock { .. })
    }

    /// How the agent is reached, for sentences: "at http://10.0.0.7:7443", "over KubeVirt's vsock subresource of
    /// VMI prod/pg-0 (port 7443, tls=false)".
    pub fn place(&self) -> String {
        match self {
            Self::KubeVirtVsock { namespace, name, port, tls } => format!(
                "over KubeVirt's vsock subresource of VMI {namespace}/{name} (port {port}, tls={})",
                tls.query()
            ),
            other => format!("at {other}"),
        }
    }
}

impl FromStr for AgentAddress {
    type Err = BadAddress;

    fn from_str(s: &str) -> Result<Self, BadAddress> {
        let bad = |why: &str| BadAddress { address: s.to_string(), why: why.to_string() };
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.trim_start_matches("//");
            if path.is_empty() || path.contains('\0') {
                return Err(bad("unix: needs a socket path"));
            }
            return Ok(Self::Unix(path.into()));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let uri: Uri = s.parse().map_err(|_| bad("it is not a URL"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(bad("the URL names no host"));
            }
            return Ok(Self::Tcp(s.trim_end_matches('/').to_string()));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| bad("vsock:// needs CID:PORT"))?;
            let cid = vsock_number(cid).ok_or_else(|| bad("the CID is not a number below 4294967295"))?;
            let port = vsock_number(port).ok_or_else(|| bad("the port is not a number below 4294967295"))?;
            return Ok(Self::Vsock { cid, port });
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            // The path may hold ':' itself: the port is after the last one.
            let (path, port) = rest.rsplit_once(':').ok_or_else(|| bad("hvsock:// needs PATH:PORT"))?;
            if !path.starts_with('/') || path.contains('\0') {
                return Err(bad("the socket's path must be absolute (hvsock:///run/vm.vsock:7443)"));
            }
            let port = vsock_number(port).ok_or_else(|| bad("the port is not a number below 4294967295"))?;
            return Ok(Self::HybridVsock { path: path.into(), port });
        }
        if let Some(rest) = s.strip_prefix("kubevirt://") {
            let (rest, tls) = match rest.split_once('?') {
                None => (rest, VsockTls::Agent),
                Some((rest, query)) => {
                    let tls = query.strip_prefix("tls=").and_then(|t| clap::ValueEnum::from_str(t, false).ok());
                    (rest, tls.ok_or_else(|| bad("the only parameter is tls=agent or tls=kubevirt"))?)
                }
            };
            let (vmi, port) = rest.rsplit_once(':').ok_or_else(|| bad("kubevirt:// needs NAMESPACE/NAME:PORT"))?;
            let (namespace, name) = vmi.split_once('/').ok_or_else(|| bad("kubevirt:// needs NAMESPACE/NAME:PORT"))?;
            if !crate::kubevirt::valid_namespace(namespace) || !crate::kubevirt::valid_name(name) {
                return Err(bad("the namespace or VMI name is not a valid Kubernetes name"));
            }
            let port = vsock_number(port).ok_or_else(|| bad("the port is not a number below 4294967295"))?;
            return Ok(Self::KubeVirtVsock { namespace: namespace.into(), name: name.into(), port, tls });
        }
        Err(bad("unknown scheme"))
    }
}

/// A CID or port: decimal digits only (no sign, no spaces), not the wildcard.
fn vsock_number(s: &str) -> Option<u32> {
    let fine = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    fine.then(|| s.parse().ok()).flatten().filter(|n| *n != VSOCK_ANY)
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(url) => f.write_str(url),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Self::HybridVsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            Self::KubeVirtVsock { namespace, name, port, tls: VsockTls::Agent } => {
                write!(f, "kubevirt://{namespace}/{name}:{port}")
            }
            Self::KubeVirtVsock { namespace, name, port, tls } => {
                write!(f, "kubevirt://{namespace}/{name}:{port}?tls={tls}")
            }
        }
    }
}

/// A string that is not an agent address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{address}' is not an agent address ({why}); use http://IP:PORT or https://IP:PORT, unix:PATH, vsock://CID:PORT, \
     hvsock://PATH:PORT (a VMM's hybrid vsock socket) or kubevirt://NAMESPACE/NAME:PORT[?tls=agent|kubevirt]"
)]
pub struct BadAddress {
    pub address: String,
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_form() {
        let parse = |s: &str| s.parse::<AgentAddress>().unwrap();
        assert_eq!(parse("unix:/run/a.sock"), AgentAddress::Unix("/run/a.sock".into()));
        assert_eq!(parse("unix:///run/a.sock"), AgentAddress::Unix("/run/a.sock".into()));
        assert_eq!(parse("http://127.0.0.1:7443/"), AgentAddress::Tcp("http://127.0.0.1:7443".into()));
        assert_eq!(parse("https://[fd00::7]:7443"), AgentAddress::Tcp("https://[fd00::7]:7443".into()));
        assert_eq!(parse("vsock://3:7443"), AgentAddress::Vsock { cid: 3, port: 7443 });
        assert_eq!(
            parse("hvsock:///run/vm:1/v.sock:7443"),
            AgentAddress::HybridVsock { path: "/run/vm:1/v.sock".into(), port: 7443 },
            "the port is after the last ':'"
        );
        let kubevirt =
            |tls| AgentAddress::KubeVirtVsock { namespace: "prod".into(), name: "pg-0".into(), port: 7443, tls };
        assert_eq!(parse("kubevirt://prod/pg-0:7443"), kubevirt(VsockTls::Agent));
        assert_eq!(parse("kubevirt://prod/pg-0:7443?tls=agent"), kubevirt(VsockTls::Agent));
        assert_eq!(parse("kubevirt://prod/pg-0:7443?tls=kubevirt"), kubevirt(VsockTls::KubeVirt));
        for bad in [
            "",
            "unix:",
            "127.0.0.1:7443",
            "ftp://x",
            "http://",
            "vsock://3",
            "vsock://:7443",
            "vsock://3:",
            "vsock://-3:7443",
            "vsock://+3:7443",
            "vsock://3:7443:1",
            "vsock://4294967295:7443",
            "vsock://3:4294967296",
            "vsock:// 3:7443",
            "hvsock://run/v.sock:7443",
            "hvsock:///run/v.sock",
            "hvsock:///run/v.sock:",
            "hvsock:///run/v.sock:x",
            "kubevirt://prod:7443",
            "kubevirt://prod/pg-0",
            "kubevirt://Prod/pg-0:7443",
            "kubevirt://prod/pg_0:7443",
            "kubevirt://prod/pg-0:7443?tls=true",
            "kubevirt://prod/pg-0:7443?port=1",
            "kubevirt://prod/a/b:7443",
        ] {
            let err = bad.parse::<AgentAddress>().unwrap_err();
            assert!(err.to_string().contains("is not an agent address"), "{bad}: {err}");
        }
    }

    #[test]
    fn places_name_the_transport() {
        let vmi =
            AgentAddress::KubeVirtVsock { namespace: "ns".into(), name: "vm".into(), port: 7443, tls: VsockTls::Agent };
        assert_eq!(vmi.place(), "over KubeVirt's vsock subresource of VMI ns/vm (port 7443, tls=false)");
        assert_eq!(AgentAddress::Vsock { cid: 3, port: 7443 }.place(), "at vsock://3:7443");
    }

    fn address() -> impl Strategy<Value = AgentAddress> {
        let name = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?";
        let port = 0..u32::MAX;
        prop_oneof![
            (0..u32::MAX, port.clone()).prop_map(|(cid, port)| AgentAddress::Vsock { cid, port }),
            ("(/[a-zA-Z0-9._:@ -]{1,12}){1,4}", port.clone())
                .prop_map(|(path, port)| AgentAddress::HybridVsock { path: path.into(), port }),
            "/[a-zA-Z0-9._: -][a-zA-Z0-9._:/ -]{0,29}".prop_map(|p| AgentAddress::Unix(p.into())),
            (name, name, port, any::<bool>()).prop_map(|(namespace, name, port, kubevirt)| {
                let tls = if kubevirt { VsockTls::KubeVirt } else { VsockTls::Agent };
                AgentAddress::KubeVirtVsock { namespace, name, port, tls }
            }),
            ("(http|https)", "[0-9]{1,3}(\\.[0-9]{1,3}){3}", 1..u16::MAX)
                .prop_map(|(scheme, ip, port)| AgentAddress::Tcp(format!("{scheme}://{ip}:{port}"))),
        ]
    }

    proptest! {
        /// What is printed parses back to the same address.
        #[test]
        fn display_round_trips(address in address()) {
            prop_assert_eq!(address.to_string().parse::<AgentAddress>().unwrap(), address);
        }

        /// Hostile text never panics, and what parses prints back to an address that parses the same.
        #[test]
        fn hostile_text_is_refused_or_parsed(s in "(unix:|http://|vsock://|hvsock://|kubevirt://)?\\PC{0,40}") {
            if let Ok(address) = s.parse::<AgentAddress>() {
                prop_assert_eq!(address.to_string().parse::<AgentAddress>().unwrap(), address);
            }
        }

        /// Bytes around the numbers are refused, never read as another CID or port.
        #[test]
        fn vsock_numbers_are_digits_only(cid in "\\PC{0,12}", port in "\\PC{0,12}") {
            let parsed = format!("vsock://{cid}:{port}").parse::<AgentAddress>();
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if parsed.is_ok() {
                prop_assert!(digits(&cid) && digits(&port), "{:?}", parsed);
            }
        }
    }
}
