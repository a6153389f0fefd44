//! The certificate authority of a development PKI: generating or loading the CA, and issuing
//! leaf certificates whose SAN URI carries the fedinspect identity (see [`crate::tls`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};

use super::{write_key_pair, PkiError, PkiLayout};
use crate::signing::insecure_mode;
use crate::tls::Role;

/// Lifetime of a development CA.
pub const CA_DAYS: u32 = 3650;
/// Lifetime of a leaf certificate: long enough that a pilot does not trip over renewal.
pub const LEAF_DAYS: u32 = 730;
/// How far back `not_before` is set, so a node whose clock lags the issuer's accepts a new
/// certificate at once.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
const ORGANISATION: &str = "fedinspect";

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What to put into a leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    pub role: Role,
    pub name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub validity: Validity,
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA certificate with its key, able to issue leaves.
pub struct CertificateAuthority {
    cert: Certificate,
    key: KeyPair,
}

impl Validity {
    /// From an hour ago (clock skew) until `days` from now.
    pub fn days_from_now(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW,
            not_after: now + DAY * days,
        }
    }

    /// For tests: a certificate that expired yesterday.
    pub fn expired() -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - DAY * 30,
            not_after: now - DAY,
        }
    }

    /// For tests: a certificate that becomes valid tomorrow.
    pub fn not_yet_valid() -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now + DAY,
            not_after: now + DAY * 30,
        }
    }
}

impl LeafSpec {
    /// A plant client certificate.
    pub fn plant(id: &str) -> Self {
        Self::new(Role::Plant, id)
    }

    /// An admin client certificate.
    pub fn admin(name: &str) -> Self {
        Self::new(Role::Admin, name)
    }

    /// A coordinator server certificate for localhost, 127.0.0.1 and ::1 plus `extra_names`
    /// (each a DNS name or an IP address).
    pub fn coordinator(name: &str, extra_names: &[String]) -> Result<Self, PkiError> {
        let mut spec = Self::new(Role::Coordinator, name);
        spec.dns_names.push("localhost".into());
        spec.ip_addresses = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()];
        for extra in extra_names {
            if let Ok(ip) = extra.parse::<IpAddr>() {
                if !spec.ip_addresses.contains(&ip) {
                    spec.ip_addresses.push(ip);
                }
            } else if is_dns_name(extra) {
                let dns = extra.to_ascii_lowercase();
                if !spec.dns_names.contains(&dns) {
                    spec.dns_names.push(dns);
                }
            } else {
                return Err(PkiError::InvalidServerName(extra.clone()));
            }
        }
        Ok(spec)
    }

    pub fn with_validity(mut self, validity: Validity) -> Self {
        self.validity = validity;
        self
    }

    fn new(role: Role, name: &str) -> Self {
        Self {
            role,
            name: name.to_string(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            validity: Validity::days_from_now(LEAF_DAYS),
        }
    }
}

impl IssuedCert {
    /// Writes the certificate (0644) and key (0600) atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_key_pair(cert_path, &self.cert_pem, key_path, &self.key_pem)
    }
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new ECDSA P-256 CA that may sign leaves only (path length 0).
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Self { cert, key })
    }

    /// Loads `ca.pem` and `ca.key` from a PKI folder, refusing a key others may read.
    pub fn load(layout: &PkiLayout) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (layout.ca_cert(), layout.ca_key());
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::NoCa {
                dir: layout.root().to_path_buf(),
            });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PkiError::Io { path, source }
        };
        if let Some(mode) = insecure_mode(&key_path).map_err(io(&key_path))? {
            return Err(PkiError::InsecureKey {
                path: key_path,
                mode,
            });
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let malformed = |path: &Path, e: rcgen::Error| PkiError::Malformed {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| malformed(&key_path, e))?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| malformed(&cert_path, e))?;
        let cert_spki = crate::tls::read_certificates(&cert_path)
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .and_then(|der| spki_of(&der));
        if cert_spki.as_deref() != Some(key.public_key_der().as_slice()) {
            return Err(PkiError::CaKeyMismatch {
                dir: layout.root().to_path_buf(),
            });
        }
        // Re-signing in memory only rebuilds the issuer object rcgen wants; ca.pem is untouched
        // and issued leaves name the original subject and key identifier.
        let cert = params.self_signed(&key).map_err(rcgen_error)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into the layout.
    pub fn write(&self, layout: &PkiLayout) -> Result<(), PkiError> {
        write_key_pair(
            &layout.ca_cert(),
            &self.cert.pem(),
            &layout.ca_key(),
            &self.key.serialize_pem(),
        )
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, PkiError> {
        let uri = spec.role.identity_uri(&spec.name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(&spec.name);
        params.subject_alt_names = vec![SanType::URI(ia5(&uri)?)];
        for dns in &spec.dns_names {
            params.subject_alt_names.push(SanType::DnsName(ia5(dns)?));
        }
        for ip in &spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match spec.role {
            Role::Coordinator => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Plant | Role::Admin => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, spec.validity);
        let key = new_key()?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rcgen_error)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn new_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rcgen_error)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANISATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
}

/// 128 random bits, positive and without a leading zero byte, as RFC 5280 asks.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Certificate("the system random source failed".into()))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn ia5(s: &str) -> Result<rcgen::Ia5String, PkiError> {
    rcgen::Ia5String::try_from(s).map_err(|_| PkiError::InvalidServerName(s.to_string()))
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn spki_of(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

fn rcgen_error(e: rcgen::Error) -> PkiError {
    PkiError::Certificate(e.to_string())
}
