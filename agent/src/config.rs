//! Agent configuration: command-line flags over an optional TOML file over defaults. Built once at start and
//! passed down; there is no global configuration.

use crate::roots::HostRoots;
use crate::usage::ScannerChoice;
use clap::Parser;
use serde::Deserialize;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Default Unix socket for local tools.
pub const DEFAULT_SOCKET: &str = "/run/wukong-agent/agent.sock";
/// Default directory of the release journal: on tmpfs, so it lives exactly as long as the guest's boot.
pub const DEFAULT_STATE_DIR: &str = "/run/wukong-agent/releases";
/// Where virt-handler serves KubeVirt's CA bundle to every guest: the host (CID 2), port 1.
pub const DEFAULT_KUBEVIRT_CA: CaSource = CaSource::Vsock { cid: 2, port: 1 };

/// Command line of `wukong-agent`.
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "wukong-agent", version, about = "Knows every disk of this guest by serial and who uses it")]
pub struct Args {
    /// Address to serve gRPC on; repeatable. TCP: `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT` (default port 7443).
    /// vsock: `vsock://PORT` (any CID; served like TCP: mutual TLS, or plaintext with --insecure-plaintext), or
    /// `kubevirt-vsock://PORT` (KubeVirt's vsock subresource with tls=true). Default: 127.0.0.1:7443.
    #[arg(long = "listen", value_name = "ADDRESS")]
    pub listen: Vec<String>,
    /// Unix socket for local tools (root only). Default: /run/wukong-agent/agent.sock.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Do not serve on a Unix socket.
    #[arg(long, conflicts_with = "socket")]
    pub no_socket: bool,
    /// TOML configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory where releases are journalled, so a restarted agent can finish or undo them.
    /// Default: /run/wukong-agent/releases.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Server certificate (PEM) for TLS on the TCP and vsock listeners (kubevirt-vsock ones present it too). With
    /// --tls-key and --tls-client-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the server certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the client certificates the agent accepts: TLS here always means mutual TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Refuse PrepareDetach and CancelDetach to every network client (the root-only Unix socket still may).
    #[arg(long)]
    pub read_only: bool,
    /// A client identity (certificate common name or DNS name) allowed to call PrepareDetach and CancelDetach;
    /// repeatable. When any is given, only those clients may (and the Unix socket).
    #[arg(long = "allow-client", value_name = "NAME")]
    pub allow_clients: Vec<String>,
    /// Serve plaintext gRPC on non-loopback and vsock addresses. Anyone who can reach the port can then use the
    /// agent.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Where kubevirt-vsock:// listeners fetch KubeVirt's CA bundle: `vsock://CID:PORT` or `unix:PATH`.
    /// Default: vsock://2:1 (virt-handler).
    #[arg(long, value_name = "ADDRESS")]
    pub kubevirt_ca: Option<String>,
    /// Log filter (tracing syntax), e.g. `info` or `wukong_agent=debug`.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// How the usage scan finds processes: `bpf` (in-kernel iterators; the agent does not start without them),
    /// `procfs` (every process in /proc), or `auto` (bpf where it loads, else procfs). Default: auto.
    #[arg(long, value_name = "SCANNER")]
    pub usage_scanner: Option<ScannerChoice>,
}

/// The configuration file. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<Vec<String>>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub read_only: Option<bool>,
    pub allow_clients: Option<Vec<String>>,
    pub limits: Option<Limits>,
    pub insecure_plaintext: Option<bool>,
    pub kubevirt_ca: Option<String>,
    pub log: Option<String>,
    pub usage_scanner: Option<ScannerChoice>,
    pub proc_root: Option<PathBuf>,
    pub sys_root: Option<PathBuf>,
    pub dev_root: Option<PathBuf>,
    pub run_root: Option<PathBuf>,
}

/// The files of the agent's TLS identity and of the CA its clients must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Who may change the guest (PrepareDetach, CancelDetach). The root-only Unix socket always may.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// No network client may.
    pub read_only: bool,
    /// When not empty, only TLS clients with one of these identities may. Callers through a kubevirt-vsock://
    /// listener are not named by it: the API server's RBAC decided who reaches the agent that way.
    pub allowed_clients: Vec<String>,
}

/// One address the agent serves gRPC on (`--listen`, `listen = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// `IP`, `IP:PORT` or `[IPv6]:PORT`.
    Tcp(SocketAddr),
    /// `vsock://PORT`: AF_VSOCK on any CID of the guest, served as TCP is (the agent's own mutual TLS; plaintext only
    /// with `insecure_plaintext`). KubeVirt's vsock subresource with `tls=false` reaches it, the client's TLS inside.
    Vsock { port: u32 },
    /// `kubevirt-vsock://PORT`: AF_VSOCK for KubeVirt's vsock subresource with `tls=true`, where virt-handler is the
    /// TLS client and presents KubeVirt's vsock client certificate.
    KubeVirtVsock { port: u32 },
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Vsock { port } => write!(f, "vsock://{port}"),
            Listen::KubeVirtVsock { port } => write!(f, "kubevirt-vsock://{port}"),
        }
    }
}

/// Where KubeVirt's CA bundle is fetched from (`kubevirt_ca`): a gRPC `kubevirt.vsock.system.v1.System` service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `vsock://CID:PORT`; virt-handler serves it at `vsock://2:1`.
    Vsock { cid: u32, port: u32 },
    /// `unix:PATH`: the same service on a Unix socket (a relay, or a test).
    Unix(PathBuf),
}

impl fmt::Display for CaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaSource::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            CaSource::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Bounds that keep one client from starving the others. Each has a default; the file may lower or raise them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests running at once, over all connections.
    pub max_requests: usize,
    /// Requests running at once on one connection.
    pub max_requests_per_connection: usize,
    /// Open WatchDisks streams.
    pub max_watchers: usize,
    /// Longest a watch stays open, in seconds; the client then opens a new one (it gets a fresh snapshot).
    pub max_watch_seconds: u64,
    /// Largest request message, in bytes.
    pub max_message_bytes: usize,
    /// Longest any request may run, in seconds; a client's shorter deadline wins. Watches are bounded by
    /// `max_watch_seconds` instead.
    pub request_timeout_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_requests: 64,
            max_requests_per_connection: 16,
            max_watchers: 32,
            max_watch_seconds: 3600,
            max_message_bytes: 64 * 1024,
            // Above the longest WaitForDisk (600 s), which has its own, clearer, deadline error.
            request_timeout_seconds: 900,
        }
    }
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Vec<Listen>,
    pub socket: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub tls: Option<TlsFiles>,
    pub access: Access,
    pub limits: Limits,
    pub insecure_plaintext: bool,
    /// Used only by kubevirt-vsock:// listeners.
    pub kubevirt_ca: CaSource,
    pub log: String,
    pub usage_scanner: ScannerChoice,
    pub roots: HostRoots,
}

/// Why a listen address is refused. The address is quoted as given (`{:?}`): it may come from a file, and a
/// control character in it must not break the log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    #[error(
        "{0:?} is not a listen address; use IP, IP:PORT, [IPv6]:PORT, vsock://PORT or kubevirt-vsock://PORT, e.g. \
         0.0.0.0:7443, [::]:7443 or vsock://7443"
    )]
    Unknown(String),
    #[error("{0:?} is an IPv6 address without brackets; write [IPv6] or [IPv6]:PORT, e.g. [::1] or [::]:7443")]
    UnbracketedIpv6(String),
    #[error("{0:?} has no valid TCP port; give one from 0 to 65535, e.g. 0.0.0.0:7443")]
    TcpPort(String),
    #[error("{0:?} has no valid vsock port; give one from 1 to 4294967294, e.g. {1}7443")]
    VsockPort(String, &'static str),
    #[error(
        "{0:?} names a CID, but a vsock listener takes connections to any CID of this guest; give only the port, \
         e.g. {1}7443"
    )]
    VsockCid(String, &'static str),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    // One line: toml's own Display is a multi-line excerpt of the file, which a journal shows as noise.
    #[error("the configuration file {path} is not valid{}: {message}", at_line(*line))]
    Parse { path: PathBuf, line: Option<usize>, message: String },
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(
        "refusing to serve plaintext gRPC on {0}, which is not a loopback address: anyone who reaches it could \
         unmount this guest's disks. Configure TLS (tls_cert, tls_key, tls_client_ca), listen on 127.0.0.1, or pass \
         --insecure-plaintext if this is a lab"
    )]
    PlaintextOffLoopback(SocketAddr),
    #[error(
        "refusing to serve plaintext gRPC on vsock://{0}: the host reaches it, and through KubeVirt's vsock \
         subresource so does anyone the cluster's RBAC lets in; any of them could unmount this guest's disks. \
         Configure TLS (tls_cert, tls_key, tls_client_ca), or pass --insecure-plaintext if this is a lab"
    )]
    PlaintextOnVsock(u32),
    #[error(
        "{0:?} is not a KubeVirt CA source; use vsock://CID:PORT (virt-handler serves it at vsock://2:1) or \
         unix:PATH"
    )]
    BadKubeVirtCa(String),
    #[error("TLS needs all of tls_cert, tls_key and tls_client_ca; {0} is missing")]
    IncompleteTls(&'static str),
}

impl Config {
    /// Combines flags, the file they name (if any) and defaults.
    pub fn load(args: &Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    fn merge(args: &Args, file: FileConfig) -> Result<Self, ConfigError> {
        let listen_raw = if args.listen.is_empty() {
            file.listen.unwrap_or_else(|| vec!["127.0.0.1".to_string()])
        } else {
            args.listen.clone()
        };
        let listen = listen_raw.iter().map(|s| parse_listen(s)).collect::<Result<Vec<_>, _>>()?;
        let insecure_plaintext = args.insecure_plaintext || file.insecure_plaintext.unwrap_or(false);
        let tls = match (
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
            args.tls_client_ca.clone().or(file.tls_client_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles { cert, key, client_ca }),
            (None, _, _) => return Err(ConfigError::IncompleteTls("tls_cert")),
            (_, None, _) => return Err(ConfigError::IncompleteTls("tls_key")),
            (_, _, None) => return Err(ConfigError::IncompleteTls("tls_client_ca")),
        };
        if tls.is_none() && !insecure_plaintext {
            for listen in &listen {
                match listen {
                    Listen::Tcp(addr) if !addr.ip().is_loopback() => {
                        return Err(ConfigError::PlaintextOffLoopback(*addr));
                    }
                    Listen::Vsock { port } => return Err(ConfigError::PlaintextOnVsock(*port)),
                    // kubevirt-vsock:// is always TLS (KubeVirt's), whatever the agent's own TLS files.
                    Listen::Tcp(_) | Listen::KubeVirtVsock { .. } => {}
                }
            }
        }
        let kubevirt_ca = match args.kubevirt_ca.clone().or(file.kubevirt_ca) {
            Some(text) => parse_ca_source(&text)?,
            None => DEFAULT_KUBEVIRT_CA,
        };
        let mut allowed_clients = args.allow_clients.clone();
        allowed_clients.extend(file.allow_clients.unwrap_or_default());
        let socket = if args.no_socket {
            None
        } else {
            Some(args.socket.clone().or(file.socket).unwrap_or_else(|| DEFAULT_SOCKET.into()))
        };
        let defaults = HostRoots::default();
        Ok(Self {
            listen,
            socket,
            state_dir: args.state_dir.clone().or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            tls,
            access: Access { read_only: args.read_only || file.read_only.unwrap_or(false), allowed_clients },
            limits: file.limits.unwrap_or_default(),
            insecure_plaintext,
            kubevirt_ca,
            log: args.log.clone().or(file.log).unwrap_or_else(|| "info".to_string()),
            usage_scanner: args.usage_scanner.or(file.usage_scanner).unwrap_or_default(),
            roots: HostRoots {
                proc: file.proc_root.unwrap_or(defaults.proc),
                sys: file.sys_root.unwrap_or(defaults.sys),
                dev: file.dev_root.unwrap_or(defaults.dev),
                run: file.run_root.unwrap_or(defaults.run),
            },
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        line: e.span().map(|span| text.bytes().take(span.start).filter(|&b| b == b'\n').count() + 1),
        message: e.message().trim().replace('\n', "; "),
    })
}

fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!(" at line {n}")).unwrap_or_default()
}

/// Parses a listen address: `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT` (TCP; the port defaults to 7443),
/// `vsock://PORT` or `kubevirt-vsock://PORT`. IPv6 needs its brackets even without a port: `::1:7443` is a valid
/// IPv6 address, so a port after an unbracketed one could not be told from part of it.
pub fn parse_listen(s: &str) -> Result<Listen, ListenError> {
    const VSOCK: &str = "vsock://";
    const KUBEVIRT_VSOCK: &str = "kubevirt-vsock://";
    if let Some(port) = s.strip_prefix(VSOCK) {
        return vsock_port(s, port, VSOCK).map(|port| Listen::Vsock { port });
    }
    if let Some(port) = s.strip_prefix(KUBEVIRT_VSOCK) {
        return vsock_port(s, port, KUBEVIRT_VSOCK).map(|port| Listen::KubeVirtVsock { port });
    }
    let unknown = || ListenError::Unknown(s.to_string());
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, port) = rest.split_once(']').ok_or_else(unknown)?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| unknown())?;
        let port = match port {
            "" => wukong_proto::DEFAULT_PORT,
            _ => tcp_port(s, port.strip_prefix(':').ok_or_else(unknown)?)?,
        };
        return Ok(Listen::Tcp(SocketAddr::new(ip.into(), port)));
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Err(ListenError::UnbracketedIpv6(s.to_string()));
    }
    let (ip, port) = match s.split_once(':') {
        Some((_, port)) if port.contains(':') => return Err(unknown()),
        Some((ip, port)) => (ip, Some(port)),
        None => (s, None),
    };
    let ip: Ipv4Addr = ip.parse().map_err(|_| unknown())?;
    let port = port.map_or(Ok(wukong_proto::DEFAULT_PORT), |port| tcp_port(s, port))?;
    Ok(Listen::Tcp(SocketAddr::new(ip.into(), port)))
}

/// Digits only: Rust's integer parsing also takes a leading `+`, which no address has.
fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn tcp_port(s: &str, port: &str) -> Result<u16, ListenError> {
    digits(port).ok_or_else(|| ListenError::TcpPort(s.to_string()))
}

/// A vsock port the agent can listen on: not 0, and not VMADDR_PORT_ANY (u32::MAX, "any port").
fn vsock_port(s: &str, port: &str, scheme: &'static str) -> Result<u32, ListenError> {
    if port.contains(':') {
        return Err(ListenError::VsockCid(s.to_string(), scheme));
    }
    digits(port).filter(|p| (1..u32::MAX).contains(p)).ok_or_else(|| ListenError::VsockPort(s.to_string(), scheme))
}

/// Parses `kubevirt_ca`: `vsock://CID:PORT` or `unix:PATH`.
pub fn parse_ca_source(s: &str) -> Result<CaSource, ConfigError> {
    let bad = || ConfigError::BadKubeVirtCa(s.to_string());
    if let Some(path) = s.strip_prefix("unix:") {
        return if path.is_empty() { Err(bad()) } else { Ok(CaSource::Unix(path.into())) };
    }
    let (cid, port) = s.strip_prefix("vsock://").and_then(|rest| rest.split_once(':')).ok_or_else(bad)?;
    Ok(CaSource::Vsock { cid: digits(cid).ok_or_else(bad)?, port: digits(port).ok_or_else(bad)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("wukong-agent").chain(list.iter().copied())).unwrap()
    }

    fn tcp(addr: &str) -> Listen {
        Listen::Tcp(addr.parse().unwrap())
    }

    #[test]
    fn defaults_are_loopback_only() {
        let c = Config::load(&args(&[])).unwrap();
        assert_eq!(c.listen, vec![tcp("127.0.0.1:7443")]);
        assert_eq!(c.socket.as_deref(), Some(Path::new(DEFAULT_SOCKET)));
        assert!(!c.insecure_plaintext);
        assert_eq!(c.kubevirt_ca, CaSource::Vsock { cid: 2, port: 1 });
        assert_eq!(c.roots, HostRoots::default());
    }

    #[test]
    fn listen_forms() {
        for (text, listen, shown) in [
            ("10.0.2.15", tcp("10.0.2.15:7443"), "10.0.2.15:7443"),
            ("0.0.0.0:9000", tcp("0.0.0.0:9000"), "0.0.0.0:9000"),
            ("127.0.0.1:0", tcp("127.0.0.1:0"), "127.0.0.1:0"),
            ("[::1]:1", tcp("[::1]:1"), "[::1]:1"),
            ("[::]", tcp("[::]:7443"), "[::]:7443"),
            ("[fd00::2]:7443", tcp("[fd00::2]:7443"), "[fd00::2]:7443"),
            ("vsock://7443", Listen::Vsock { port: 7443 }, "vsock://7443"),
            ("vsock://4294967294", Listen::Vsock { port: u32::MAX - 1 }, "vsock://4294967294"),
            ("kubevirt-vsock://7444", Listen::KubeVirtVsock { port: 7444 }, "kubevirt-vsock://7444"),
        ] {
            assert_eq!(parse_listen(text), Ok(listen), "{text}");
            assert_eq!(listen.to_string(), shown, "shown as it is written");
        }
    }

    #[test]
    fn bad_listen_addresses_are_named_errors() {
        use ListenError::*;
        let unknown = |s: &str| Unknown(s.into());
        let vsock_port = |s: &str| VsockPort(s.into(), "vsock://");
        let cases = [
            ("", unknown("")),
            ("localhost", unknown("localhost")),
            ("localhost:7443", unknown("localhost:7443")),
            ("1.2.3", unknown("1.2.3")),
            (" 127.0.0.1", unknown(" 127.0.0.1")),
            ("[1.2.3.4]:1", unknown("[1.2.3.4]:1")),
            ("[::1", unknown("[::1")),
            ("[::1]7443", unknown("[::1]7443")),
            ("tcp://1.2.3.4:7443", unknown("tcp://1.2.3.4:7443")),
            ("VSOCK://7443", unknown("VSOCK://7443")),
            ("vsock:7443", unknown("vsock:7443")),
            ("fe80::1%eth0", unknown("fe80::1%eth0")),
            ("::1", UnbracketedIpv6("::1".into())),
            ("::1:7443", UnbracketedIpv6("::1:7443".into())),
            ("fd00::2", UnbracketedIpv6("fd00::2".into())),
            ("1.2.3.4:99999", TcpPort("1.2.3.4:99999".into())),
            ("1.2.3.4:", TcpPort("1.2.3.4:".into())),
            ("1.2.3.4:+80", TcpPort("1.2.3.4:+80".into())),
            ("[::1]:", TcpPort("[::1]:".into())),
            ("[::1]:65536", TcpPort("[::1]:65536".into())),
            ("vsock://", vsock_port("vsock://")),
            ("vsock://x", vsock_port("vsock://x")),
            ("vsock://+7443", vsock_port("vsock://+7443")),
            ("vsock://-1", vsock_port("vsock://-1")),
            ("vsock://0", vsock_port("vsock://0")),
            ("vsock://4294967295", vsock_port("vsock://4294967295")),
            ("vsock://99999999999", vsock_port("vsock://99999999999")),
            ("vsock://7443/", vsock_port("vsock://7443/")),
            ("kubevirt-vsock://0", VsockPort("kubevirt-vsock://0".into(), "kubevirt-vsock://")),
            ("kubevirt-vsock://", VsockPort("kubevirt-vsock://".into(), "kubevirt-vsock://")),
            ("vsock://3:7443", VsockCid("vsock://3:7443".into(), "vsock://")),
            ("kubevirt-vsock://2:1", VsockCid("kubevirt-vsock://2:1".into(), "kubevirt-vsock://")),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_listen(text), Err(expected), "{text:?}");
        }
        assert_eq!(
            parse_listen("vsock://x").unwrap_err().to_string(),
            "\"vsock://x\" has no valid vsock port; give one from 1 to 4294967294, e.g. vsock://7443"
        );
        assert_eq!(
            parse_listen("::1").unwrap_err().to_string(),
            "\"::1\" is an IPv6 address without brackets; write [IPv6] or [IPv6]:PORT, e.g. [::1] or [::]:7443"
        );
        let err = Config::load(&args(&["--listen", "0.0.0.0:7443\nlisten"])).unwrap_err();
        assert!(matches!(err, ConfigError::Listen(TcpPort(_))), "{err}");
        assert!(!err.to_string().contains('\n'), "a control character stays quoted: {err}");
    }

    #[test]
    fn plaintext_off_loopback_needs_the_explicit_flag() {
        let err = Config::load(&args(&["--listen", "0.0.0.0"])).unwrap_err();
        assert!(matches!(err, ConfigError::PlaintextOffLoopback(_)));
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let c = Config::load(&args(&["--listen", "0.0.0.0", "--insecure-plaintext", "--no-socket"])).unwrap();
        assert_eq!(c.listen, vec![tcp("0.0.0.0:7443")]);
        assert_eq!(c.socket, None);
        let c = Config::load(&args(&["--listen", "[::1]:9", "--listen", "127.0.0.1:0"])).unwrap();
        assert_eq!(c.listen, vec![tcp("[::1]:9"), tcp("127.0.0.1:0")], "loopback, either family, may be plaintext");
    }

    /// The host reaches a vsock port, and so does anyone KubeVirt's subresource lets in: plaintext there is as
    /// open as on a non-loopback address.
    #[test]
    fn plaintext_on_vsock_needs_the_explicit_flag() {
        let err = Config::load(&args(&["--listen", "127.0.0.1", "--listen", "vsock://7443"])).unwrap_err();
        assert!(matches!(err, ConfigError::PlaintextOnVsock(7443)), "{err}");
        assert!(err.to_string().starts_with("refusing to serve plaintext gRPC on vsock://7443: "), "{err}");
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let c = Config::load(&args(&["--listen", "vsock://7443", "--insecure-plaintext"])).unwrap();
        assert_eq!(c.listen, vec![Listen::Vsock { port: 7443 }]);
        let tls = ["--tls-cert", "a.crt", "--tls-key", "a.key", "--tls-client-ca", "ca.crt"];
        let c = Config::load(&args(&[&["--listen", "vsock://7443"][..], &tls].concat())).unwrap();
        assert_eq!(c.listen, vec![Listen::Vsock { port: 7443 }], "with the agent's mutual TLS");
        // KubeVirt's mode is TLS of its own: no TLS files and no flag needed.
        let c = Config::load(&args(&["--listen", "kubevirt-vsock://7444"])).unwrap();
        assert_eq!(c.listen, vec![Listen::KubeVirtVsock { port: 7444 }]);
    }

    #[test]
    fn kubevirt_ca_sources() {
        assert_eq!(parse_ca_source("vsock://2:1").unwrap(), CaSource::Vsock { cid: 2, port: 1 });
        assert_eq!(parse_ca_source("unix:/run/ca.sock").unwrap(), CaSource::Unix("/run/ca.sock".into()));
        for bad in ["", "vsock://2", "vsock://:1", "vsock://2:", "vsock://x:1", "vsock://2:+1", "unix:", "/run/ca.sock"]
        {
            assert!(matches!(parse_ca_source(bad), Err(ConfigError::BadKubeVirtCa(_))), "{bad:?}");
        }
        assert_eq!(parse_ca_source("vsock://2:1").unwrap().to_string(), "vsock://2:1");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "kubevirt_ca = \"unix:/tmp/ca.sock\"\n").unwrap();
        let c = Config::load(&args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.kubevirt_ca, CaSource::Unix("/tmp/ca.sock".into()));
        let c = Config::load(&args(&["--config", path.to_str().unwrap(), "--kubevirt-ca", "vsock://2:9"])).unwrap();
        assert_eq!(c.kubevirt_ca, CaSource::Vsock { cid: 2, port: 9 }, "the flag wins");
        let err = Config::load(&args(&["--kubevirt-ca", "vsock://host:1"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"vsock://host:1\" is not a KubeVirt CA source; use vsock://CID:PORT (virt-handler serves it at \
             vsock://2:1) or unix:PATH"
        );
    }

    #[test]
    fn tls_opens_non_loopback_and_needs_all_three_files() {
        let c = Config::load(&args(&[
            "--listen",
            "0.0.0.0",
            "--tls-cert",
            "a.crt",
            "--tls-key",
            "a.key",
            "--tls-client-ca",
            "ca.crt",
        ]))
        .unwrap();
        assert_eq!(c.tls.as_ref().map(|t| t.client_ca.clone()), Some("ca.crt".into()));
        assert!(!c.insecure_plaintext);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "tls_cert = \"a.crt\"\ntls_client_ca = \"ca.crt\"\n").unwrap();
        let err = Config::load(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert_eq!(err.to_string(), "TLS needs all of tls_cert, tls_key and tls_client_ca; tls_key is missing");
    }

    #[test]
    fn access_and_limits_come_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "allow_clients = [\"operator\"]\n[limits]\nmax_watchers = 4\n").unwrap();
        let c = Config::load(&args(&["--config", path.to_str().unwrap(), "--allow-client", "ops2"])).unwrap();
        assert_eq!(c.access.allowed_clients, ["ops2", "operator"]);
        assert!(!c.access.read_only);
        assert_eq!(c.limits.max_watchers, 4);
        assert_eq!(c.limits.max_requests, Limits::default().max_requests, "unset limits keep their default");
        std::fs::write(&path, "[limits]\nmax_watcherz = 4\n").unwrap();
        assert!(Config::load(&args(&["--config", path.to_str().unwrap()])).is_err(), "typos are refused");
    }

    #[test]
    fn file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "listen = [\"127.0.0.2:1\"]\nsocket = \"/tmp/x.sock\"\nlog = \"debug\"\n").unwrap();
        let c = Config::load(&args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.listen, vec![tcp("127.0.0.2:1")]);
        assert_eq!(c.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
        assert_eq!(c.log, "debug");
        let c = Config::load(&args(&["--config", path.to_str().unwrap(), "--listen", "127.0.0.3"])).unwrap();
        assert_eq!(c.listen, vec![tcp("127.0.0.3:7443")]);
    }

    #[test]
    fn shipped_example_config_is_valid_and_safe() {
        let file: FileConfig = toml::from_str(include_str!("../../systemd/agent.toml")).unwrap();
        let c = Config::merge(&Args::default(), file).unwrap();
        assert!(c.tls.is_some(), "off loopback only with mutual TLS");
        assert!(!c.insecure_plaintext);
        assert_eq!(
            c.listen,
            [tcp("0.0.0.0:7443"), tcp("[::]:7443"), Listen::Vsock { port: 7443 }],
            "dual stack, and vsock for guests without networking"
        );
        assert_eq!(c.kubevirt_ca, DEFAULT_KUBEVIRT_CA);
        assert_eq!(c.access.allowed_clients, ["wukong-companion"]);
        assert_eq!(c.limits, Limits::default(), "the file states the defaults");
        assert_eq!(c.usage_scanner, ScannerChoice::Auto);
    }

    #[test]
    fn the_usage_scanner_is_chosen_by_file_or_flag_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        assert_eq!(Config::load(&args(&[])).unwrap().usage_scanner, ScannerChoice::Auto);
        std::fs::write(&path, "usage_scanner = \"procfs\"\n").unwrap();
        let file = path.to_str().unwrap();
        assert_eq!(Config::load(&args(&["--config", file])).unwrap().usage_scanner, ScannerChoice::Procfs);
        let c = Config::load(&args(&["--config", file, "--usage-scanner", "bpf"])).unwrap();
        assert_eq!(c.usage_scanner, ScannerChoice::Bpf, "the flag wins");
        std::fs::write(&path, "\nusage_scanner = \"ebpf\"\n").unwrap();
        let err = Config::load(&args(&["--config", file])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: Some(2), .. }), "{err}");
        assert!(err.to_string().contains("auto") && err.to_string().contains("procfs"), "names the choices: {err}");
        let err = Args::try_parse_from(["wukong-agent", "--usage-scanner", "ebpf"]).unwrap_err().to_string();
        assert!(err.contains("'ebpf'") && err.contains("auto, bpf, procfs"), "{err}");
    }

    #[test]
    fn bad_file_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "# the agent\n\nlisen = []\n").unwrap();
        let err = Config::load(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { line: Some(3), .. }), "{err}");
        let text = err.to_string();
        assert!(text.starts_with(&format!("the configuration file {} is not valid at line 3: ", path.display())));
        assert!(text.contains("lisen") && !text.contains('\n'), "one line naming the bad key: {text}");
        let err = Config::load(&args(&["--config", "/nonexistent/agent.toml"])).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
