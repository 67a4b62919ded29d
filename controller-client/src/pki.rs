//! The certificates the agents and the operator need, made offline (`wukongctl pki`): one CA that signs the
//! agents' serving certificate and the clients the agents accept, the agents' certificate for the one name every
//! client verifies (`wukong-agent`), the companion's client certificate for the name in the agents'
//! `allow_clients` (`wukong-companion`), and the Secret the operator's Deployment mounts with the latter.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// The CA's files.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// The agents' serving certificate (every agent gets the same one; cloud-init installs it).
pub const AGENT_CERT: &str = "agent.crt";
pub const AGENT_KEY: &str = "agent.key";
/// The companion's client certificate: the operator's (through its Secret) and wukongctl's.
pub const CLIENT_CERT: &str = "companion.crt";
pub const CLIENT_KEY: &str = "companion.key";
/// The Secret `deploy/operator.yaml` mounts at `--agent-tls-dir` (its keys: `ca.crt`, `tls.crt`, `tls.key`).
pub const CLIENT_SECRET: &str = "wukong-agent-client-tls";

pub use rcgen::ExtendedKeyUsagePurpose as Usage;

/// A certificate is valid from a little before it was made, so a peer whose clock lags still accepts it.
pub const BACKDATE: Duration = Duration::minutes(5);

/// Why the certificates were not made. Nothing in the directory changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(
        "{} already exists; pass --force to replace the keys in {} (every certificate they signed stops being \
         trusted), or use `wukongctl pki renew` to re-issue the certificates from the existing CA",
        .0.display(), .0.parent().unwrap_or(Path::new(".")).display()
    )]
    Exists(PathBuf),
    #[error("{what} {name:?} is not a valid DNS name: {reason}")]
    BadName { what: &'static str, name: String, reason: &'static str },
    #[error("the validity of {what} must be between 1 and 36500 days, not {days}")]
    BadDays { what: &'static str, days: u32 },
    #[error("cannot use the directory {}: {source}; create it or pick another --dir", .path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("cannot read {}: {source}; run `wukongctl pki init` first", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{} is not a usable PEM {what} ({source}); restore it or run `wukongctl pki init --force`", .path.display())]
    Unusable { path: PathBuf, what: &'static str, source: rcgen::Error },
    #[error("cannot make the certificate for {name}: {source}")]
    Generate { name: String, source: rcgen::Error },
}

/// What to make.
#[derive(Debug, Clone)]
pub struct PkiOptions {
    /// Where the files go.
    pub dir: PathBuf,
    /// Validity of the CA, in days.
    pub ca_days: u32,
    /// Validity of the agent's and the companion's certificates, in days.
    pub days: u32,
    /// The name the agents' certificate carries (DNS SAN and common name): the operator's `--agent-server-name`.
    pub agent_name: String,
    /// The common name of the companion's client certificate: in the agents' `allow_clients`.
    pub client_name: String,
    /// The operator's namespace, for the Secret.
    pub namespace: String,
    /// Replace existing keys.
    pub force: bool,
}

impl PkiOptions {
    fn check(&self) -> Result<(), PkiError> {
        dns_name("the agent name", &self.agent_name, 253)?;
        dns_name("the client name", &self.client_name, 253)?;
        dns_name("the namespace", &self.namespace, 63)?;
        for (what, days) in [("the CA", self.ca_days), ("the certificates", self.days)] {
            if !(1..=36500).contains(&days) {
                return Err(PkiError::BadDays { what, days });
            }
        }
        Ok(())
    }
}

/// A DNS-1123 name (what Kubernetes and certificate verifiers accept): lowercase letters, digits, '-' and '.'.
fn dns_name(what: &'static str, name: &str, max: usize) -> Result<(), PkiError> {
    let bad = |reason| Err(PkiError::BadName { what, name: name.to_string(), reason });
    if name.is_empty() || name.len() > max {
        return bad(if max == 63 { "it must have 1 to 63 characters" } else { "it must have 1 to 253 characters" });
    }
    if max == 63 && name.contains('.') {
        return bad("a namespace has no dots");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated part must have 1 to 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return bad("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a part may not start or end with '-'");
        }
    }
    Ok(())
}

/// Makes a new CA and both certificates in `options.dir` (created if missing). Refuses, changing nothing, when any
/// of the files exists, unless `force`. Returns the Secret manifest for the operator.
pub fn init(options: &PkiOptions) -> Result<String, PkiError> {
    options.check()?;
    std::fs::create_dir_all(&options.dir).map_err(|source| PkiError::Dir { path: options.dir.clone(), source })?;
    if !options.force {
        for file in [CA_CERT, CA_KEY, AGENT_CERT, AGENT_KEY, CLIENT_CERT, CLIENT_KEY] {
            let path = options.dir.join(file);
            if path.symlink_metadata().is_ok() {
                return Err(PkiError::Exists(path));
            }
        }
    }
    let now = OffsetDateTime::now_utc();
    let ca = new_ca("wukong-agents-ca", now - BACKDATE, now + Duration::days(options.ca_days.into()))
        .map_err(|source| PkiError::Generate { name: "the CA".into(), source })?;
    let mut files = vec![(CA_CERT, ca.cert_pem, false), (CA_KEY, ca.key_pem, true)];
    files.extend(leaves(options, &ca.issuer, now)?);
    write_all(&options.dir, &files)?;
    secret_manifest(options)
}

/// Re-issues the agent's and the companion's certificates (new keys) from the CA already in `options.dir`.
pub fn renew(options: &PkiOptions) -> Result<String, PkiError> {
    options.check()?;
    let read = |file: &str| {
        let path = options.dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Read { path, source })
    };
    let (ca_pem, key_pem) = (read(CA_CERT)?, read(CA_KEY)?);
    let unusable = |file: &str, what, source| PkiError::Unusable { path: options.dir.join(file), what, source };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| unusable(CA_KEY, "private key", e))?;
    let issuer = load_ca(&ca_pem, key).map_err(|e| unusable(CA_CERT, "CA certificate", e))?;
    let files = leaves(options, &issuer, OffsetDateTime::now_utc())?;
    write_all(&options.dir, &files)?;
    secret_manifest(options)
}

/// The agents' serving certificate and the companion's client certificate, signed by `issuer`.
fn leaves(
    options: &PkiOptions,
    issuer: &Issuer<'_, KeyPair>,
    now: OffsetDateTime,
) -> Result<Vec<(&'static str, String, bool)>, PkiError> {
    let (not_before, not_after) = (now - BACKDATE, now + Duration::days(options.days.into()));
    let leaf = |name: &str, sans: Vec<String>, usage| {
        issue(issuer, name, sans, usage, not_before, not_after)
            .map_err(|source| PkiError::Generate { name: name.to_string(), source })
    };
    let agent = &options.agent_name;
    let (agent_cert, agent_key) = leaf(agent, vec![agent.clone()], ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_cert, client_key) = leaf(&options.client_name, vec![], ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(vec![
        (AGENT_CERT, agent_cert, false),
        (AGENT_KEY, agent_key, true),
        (CLIENT_CERT, client_cert, false),
        (CLIENT_KEY, client_key, true),
    ])
}

/// A CA: its certificate and key (PEM), and the issuer that signs with them.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    pub issuer: Issuer<'static, KeyPair>,
}

/// A new CA (ECDSA P-256) named `common_name` that may sign leaves only, valid from `not_before` to `not_after`.
pub fn new_ca(common_name: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Ca, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.not_before, params.not_after) = (not_before, not_after);
    let cert_pem = params.self_signed(&key)?.pem();
    let key_pem = key.serialize_pem();
    Ok(Ca { cert_pem, key_pem, issuer: Issuer::new(params, key) })
}

/// The issuer of an existing CA: its certificate (the first of `cert_pem`) and its key.
pub fn load_ca(cert_pem: &str, key: KeyPair) -> Result<Issuer<'static, KeyPair>, rcgen::Error> {
    Issuer::from_ca_cert_pem(cert_pem, key)
}

/// A leaf certificate and its new key (PEM), named `common_name` and `sans` (DNS names or IP addresses), for
/// `usage`, signed by `issuer`.
pub fn issue(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    sans: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    (params.not_before, params.not_after) = (not_before, not_after);
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// Writes every file through a temporary file renamed into place, so a reader (an agent reloading its files)
/// never sees half of one; keys are created 0600.
fn write_all(dir: &Path, files: &[(&str, String, bool)]) -> Result<(), PkiError> {
    for (name, content, secret) in files {
        let path = dir.join(name);
        let temp = dir.join(format!(".{name}.tmp"));
        let write_error = |source| PkiError::Write { path: path.clone(), source };
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if *secret { 0o600 } else { 0o644 })
            .open(&temp)
            .map_err(write_error)?;
        file.write_all(content.as_bytes()).and_then(|()| file.sync_all()).map_err(write_error)?;
        std::fs::rename(&temp, &path).map_err(write_error)?;
    }
    Ok(())
}

/// The Secret the operator's Deployment mounts, as YAML for `kubectl apply -f -`.
fn secret_manifest(options: &PkiOptions) -> Result<String, PkiError> {
    use base64::Engine;
    let mut data = String::new();
    for (key, file) in [("ca.crt", CA_CERT), ("tls.crt", CLIENT_CERT), ("tls.key", CLIENT_KEY)] {
        let path = options.dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| PkiError::Read { path, source })?;
        data += &format!("  {key}: {}\n", base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    Ok(format!(
        "# The operator's client certificate for the agents ({}, trusted by agents whose allow_clients has it).\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {CLIENT_SECRET}\n  namespace: {}\ntype: Opaque\ndata:\n{data}",
        options.client_name, options.namespace
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use x509_parser::prelude::*;

    fn options(dir: &Path) -> PkiOptions {
        PkiOptions {
            dir: dir.to_path_buf(),
            ca_days: 3650,
            days: 365,
            agent_name: "wukong-agent".into(),
            client_name: "wukong-companion".into(),
            namespace: "wukong-system".into(),
            force: false,
        }
    }

    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    fn parsed(dir: &Path, file: &str) -> (String, Vec<String>, bool, bool, i64) {
        let pem = std::fs::read(dir.join(file)).unwrap();
        let (_, pem) = parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_string();
        let sans = match cert.subject_alternative_name().unwrap() {
            Some(san) => san.value.general_names.iter().map(|n| n.to_string()).collect(),
            None => vec![],
        };
        let eku = cert.extended_key_usage().unwrap().map(|e| (e.value.server_auth, e.value.client_auth));
        let (server, client) = eku.unwrap_or_default();
        (cn, sans, server, client, cert.validity().not_after.timestamp())
    }

    #[test]
    fn init_makes_a_ca_the_agent_and_the_companion_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = init(&options(dir.path())).unwrap();
        let names: Vec<_> = snapshot(dir.path()).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["agent.crt", "agent.key", "ca.crt", "ca.key", "companion.crt", "companion.key"]);
        for key in [CA_KEY, AGENT_KEY, CLIENT_KEY] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let (cn, sans, server, client, _) = parsed(dir.path(), AGENT_CERT);
        assert_eq!(
            (cn.as_str(), sans, server, client),
            ("wukong-agent", vec!["DNSName(wukong-agent)".into()], true, false)
        );
        let (cn, _, server, client, not_after) = parsed(dir.path(), CLIENT_CERT);
        assert_eq!((cn.as_str(), server, client), ("wukong-companion", false, true));
        let in_a_year = OffsetDateTime::now_utc().unix_timestamp() + 365 * 86400;
        assert!((not_after - in_a_year).abs() < 60, "{not_after} vs {in_a_year}");
        assert!(manifest.contains("name: wukong-agent-client-tls\n  namespace: wukong-system\n"), "{manifest}");
        for key in ["ca.crt", "tls.crt", "tls.key"] {
            assert!(manifest.contains(&format!("\n  {key}: ")), "{key} in {manifest}");
        }
    }

    #[test]
    fn existing_keys_are_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        init(&options(dir.path())).unwrap();
        let before = snapshot(dir.path());
        let err = init(&options(dir.path())).unwrap_err();
        assert!(matches!(err, PkiError::Exists(ref p) if p.ends_with("ca.crt")), "{err}");
        assert!(err.to_string().contains("pass --force"), "{err}");
        assert_eq!(snapshot(dir.path()), before, "a refused init changed the directory");

        // One stray file is enough to refuse, and nothing is written beside it.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join(CLIENT_KEY), "mine").unwrap();
        assert!(matches!(init(&options(other.path())), Err(PkiError::Exists(_))));
        assert_eq!(snapshot(other.path()), [(CLIENT_KEY.to_string(), b"mine".to_vec())]);

        let forced = init(&PkiOptions { force: true, ..options(dir.path()) }).unwrap();
        assert!(!forced.is_empty());
        assert_ne!(snapshot(dir.path()), before, "--force replaces the CA");
    }

    #[test]
    fn renew_reissues_leaves_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(&options(dir.path())).unwrap();
        let ca = std::fs::read(dir.path().join(CA_CERT)).unwrap();
        let agent = std::fs::read(dir.path().join(AGENT_CERT)).unwrap();
        renew(&PkiOptions { days: 30, ..options(dir.path()) }).unwrap();
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).unwrap(), ca, "renew keeps the CA");
        assert_ne!(std::fs::read(dir.path().join(AGENT_CERT)).unwrap(), agent);
        let (_, _, _, _, not_after) = parsed(dir.path(), AGENT_CERT);
        let in_30_days = OffsetDateTime::now_utc().unix_timestamp() + 30 * 86400;
        assert!((not_after - in_30_days).abs() < 60);
        let pem = std::fs::read(dir.path().join(AGENT_CERT)).unwrap();
        let (_, pem) = parse_x509_pem(&pem).unwrap();
        let (_, ca) = parse_x509_pem(&ca).unwrap();
        let ca = ca.parse_x509().unwrap();
        pem.parse_x509().unwrap().verify_signature(Some(ca.public_key())).expect("signed by the kept CA");
    }

    #[test]
    fn renew_without_a_ca_or_with_a_broken_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = renew(&options(dir.path())).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot read {}", dir.path().join(CA_CERT).display())), "{err}");
        assert!(err.to_string().ends_with("run `wukongctl pki init` first"), "{err}");
        init(&options(dir.path())).unwrap();
        std::fs::write(dir.path().join(CA_KEY), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let before = snapshot(dir.path());
        let err = renew(&options(dir.path())).unwrap_err();
        assert!(matches!(err, PkiError::Unusable { what: "private key", .. }), "{err}");
        assert_eq!(snapshot(dir.path()), before);
    }

    #[test]
    fn hostile_names_and_days_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("pki");
        type Change = fn(&mut PkiOptions);
        let cases: [(Change, &str); 7] = [
            (|o| o.agent_name = "Wukong_Agent".into(), "only lowercase letters"),
            (|o| o.agent_name = "".into(), "1 to 253 characters"),
            (|o| o.client_name = "a..b".into(), "1 to 63 characters"),
            (|o| o.client_name = "-x".into(), "may not start or end"),
            (|o| o.namespace = "wukong.system".into(), "a namespace has no dots"),
            (|o| o.namespace = "ns\nkind: Pod".into(), "only lowercase letters"),
            (|o| o.days = 0, "between 1 and 36500 days"),
        ];
        for (change, expected) in cases {
            let mut o = options(&target);
            change(&mut o);
            let err = init(&o).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}, expected {expected}");
        }
        assert!(!target.exists(), "a refused init created its directory");
    }

    #[test]
    fn a_directory_that_cannot_be_used_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        for path in [file.clone(), file.join("pki")] {
            let err = init(&options(&path)).unwrap_err();
            assert!(matches!(err, PkiError::Dir { .. }), "{err}");
            assert!(err.to_string().starts_with(&format!("cannot use the directory {}", path.display())), "{err}");
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
