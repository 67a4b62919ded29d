//! A throwaway PKI for TLS tests: a CA, the agent's certificate (DNS `wukong-agent`, IP 127.0.0.1) and one with the
//! name alone (`named-agent`, as agents are shipped: no address), client
//! certificates `operator`, `viewer` and `wukong-companion`, and `intruder`, signed by another CA (`other-ca.crt`).

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use std::path::PathBuf;
use wukong_controller_client::agent_client::TlsFiles;

pub struct Pki {
    pub dir: tempfile::TempDir,
}

fn new_ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert, Issuer::new(params, key))
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        let dir = crate::process::lab_tempdir("wukong-pki-").unwrap();
        let (ca_cert, ca) = new_ca("wukong test CA");
        let (other_cert, other) = new_ca("some other CA");
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.crt"), other_cert.pem()).unwrap();
        let leaf =
            |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose, issuer: &Issuer<'static, KeyPair>| {
                let key = KeyPair::generate().unwrap();
                let mut params = CertificateParams::new(sans).unwrap();
                params.distinguished_name.push(DnType::CommonName, name);
                params.extended_key_usages = vec![usage];
                let cert = params.signed_by(&key, issuer).unwrap();
                std::fs::write(dir.path().join(format!("{name}.crt")), cert.pem()).unwrap();
                std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
            };
        let server = vec!["wukong-agent".to_string(), "127.0.0.1".to_string()];
        leaf("agent", server, ExtendedKeyUsagePurpose::ServerAuth, &ca);
        leaf("named-agent", vec!["wukong-agent".into()], ExtendedKeyUsagePurpose::ServerAuth, &ca);
        leaf("operator", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca);
        leaf("viewer", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca);
        leaf("wukong-companion", vec![], ExtendedKeyUsagePurpose::ClientAuth, &ca);
        leaf("intruder", vec![], ExtendedKeyUsagePurpose::ClientAuth, &other);
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Client TLS files for `name`, trusting the test CA.
    pub fn client(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.path("ca.crt"),
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            server_name: None,
        }
    }
}
