//! Reading our own CA, certificate chain and key from PEM files, and every start-up check on
//! them, so a misconfigured node fails when it starts instead of at its first connection.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, RootCertStore};

use super::identity::{certificate_info, format_time, peer_identity, CertificateInfo, Role};
use super::{TlsError, TlsFiles, TlsMaterial, TonicPem};

const CA_WHAT: &str = "CA certificate";
const CERT_WHAT: &str = "certificate";
const KEY_WHAT: &str = "private key";

/// Loads and checks `files` for a node of `role`, as of `now`.
pub(super) fn load_at(
    files: &TlsFiles,
    role: Role,
    now: SystemTime,
) -> Result<TlsMaterial, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let ca_pem = read_file(CA_WHAT, &files.ca_cert)?;
    let ca_certs = certificates(CA_WHAT, &files.ca_cert, &ca_pem)?;
    for ca in &ca_certs {
        let info = certificate_info(ca)?;
        if !info.is_ca {
            return Err(TlsError::InvalidCa {
                path: files.ca_cert.clone(),
                reason: format!(
                    "'{}' is not a CA certificate (basic constraints)",
                    info.subject
                ),
            });
        }
        check_dates(CA_WHAT, &files.ca_cert, &info, now)?;
    }
    let roots = Arc::new(root_store(&files.ca_cert, &ca_certs)?);

    let cert_pem = read_file(CERT_WHAT, &files.cert)?;
    let chain = certificates(CERT_WHAT, &files.cert, &cert_pem)?;
    let key_pem = read_file(KEY_WHAT, &files.key)?;
    let key = private_key(&files.key, &key_pem)?;

    let identity = peer_identity(&chain[0])?;
    identity.require_role(role)?;
    check_dates(CERT_WHAT, &files.cert, &certificate_info(&chain[0])?, now)?;
    check_key_matches(files, &chain, &key, &provider)?;
    check_issued_by_ca(files, role, &chain, &roots, &provider, now)?;

    Ok(TlsMaterial {
        identity,
        roots,
        chain,
        key,
        provider,
        pem: TonicPem {
            ca_pem,
            cert_pem,
            key_pem,
        },
    })
}

/// Builds the trust store holding exactly the certificates of the CA file.
fn root_store(
    ca_path: &Path,
    ca_certs: &[CertificateDer<'static>],
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in ca_certs {
        roots.add(ca.clone()).map_err(|e| TlsError::InvalidCa {
            path: ca_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

pub(super) fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TlsError::MissingFile {
                what,
                path: path.to_path_buf(),
            }
        } else {
            TlsError::Io {
                what,
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn sections(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    <(SectionKind, Vec<u8>)>::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::UnreadablePem {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Every certificate in a PEM file, in file order; at least one.
pub(super) fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = sections(what, path, pem)?
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    sections(KEY_WHAT, path, pem)?
        .into_iter()
        .find_map(|(kind, der)| PrivateKeyDer::from_pem(kind, der))
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        })
}

fn check_dates(
    what: &'static str,
    path: &Path,
    info: &CertificateInfo,
    now: SystemTime,
) -> Result<(), TlsError> {
    let dates = || {
        (
            path.to_path_buf(),
            format_time(info.not_before),
            format_time(info.not_after),
            format_time(now),
        )
    };
    if now > info.not_after {
        let (path, not_before, not_after, now) = dates();
        return Err(TlsError::CertificateExpired {
            what,
            path,
            not_before,
            not_after,
            now,
        });
    }
    if now < info.not_before {
        let (path, not_before, not_after, now) = dates();
        return Err(TlsError::CertificateNotYetValid {
            what,
            path,
            not_before,
            not_after,
            now,
        });
    }
    Ok(())
}

fn check_key_matches(
    files: &TlsFiles,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(), TlsError> {
    match rustls::sign::CertifiedKey::from_der(chain.to_vec(), key.clone_key(), provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(e) => Err(TlsError::UnreadablePem {
            what: KEY_WHAT,
            path: files.key.clone(),
            reason: format!("unsupported private key: {e}"),
        }),
    }
}

/// Runs the same chain check the peer will run: client-auth for plants and admins, server-auth
/// for the coordinator.
fn check_issued_by_ca(
    files: &TlsFiles,
    role: Role,
    chain: &[CertificateDer<'static>],
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    now: SystemTime,
) -> Result<(), TlsError> {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let now = UnixTime::since_unix_epoch(since_epoch);
    let (leaf, intermediates) = (&chain[0], &chain[1..]);
    let result = match role {
        Role::Coordinator => ParsedCertificate::try_from(leaf).and_then(|parsed| {
            verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                provider.signature_verification_algorithms.all,
            )
        }),
        Role::Plant | Role::Admin => super::client_verifier(roots.clone(), provider.clone())?
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ()),
    };
    result.map_err(|e| match e {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => TlsError::NotSignedByCa {
            cert: files.cert.clone(),
            ca: files.ca_cert.clone(),
        },
        other => TlsError::CertificateRejected {
            path: files.cert.clone(),
            reason: other.to_string(),
        },
    })
}
