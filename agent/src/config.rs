//! Agent configuration: command-line flags over an optional TOML file over defaults. Built once at start and
//! passed down; there is no global configuration.

use crate::roots::HostRoots;
use clap::Parser;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Default Unix socket for local tools.
pub const DEFAULT_SOCKET: &str = "/run/wukong-agent/agent.sock";
/// Default directory of the release journal: on tmpfs, so it lives exactly as long as the guest's boot.
pub const DEFAULT_STATE_DIR: &str = "/run/wukong-agent/releases";

/// Command line of `wukong-agent`.
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "wukong-agent", version, about = "Knows every disk of this guest by serial and who uses it")]
pub struct Args {
    /// TCP address to serve gRPC on, `IP` or `IP:PORT` (default port 7443); repeatable. Default: 127.0.0.1:7443.
    #[arg(long = "listen", value_name = "IP[:PORT]")]
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
    /// Server certificate (PEM) for TLS on the TCP listeners. With --tls-key and --tls-client-ca.
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
    /// Serve plaintext gRPC on non-loopback addresses. Anyone who can reach the port can then use the agent.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Log filter (tracing syntax), e.g. `info` or `wukong_agent=debug`.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
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
    pub log: Option<String>,
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
    /// When not empty, only TLS clients with one of these identities may.
    pub allowed_clients: Vec<String>,
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
    pub listen: Vec<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub tls: Option<TlsFiles>,
    pub access: Access,
    pub limits: Limits,
    pub insecure_plaintext: bool,
    pub log: String,
    pub roots: HostRoots,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    // One line: toml's own Display is a multi-line excerpt of the file, which a journal shows as noise.
    #[error("the configuration file {path} is not valid{}: {message}", at_line(*line))]
    Parse { path: PathBuf, line: Option<usize>, message: String },
    #[error("'{0}' is not a listen address; use IP or IP:PORT, e.g. 127.0.0.1 or 0.0.0.0:7443 or [::1]:7443")]
    BadListen(String),
    #[error(
        "refusing to serve plaintext gRPC on {0}, which is not a loopback address: anyone who reaches it could \
         unmount this guest's disks. Configure TLS (tls_cert, tls_key, tls_client_ca), listen on 127.0.0.1, or pass \
         --insecure-plaintext if this is a lab"
    )]
    PlaintextOffLoopback(SocketAddr),
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
        if tls.is_none()
            && !insecure_plaintext
            && let Some(addr) = listen.iter().find(|a| !a.ip().is_loopback())
        {
            return Err(ConfigError::PlaintextOffLoopback(*addr));
        }
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
            log: args.log.clone().or(file.log).unwrap_or_else(|| "info".to_string()),
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

/// Parses `IP`, `IP:PORT` or `[IPv6]:PORT`; the port defaults to 7443.
pub fn parse_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, wukong_proto::DEFAULT_PORT))
        .map_err(|_| ConfigError::BadListen(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("wukong-agent").chain(list.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_are_loopback_only() {
        let c = Config::load(&args(&[])).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:7443".parse().unwrap()]);
        assert_eq!(c.socket.as_deref(), Some(Path::new(DEFAULT_SOCKET)));
        assert!(!c.insecure_plaintext);
        assert_eq!(c.roots, HostRoots::default());
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen("10.0.2.15").unwrap(), "10.0.2.15:7443".parse().unwrap());
        assert_eq!(parse_listen("0.0.0.0:9000").unwrap(), "0.0.0.0:9000".parse().unwrap());
        assert_eq!(parse_listen("[::1]:1").unwrap(), "[::1]:1".parse().unwrap());
        assert_eq!(parse_listen("::1").unwrap(), "[::1]:7443".parse().unwrap());
        for bad in ["", "localhost", "1.2.3.4:99999", "1.2.3"] {
            assert!(matches!(parse_listen(bad), Err(ConfigError::BadListen(_))), "{bad}");
        }
    }

    #[test]
    fn plaintext_off_loopback_needs_the_explicit_flag() {
        let err = Config::load(&args(&["--listen", "0.0.0.0"])).unwrap_err();
        assert!(matches!(err, ConfigError::PlaintextOffLoopback(_)));
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        let c = Config::load(&args(&["--listen", "0.0.0.0", "--insecure-plaintext", "--no-socket"])).unwrap();
        assert_eq!(c.listen, vec!["0.0.0.0:7443".parse().unwrap()]);
        assert_eq!(c.socket, None);
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
        assert_eq!(c.listen, vec!["127.0.0.2:1".parse().unwrap()]);
        assert_eq!(c.socket.as_deref(), Some(Path::new("/tmp/x.sock")));
        assert_eq!(c.log, "debug");
        let c = Config::load(&args(&["--config", path.to_str().unwrap(), "--listen", "127.0.0.3"])).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.3:7443".parse().unwrap()]);
    }

    #[test]
    fn shipped_example_config_is_valid_and_safe() {
        let file: FileConfig = toml::from_str(include_str!("../../systemd/agent.toml")).unwrap();
        let c = Config::merge(&Args::default(), file).unwrap();
        assert!(c.tls.is_some(), "off loopback only with mutual TLS");
        assert!(!c.insecure_plaintext);
        assert_eq!(c.access.allowed_clients, ["wukong-companion"]);
        assert_eq!(c.limits, Limits::default(), "the file states the defaults");
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
