//! The admission guard's serving certificate, managed by the operator itself (`--guard-cert-secret`), as
//! KubeVirt's virt-operator and cert-manager's webhook manage theirs: no PKI to run, no `caBundle` to paste.
//!
//! The leader keeps a Secret in the operator's namespace holding a CA (`ca.key`; `ca.crt` is the bundle: the
//! current CA first, then earlier CAs not yet expired) and a serving certificate it signed (`tls.crt`, `tls.key`)
//! for the guard Service's names; it keeps every webhook's `caBundle` of the ValidatingWebhookConfiguration equal to
//! that bundle, and renews at two thirds of a certificate's life. The API server is made to trust a new CA before
//! any replica can serve a certificate it signed, and an earlier CA stays trusted until it expires, so no review
//! fails while certificates change. Every replica follows the Secret and writes the serving certificate into
//! `--webhook-cert-dir`, where the webhook's server reads its files as it always has (read again when they change).

use ::time::OffsetDateTime;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use rcgen::PublicKeyData;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wukong_controller_client::pki;
use x509_parser::prelude::{FromDer, GeneralName, Pem, X509Certificate};

/// The Secret's keys.
const CA_BUNDLE: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";

/// What the operator manages, and for which names.
#[derive(Debug, Clone)]
pub struct ManagedCerts {
    /// The operator's namespace, where the Secret is.
    pub namespace: String,
    pub secret: String,
    /// The ValidatingWebhookConfiguration whose every webhook's `caBundle` is kept.
    pub webhook_configuration: String,
    /// The serving certificate's names (DNS names or IP addresses); the first is also its common name.
    pub names: Vec<String>,
    pub ca_validity: Duration,
    pub cert_validity: Duration,
}

impl ManagedCerts {
    /// The names the API server calls Service `service` of `namespace` by, and `extra` ones (a webhook reached by
    /// URL).
    pub fn service_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
        let mut names = vec![
            format!("{service}.{namespace}.svc"),
            service.to_string(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        names.extend(extra.iter().cloned());
        names
    }

    /// How often the leader looks: often enough for lifetimes of seconds (tests), at most once a minute.
    fn check_every(&self) -> Duration {
        (self.ca_validity.min(self.cert_validity) / 30).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// The Secret's contents: PEM text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// The current CA, then earlier CAs still trusted.
    pub ca_bundle: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

impl Material {
    fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| data.get(key).and_then(|b| String::from_utf8(b.0.clone()).ok());
        Some(Self { ca_bundle: text(CA_BUNDLE)?, ca_key: text(CA_KEY)?, cert: text(TLS_CERT)?, key: text(TLS_KEY)? })
    }

    fn data(&self) -> BTreeMap<String, ByteString> {
        [(CA_BUNDLE, &self.ca_bundle), (CA_KEY, &self.ca_key), (TLS_CERT, &self.cert), (TLS_KEY, &self.key)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
            .collect()
    }
}

/// One certificate of a PEM text, with what the decisions need.
struct Cert {
    pem: String,
    der: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

impl Cert {
    /// Every certificate of `text`; `None` if any block is not one.
    fn all(text: &str) -> Option<Vec<Cert>> {
        let mut certs = Vec::new();
        for pem in Pem::iter_from_buffer(text.as_bytes()) {
            let pem = pem.ok()?;
            let cert = pem.parse_x509().ok()?;
            let validity = cert.validity();
            let encoded =
                format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", base64_lines(&pem.contents));
            certs.push(Cert {
                not_before: validity.not_before.timestamp(),
                not_after: validity.not_after.timestamp(),
                der: pem.contents,
                pem: encoded,
            });
        }
        Some(certs)
    }

    /// Past two thirds of its life (or expired): time to replace it.
    fn due(&self, now: i64) -> bool {
        now >= self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    fn expired(&self, now: i64) -> bool {
        now >= self.not_after
    }
}

fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    text.as_bytes().chunks(64).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("\n")
}

/// Why the Secret is (re)written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No Secret, or one whose contents cannot be used.
    Missing,
    CaDue,
    CertDue,
    /// The serving certificate is not the current CA's, or not for the configured names.
    CertMismatch,
    ExpiredCaDropped,
}

/// What the Secret must become at `now` (Unix seconds), and why; `None` when it is fine. `live_bundle` is what the
/// API server trusts now: when the Secret must start over, its CAs that have not expired stay trusted (replicas
/// may still serve a certificate one of them signed).
pub fn decide(
    current: Option<&Material>,
    live_bundle: &str,
    now: i64,
    settings: &ManagedCerts,
) -> Result<Option<(Material, Reason)>, rcgen::Error> {
    let start = OffsetDateTime::from_unix_timestamp(now).unwrap_or_else(|_| OffsetDateTime::now_utc());
    let inspected = current.and_then(|c| inspect(c, now, settings));
    let Some((material, cas, leaf_ok)) = inspected else {
        let ca = new_ca(start, settings)?;
        let previous = Cert::all(live_bundle).unwrap_or_default();
        let bundle = bundle(&ca.cert_pem, previous.iter().filter(|c| !c.expired(now)));
        let (cert, key) = leaf(&ca.issuer, &ca.cert_pem, start, settings)?;
        return Ok(Some((Material { ca_bundle: bundle, ca_key: ca.key_pem, cert, key }, Reason::Missing)));
    };
    let (current_ca, previous) = cas.split_first().expect("inspect keeps a bundle with its CA");
    let kept: Vec<&Cert> = previous.iter().filter(|c| !c.expired(now)).collect();
    if current_ca.due(now) {
        let ca = new_ca(start, settings)?;
        let bundle = bundle(&ca.cert_pem, std::iter::once(current_ca).chain(kept));
        let (cert, key) = leaf(&ca.issuer, &ca.cert_pem, start, settings)?;
        return Ok(Some((Material { ca_bundle: bundle, ca_key: ca.key_pem, cert, key }, Reason::CaDue)));
    }
    let ca_bundle = bundle(&current_ca.pem, kept.iter().copied());
    match leaf_ok {
        Err(reason) => {
            let key = rcgen::KeyPair::from_pem(&material.ca_key)?;
            let issuer = pki::load_ca(&current_ca.pem, key)?;
            let (cert, key) = leaf(&issuer, &current_ca.pem, start, settings)?;
            Ok(Some((Material { ca_bundle, ca_key: material.ca_key.clone(), cert, key }, reason)))
        }
        Ok(()) if kept.len() < previous.len() => {
            Ok(Some((Material { ca_bundle, ..material.clone() }, Reason::ExpiredCaDropped)))
        }
        Ok(()) => Ok(None),
    }
}

/// A usable Secret: its CAs (the current one first, its key matching) and whether its serving certificate can
/// stay (`Err` says why not).
fn inspect<'a>(
    material: &'a Material,
    now: i64,
    settings: &ManagedCerts,
) -> Option<(&'a Material, Vec<Cert>, Result<(), Reason>)> {
    let cas = Cert::all(&material.ca_bundle)?;
    let ca = cas.first()?;
    let key = rcgen::KeyPair::from_pem(&material.ca_key).ok()?;
    let (_, ca_cert) = X509Certificate::from_der(&ca.der).ok()?;
    if ca_cert.public_key().raw != key.subject_public_key_info() {
        return None;
    }
    let leaf = Cert::all(&material.cert).and_then(|mut c| (!c.is_empty()).then(|| c.remove(0)));
    let leaf_ok = match leaf {
        None => Err(Reason::CertMismatch),
        Some(leaf) => {
            let (_, parsed) = X509Certificate::from_der(&leaf.der).ok()?;
            let signed = parsed.verify_signature(Some(ca_cert.public_key())).is_ok();
            let key_matches = rcgen::KeyPair::from_pem(&material.key)
                .is_ok_and(|k| k.subject_public_key_info() == parsed.public_key().raw);
            let names = names_of(&parsed);
            let wanted: std::collections::BTreeSet<&str> = settings.names.iter().map(String::as_str).collect();
            let named = names.iter().map(String::as_str).collect::<std::collections::BTreeSet<_>>() == wanted;
            match (signed && key_matches && named, leaf.due(now)) {
                (false, _) => Err(Reason::CertMismatch),
                (true, true) => Err(Reason::CertDue),
                (true, false) => Ok(()),
            }
        }
    };
    Some((material, cas, leaf_ok))
}

/// The DNS names and IP addresses a certificate is for.
fn names_of(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn bundle<'a>(current: &str, previous: impl Iterator<Item = &'a Cert>) -> String {
    let mut text = current.to_string();
    for cert in previous {
        if !text.contains(cert.pem.trim()) {
            text += &cert.pem;
        }
    }
    text
}

/// Valid from a little before now (a peer's clock may lag), but by no more than a tenth of the lifetime: the
/// renewal point is computed from the validity, and seconds-long lifetimes (tests) must not start out due.
fn backdate(validity: ::time::Duration) -> ::time::Duration {
    pki::BACKDATE.min(validity / 10)
}

fn new_ca(now: OffsetDateTime, settings: &ManagedCerts) -> Result<pki::Ca, rcgen::Error> {
    let validity = ::time::Duration::try_from(settings.ca_validity).unwrap_or(::time::Duration::days(365));
    pki::new_ca("wukong-guard-ca", now - backdate(validity), now + validity)
}

/// A serving certificate signed by the CA `ca_pem`, never valid beyond that CA.
fn leaf(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    now: OffsetDateTime,
    settings: &ManagedCerts,
) -> Result<(String, String), rcgen::Error> {
    let validity = ::time::Duration::try_from(settings.cert_validity).unwrap_or(::time::Duration::days(30));
    let ca_end = Cert::all(ca_pem)
        .and_then(|c| c.first().map(|c| c.not_after))
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
    let not_after = ca_end.map_or(now + validity, |end| end.min(now + validity));
    let common_name = settings.names.first().map(String::as_str).unwrap_or("wukong-guard");
    let not_before = now - backdate(validity);
    pki::issue(issuer, common_name, settings.names.clone(), pki::Usage::ServerAuth, not_before, not_after)
}

/// The leader's part: keeps the Secret and the `caBundle`s as [`decide`] says, until the replica stops leading.
pub async fn lead(client: kube::Client, settings: ManagedCerts) -> Infallible {
    let every = settings.check_every();
    tracing::info!(secret = %format!("{}/{}", settings.namespace, settings.secret), webhook_configuration = %settings.webhook_configuration, ?every, "managing the admission guard's certificates");
    loop {
        if let Err(e) = pass(&client, &settings).await {
            tracing::warn!(error = %e, "cannot manage the admission guard's certificates yet; trying again");
        }
        tokio::time::sleep(every).await;
    }
}

async fn pass(client: &kube::Client, settings: &ManagedCerts) -> Result<(), kube::Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mut configuration = configurations.get_opt(&settings.webhook_configuration).await?;
    if configuration.is_none() {
        tracing::warn!(
            name = %settings.webhook_configuration,
            "the ValidatingWebhookConfiguration does not exist (apply deploy/guard.yaml): its caBundle waits"
        );
    }
    let live = configuration.as_ref().map(live_bundle).unwrap_or_default();
    let secret = secrets.get_opt(&settings.secret).await?;
    let mut material = secret.as_ref().and_then(Material::from_secret);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    match decide(material.as_ref(), &live, now, settings) {
        Err(e) => tracing::error!(error = %e, "cannot make the admission guard's certificates"),
        Ok(None) => {}
        Ok(Some((new, reason))) => {
            // Trust first: the API server must trust the new certificate's CA before any replica can serve it.
            if let Some(current) = configuration.take() {
                let union = bundle(&live, Cert::all(&new.ca_bundle).unwrap_or_default().iter());
                configuration = Some(publish(&configurations, current, &union).await?);
            }
            let mut object = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(settings.secret.clone()),
                    namespace: Some(settings.namespace.clone()),
                    labels: Some([("app.kubernetes.io/managed-by".to_string(), crate::MANAGER.to_string())].into()),
                    ..Default::default()
                },
                data: Some(new.data()),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            let written = match &secret {
                None => secrets.create(&PostParams::default(), &object).await,
                Some(old) => {
                    object.metadata.resource_version = old.metadata.resource_version.clone();
                    secrets.replace(&settings.secret, &PostParams::default(), &object).await
                }
            };
            match written {
                Ok(_) => {
                    tracing::info!(?reason, secret = %settings.secret, "wrote the admission guard's certificates");
                    material = Some(new);
                }
                // Another replica (a leader that has not noticed it lost the Lease, or one that raced at start)
                // wrote first: the next pass starts from what it wrote.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::info!(secret = %settings.secret, "the Secret changed meanwhile; looking again");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
    if let (Some(current), Some(material)) = (configuration, material)
        && live_bundles(&current).iter().any(|b| *b != material.ca_bundle)
    {
        publish(&configurations, current, &material.ca_bundle).await?;
    }
    Ok(())
}

/// Every webhook's `caBundle`, as text.
fn live_bundles(configuration: &ValidatingWebhookConfiguration) -> Vec<String> {
    let hooks = configuration.webhooks.iter().flatten();
    hooks
        .map(|w| String::from_utf8_lossy(w.client_config.ca_bundle.as_ref().map_or(&[][..], |b| &b.0)).into_owned())
        .collect()
}

/// The CAs the API server trusts now: those of every webhook, each once.
fn live_bundle(configuration: &ValidatingWebhookConfiguration) -> String {
    live_bundles(configuration).iter().fold(String::new(), |all, one| {
        let certs = Cert::all(one).unwrap_or_default();
        if all.is_empty() { certs.iter().map(|c| c.pem.as_str()).collect() } else { bundle(&all, certs.iter()) }
    })
}

/// Sets every webhook's `caBundle` to `pem` (a conflict is an error: the next pass reads again).
async fn publish(
    api: &Api<ValidatingWebhookConfiguration>,
    mut configuration: ValidatingWebhookConfiguration,
    pem: &str,
) -> Result<ValidatingWebhookConfiguration, kube::Error> {
    for hook in configuration.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(ByteString(pem.as_bytes().to_vec()));
    }
    let name = configuration.metadata.name.clone().unwrap_or_default();
    let stored = api.replace(&name, &PostParams::default(), &configuration).await?;
    tracing::info!(%name, cas = Cert::all(pem).map_or(0, |c| c.len()), "the webhooks' caBundle is the current CA bundle");
    Ok(stored)
}

/// Every replica's part: follows the Secret and writes its serving certificate into `dir` (whose files the
/// webhook's server reads again when they change); `ready` turns true once a certificate is there.
pub async fn follow(
    client: kube::Client,
    settings: ManagedCerts,
    dir: PathBuf,
    ready: tokio::sync::watch::Sender<bool>,
) -> Infallible {
    use futures::StreamExt;
    let secrets: Api<Secret> = Api::namespaced(client, &settings.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.secret));
    let mut stream = std::pin::pin!(watcher(secrets, config).default_backoff().applied_objects());
    let mut written: Option<(String, String)> = None;
    loop {
        match stream.next().await {
            Some(Ok(secret)) => {
                let Some(material) = Material::from_secret(&secret) else { continue };
                let pair = (material.cert, material.key);
                if written.as_ref() == Some(&pair) {
                    continue;
                }
                match write_pair(&dir, &pair.0, &pair.1) {
                    Ok(()) => {
                        tracing::info!(dir = %dir.display(), "the admission guard's serving certificate changed");
                        written = Some(pair);
                        ready.send_replace(true);
                    }
                    Err(e) => tracing::error!(dir = %dir.display(), error = %e, "cannot write the serving certificate"),
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, secret = %settings.secret, "watching the guard's certificate Secret")
            }
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Writes `tls.crt` and `tls.key` so that a reader sees both old or both new, never one of each: as the kubelet
/// updates a mounted Secret, the files are links into a directory that is swapped whole (`..data`).
fn write_pair(dir: &Path, cert: &str, key: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, symlink};
    std::fs::create_dir_all(dir)?;
    let version = format!("..{}", OffsetDateTime::now_utc().unix_timestamp_nanos());
    let target = dir.join(&version);
    std::fs::create_dir(&target)?;
    for (name, text, mode) in [(TLS_CERT, cert, 0o644), (TLS_KEY, key, 0o600)] {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(target.join(name))?;
        file.write_all(text.as_bytes())?;
    }
    let previous = std::fs::read_link(dir.join("..data")).ok();
    let _ = std::fs::remove_file(dir.join("..data_tmp"));
    symlink(&version, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    for name in [TLS_CERT, TLS_KEY] {
        let link = Path::new("..data").join(name);
        if std::fs::read_link(dir.join(name)).ok().as_deref() != Some(link.as_path()) {
            let temp = dir.join(format!("..{name}_tmp"));
            let _ = std::fs::remove_file(&temp);
            symlink(&link, &temp)?;
            std::fs::rename(&temp, dir.join(name))?;
        }
    }
    if let Some(previous) = previous.filter(|p| *p != Path::new(&version)) {
        let _ = std::fs::remove_dir_all(dir.join(previous));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ca: u64, cert: u64) -> ManagedCerts {
        ManagedCerts {
            namespace: "wukong-system".into(),
            secret: "wukong-guard-certs".into(),
            webhook_configuration: "wukong-guard".into(),
            names: ManagedCerts::service_names("wukong-guard", "wukong-system", &["127.0.0.1".into()]),
            ca_validity: Duration::from_secs(ca),
            cert_validity: Duration::from_secs(cert),
        }
    }

    fn certs(text: &str) -> Vec<Cert> {
        Cert::all(text).unwrap()
    }

    #[test]
    fn from_nothing_a_ca_and_a_certificate_for_the_services_names() {
        let s = settings(3000, 300);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (m, reason) = decide(None, "", now, &s).unwrap().unwrap();
        assert_eq!(reason, Reason::Missing);
        assert_eq!(certs(&m.ca_bundle).len(), 1);
        let leaf = &certs(&m.cert)[0];
        let (_, parsed) = X509Certificate::from_der(&leaf.der).unwrap();
        let mut names = names_of(&parsed);
        names.sort();
        assert_eq!(
            names,
            [
                "127.0.0.1",
                "wukong-guard",
                "wukong-guard.wukong-system",
                "wukong-guard.wukong-system.svc",
                "wukong-guard.wukong-system.svc.cluster.local"
            ]
        );
        assert!((leaf.not_after - (now + 300)).abs() <= 1, "{} vs {}", leaf.not_after, now + 300);
        assert_eq!(decide(Some(&m), &m.ca_bundle, now + 10, &s).unwrap(), None, "a fresh Secret stays");
    }

    #[test]
    fn the_certificate_is_renewed_at_two_thirds_of_its_life_from_the_same_ca() {
        let s = settings(3000, 300);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (m, _) = decide(None, "", now, &s).unwrap().unwrap();
        let leaf = &certs(&m.cert)[0];
        let two_thirds = leaf.not_before + (leaf.not_after - leaf.not_before) * 2 / 3;
        assert_eq!(decide(Some(&m), "", two_thirds - 1, &s).unwrap(), None);
        let (renewed, reason) = decide(Some(&m), "", two_thirds, &s).unwrap().unwrap();
        assert_eq!(reason, Reason::CertDue);
        assert_eq!((&renewed.ca_bundle, &renewed.ca_key), (&m.ca_bundle, &m.ca_key), "same CA");
        assert_ne!(renewed.cert, m.cert);
    }

    #[test]
    fn a_new_ca_keeps_the_old_one_trusted_until_it_expires() {
        let s = settings(30, 300);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (m, _) = decide(None, "", now, &s).unwrap().unwrap();
        let old_ca = certs(&m.ca_bundle).remove(0);
        // The serving certificate never outlives its CA.
        assert!(certs(&m.cert)[0].not_after <= old_ca.not_after);
        let (rotated, reason) = decide(Some(&m), "", now + 25, &s).unwrap().unwrap();
        assert_eq!(reason, Reason::CaDue);
        let bundle = certs(&rotated.ca_bundle);
        assert_eq!(bundle.len(), 2);
        assert_eq!(bundle[1].der, old_ca.der, "the old CA stays, after the new one");
        assert_ne!(rotated.ca_key, m.ca_key);
        let leaf_der = certs(&rotated.cert).remove(0).der;
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, new_ca) = X509Certificate::from_der(&bundle[0].der).unwrap();
        leaf.verify_signature(Some(new_ca.public_key())).expect("the new certificate is the new CA's");
        // Once the old CA expired, it leaves the bundle; nothing else changes.
        let after = old_ca.not_after + 1;
        let (pruned, reason) = decide(Some(&rotated), "", after, &s).unwrap().unwrap();
        assert_eq!(reason, Reason::ExpiredCaDropped);
        assert_eq!(certs(&pruned.ca_bundle).len(), 1);
        assert_eq!(pruned.cert, rotated.cert);
    }

    #[test]
    fn a_broken_or_foreign_secret_starts_over_and_what_the_api_server_trusts_stays_trusted() {
        let s = settings(3000, 300);
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (m, _) = decide(None, "", now, &s).unwrap().unwrap();
        let junk = Material { cert: "junk".into(), ..m.clone() };
        assert_eq!(decide(Some(&junk), "", now, &s).unwrap().unwrap().1, Reason::CertMismatch);
        let other_key = Material { ca_key: rcgen::KeyPair::generate().unwrap().serialize_pem(), ..m.clone() };
        let (fresh, reason) = decide(Some(&other_key), &m.ca_bundle, now, &s).unwrap().unwrap();
        assert_eq!(reason, Reason::Missing);
        let bundle = certs(&fresh.ca_bundle);
        assert_eq!(bundle.len(), 2, "the live CA stays trusted while replicas may still serve its certificate");
        assert_eq!(bundle[1].der, certs(&m.ca_bundle)[0].der);
        // Other names (the Service renamed): a new certificate from the same CA.
        let renamed = ManagedCerts { names: vec!["other.wukong-system.svc".into()], ..s };
        assert_eq!(decide(Some(&m), "", now, &renamed).unwrap().unwrap().1, Reason::CertMismatch);
    }

    #[test]
    fn both_files_change_at_once_and_a_mounted_copy_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), "from a mounted Secret").unwrap();
        write_pair(dir.path(), "cert 1", "key 1").unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!((read("tls.crt"), read("tls.key")), ("cert 1".into(), "key 1".into()));
        write_pair(dir.path(), "cert 2", "key 2").unwrap();
        assert_eq!((read("tls.crt"), read("tls.key")), ("cert 2".into(), "key 2".into()));
        let versions = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
            .count();
        assert_eq!(versions, 1, "the previous version is removed");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    const CONFIG: &str = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/wukong-guard";
    const SECRET: &str = "/api/v1/namespaces/wukong-system/secrets/wukong-guard-certs";

    fn status(code: u16, reason: &str) -> (u16, serde_json::Value) {
        let body = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason,
                                      "code": code, "message": reason, "metadata": {}});
        (code, body)
    }

    fn configuration(bundle: &str) -> serde_json::Value {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(bundle);
        let hook = |name: &str| {
            serde_json::json!({"name": name, "clientConfig": {"url": "https://127.0.0.1:1/validate", "caBundle": ca},
                               "sideEffects": "None", "admissionReviewVersions": ["v1"]})
        };
        serde_json::json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
                           "metadata": {"name": "wukong-guard", "resourceVersion": "7"},
                           "webhooks": [hook("objects.guard.example"), hook("namespaces.guard.example")]})
    }

    fn put_bundles(seen: &[crate::fixtures::Seen]) -> Vec<Vec<String>> {
        use base64::Engine;
        seen.iter()
            .filter(|s| s.method == http::Method::PUT && s.path == CONFIG)
            .map(|s| {
                let hooks = s.body["webhooks"].as_array().unwrap();
                hooks
                    .iter()
                    .map(|h| {
                        let b64 = h["clientConfig"]["caBundle"].as_str().unwrap();
                        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
                    })
                    .collect()
            })
            .collect()
    }

    /// Two replicas race to create the Secret (a leader that has not yet noticed it lost the Lease): the one that
    /// loses gets 409, writes nothing more in that pass, and the next pass adopts what the other wrote.
    #[tokio::test]
    async fn a_lost_race_to_create_the_secret_adopts_the_winners() {
        let s = settings(3000, 300);
        let api = crate::fixtures::Api::start(|seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("GET", CONFIG) => Some((200, configuration(""))),
            ("GET", SECRET) => Some(status(404, "NotFound")),
            ("POST", "/api/v1/namespaces/wukong-system/secrets") => Some(status(409, "AlreadyExists")),
            _ => None,
        });
        pass(&api.client(), &s).await.unwrap();
        let seen = api.seen();
        let writes: Vec<_> = seen.iter().filter(|r| r.method != http::Method::GET).map(|r| r.method.clone()).collect();
        assert_eq!(writes, [http::Method::PUT, http::Method::POST], "trust first, then the Secret; nothing after 409");
        let trusted = put_bundles(&seen).remove(0);
        assert!(trusted.iter().all(|b| certs(b).len() == 1 && *b == trusted[0]), "every webhook trusts the new CA");

        // The winner's Secret, and a caBundle that still has the loser's CA: adopted, the bundle made the winner's.
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let (winner, _) = decide(None, "", now, &s).unwrap().unwrap();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("wukong-guard-certs".into()),
                resource_version: Some("3".into()),
                ..Default::default()
            },
            data: Some(winner.data()),
            ..Default::default()
        };
        let secret = serde_json::to_value(&secret).unwrap();
        let loser_bundle = trusted[0].clone();
        let api = crate::fixtures::Api::start(move |seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("GET", CONFIG) => Some((200, configuration(&loser_bundle))),
            ("GET", SECRET) => Some((200, secret.clone())),
            _ => None,
        });
        pass(&api.client(), &s).await.unwrap();
        let seen = api.seen();
        assert!(seen.iter().all(|r| r.path != SECRET || r.method == http::Method::GET), "the winner's Secret is kept");
        assert_eq!(put_bundles(&seen), [vec![winner.ca_bundle.clone(), winner.ca_bundle.clone()]]);
    }
}
