//! Who a certificate speaks for: the `urn:fedinspect:<role>:<name>` SAN URI scheme, its parser
//! [`peer_identity`], and the descriptive [`CertificateInfo`] that `fedinspect-certs show` prints.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;

/// Every fedinspect identity URI starts with this.
pub const URI_PREFIX: &str = "urn:fedinspect:";
/// Longest plant id or principal name.
pub const MAX_NAME_LEN: usize = 63;

/// What a peer may do: a plant trains, an admin manages, the coordinator serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Plant,
    Admin,
    Coordinator,
}

/// The identity a certificate carries, read by [`peer_identity`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    /// The plant id or the admin / coordinator name.
    pub id: String,
    /// Certificate serial number, lowercase hex, for audit logs and revocation lists.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What a certificate says about itself, identity or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Plant, Role::Admin, Role::Coordinator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Plant => "plant",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
        }
    }

    /// The SAN URI naming `name` in this role, after checking the name.
    pub fn identity_uri(self, name: &str) -> Result<String, TlsError> {
        validate_name(self, name)?;
        Ok(format!("{URI_PREFIX}{}:{name}", self.as_str()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| TlsError::UnknownRole(s.chars().take(40).collect()))
    }
}

impl PeerIdentity {
    /// Refuses the peer unless it has `role`.
    pub fn require_role(&self, role: Role) -> Result<(), TlsError> {
        if self.role == role {
            Ok(())
        } else {
            Err(TlsError::WrongRole {
                expected: role,
                found: self.role,
                id: self.id.clone(),
            })
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (serial {}, valid until {})",
            self.role,
            self.id,
            self.serial,
            format_time(self.not_after)
        )
    }
}

/// Checks a plant id or principal name: 1 to 63 characters from `a-z 0-9 - _ .`, starting with
/// a letter or digit, so it is also a safe file name and log token.
pub fn validate_name(role: Role, name: &str) -> Result<(), TlsError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
        Ok(())
    } else {
        Err(TlsError::InvalidName {
            role,
            name: name.chars().take(80).collect(),
        })
    }
}

/// Reads the fedinspect identity of a DER certificate.
///
/// The identity is the one SAN URI of the form `urn:fedinspect:<role>:<name>` with role `plant`,
/// `admin` or `coordinator` and a name accepted by [`validate_name`]. Nothing else counts: not
/// the subject CN, not DNS names. Other URIs are ignored; a certificate with no such URI, or with
/// two, is refused as not a fedinspect identity. This does not check the chain or the dates;
/// rustls has done that for a peer certificate, [`super::TlsMaterial::load`] for our own.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, TlsError> {
    let info = certificate_info(cert_der)?;
    let not_ours = |reason: String| TlsError::NotFedinspectIdentity {
        subject: info.subject.clone(),
        reason,
    };
    let mut ours = info.uris.iter().filter(|u| u.starts_with(URI_PREFIX));
    let uri = match (ours.next(), ours.next()) {
        (Some(uri), None) => uri,
        (None, _) => return Err(not_ours(format!("no SAN URI starting with {URI_PREFIX}"))),
        (Some(a), Some(b)) => return Err(not_ours(format!("two identity URIs, {a} and {b}"))),
    };
    let rest = &uri[URI_PREFIX.len()..];
    let (role, name) = rest
        .split_once(':')
        .ok_or_else(|| not_ours(format!("{uri} lacks the <role>:<name> part")))?;
    let role: Role = role.parse().map_err(|e| not_ours(format!("{uri}: {e}")))?;
    validate_name(role, name)?;
    Ok(PeerIdentity {
        role,
        id: name.to_string(),
        serial: info.serial,
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

/// Parses a DER certificate into the facts fedinspect cares about.
pub fn certificate_info(cert_der: &[u8]) -> Result<CertificateInfo, TlsError> {
    let bad = |reason: String| TlsError::BadCertificate { reason };
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| bad(e.to_string()))?;
    let mut info = CertificateInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: hex::encode(cert.raw_serial()),
        not_before: unix_to_system(cert.validity().not_before.timestamp()),
        not_after: unix_to_system(cert.validity().not_after.timestamp()),
        is_ca: cert.is_ca(),
        uris: Vec::new(),
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("unreadable subject alternative names: {e}")))?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            GeneralName::URI(u) => info.uris.push(u.to_string()),
            GeneralName::DNSName(d) => info.dns_names.push(d.to_string()),
            GeneralName::IPAddress(raw) => {
                if let Some(ip) = ip_from_bytes(raw) {
                    info.ip_addresses.push(ip);
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// RFC 3339 in UTC, e.g. `2030-01-31T12:00:00Z`, for error messages and `show`.
pub fn format_time(t: SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    let dt = time::OffsetDateTime::from(t).replace_nanosecond(0);
    match dt.ok().map(|d| d.format(&Rfc3339)) {
        Some(Ok(s)) => s,
        _ => format!("{t:?}"),
    }
}

fn unix_to_system(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

fn ip_from_bytes(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .collect();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn names_are_checked() {
        for ok in ["plant-1", "a", "0.x_y-z", &"a".repeat(63)] {
            validate_name(Role::Plant, ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "Plant",
            "a b",
            "a/b",
            "é",
            &"a".repeat(64),
            "a:b",
        ] {
            assert!(validate_name(Role::Plant, bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reads_each_role_and_ignores_foreign_uris() {
        for role in Role::ALL {
            let uri = role.identity_uri("x-1").unwrap();
            let der = cert_with_uris(&["https://example.com/", &uri]);
            let id = peer_identity(&der).unwrap();
            assert_eq!((id.role, id.id.as_str()), (role, "x-1"));
            assert!(!id.serial.is_empty());
            assert!(id.not_after > id.not_before);
        }
    }

    #[test]
    fn refuses_what_is_not_exactly_one_valid_identity() {
        for uris in [
            vec![],
            vec!["https://example.com/"],
            vec!["urn:fedinspect:plant"],
            vec!["urn:fedinspect:robot:r1"],
            vec!["urn:fedinspect:plant:a", "urn:fedinspect:plant:b"],
        ] {
            let err = peer_identity(&cert_with_uris(&uris)).unwrap_err();
            assert!(
                matches!(err, TlsError::NotFedinspectIdentity { .. }),
                "{uris:?}: {err}"
            );
        }
        let err = peer_identity(&cert_with_uris(&["urn:fedinspect:plant:Bad"])).unwrap_err();
        assert!(matches!(err, TlsError::InvalidName { .. }), "{err}");
        let err = peer_identity(b"garbage").unwrap_err();
        assert!(matches!(err, TlsError::BadCertificate { .. }), "{err}");
    }

    #[test]
    fn wrong_role_is_refused() {
        let id = peer_identity(&cert_with_uris(&["urn:fedinspect:admin:root"])).unwrap();
        id.require_role(Role::Admin).unwrap();
        let err = id.require_role(Role::Plant).unwrap_err();
        assert!(matches!(
            err,
            TlsError::WrongRole {
                expected: Role::Plant,
                found: Role::Admin,
                ..
            }
        ));
    }

    #[test]
    fn formats_times_as_rfc3339() {
        assert_eq!(format_time(unix_to_system(0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_time(unix_to_system(1_900_000_000)),
            "2030-03-17T17:46:40Z"
        );
    }
}
