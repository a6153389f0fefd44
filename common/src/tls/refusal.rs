//! Refused client certificates, made visible: [`RecordingVerifier`] wraps the server's rustls
//! `ClientCertVerifier` and keeps what it refused (the reason, and the presented certificate's
//! subject, identity URI and serial) in a per-connection [`RefusalSlot`], and
//! [`AuditedServerTls`] builds one server config per connection around it, so the code that
//! accepts connections can audit a refused handshake with the peer's address.
//!
//! It exists because a refused handshake otherwise ends inside the TLS acceptor, before any
//! request handler, and so left no trace in the audit log (docs/reliability.md).

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};

use super::identity::{certificate_info, URI_PREFIX};
use super::{config_error, TlsError};

/// Why a client certificate was refused at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// The client sent no certificate.
    NoCertificate,
    /// The certificate does not chain to the trusted CA (another CA, or self-signed).
    UnknownIssuer,
    Expired,
    NotYetValid,
    /// A signature in the chain, or the client's handshake signature, does not verify.
    BadSignature,
    Revoked,
    /// Anything else wrong with the certificate (purpose, encoding, ...).
    BadCertificate,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 7] = [
        RefusalReason::NoCertificate,
        RefusalReason::UnknownIssuer,
        RefusalReason::Expired,
        RefusalReason::NotYetValid,
        RefusalReason::BadSignature,
        RefusalReason::Revoked,
        RefusalReason::BadCertificate,
    ];

    /// A stable snake_case name, for metric labels and audit details.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::NoCertificate => "no_certificate",
            RefusalReason::UnknownIssuer => "unknown_issuer",
            RefusalReason::Expired => "expired",
            RefusalReason::NotYetValid => "not_yet_valid",
            RefusalReason::BadSignature => "bad_signature",
            RefusalReason::Revoked => "revoked",
            RefusalReason::BadCertificate => "bad_certificate",
        }
    }

    /// The reason behind a rustls error, when it is about the client's certificate.
    pub fn of(e: &Error) -> Option<Self> {
        use CertificateError as C;
        Some(match e {
            Error::NoCertificatesPresented => RefusalReason::NoCertificate,
            Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => RefusalReason::UnknownIssuer,
                C::Expired | C::ExpiredContext { .. } => RefusalReason::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => RefusalReason::NotYetValid,
                C::BadSignature
                | C::UnsupportedSignatureAlgorithmContext { .. }
                | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                    RefusalReason::BadSignature
                }
                C::Revoked => RefusalReason::Revoked,
                _ => RefusalReason::BadCertificate,
            },
            _ => return None,
        })
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a refused client presented, read without trusting it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresentedCertificate {
    pub subject: String,
    /// The `urn:fedinspect:...` SAN URI it claims, else its first SAN URI or DNS name.
    pub claimed_identity: Option<String>,
    pub serial: String,
}

/// One refused client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRefusal {
    pub reason: RefusalReason,
    /// rustls's words for it.
    pub error: String,
    /// `None` when no certificate came, or it could not be parsed.
    pub presented: Option<PresentedCertificate>,
}

impl fmt::Display for CertificateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client certificate refused: {} ({})",
            self.reason, self.error
        )?;
        if let Some(p) = &self.presented {
            write!(f, "; presented subject '{}'", p.subject)?;
            if let Some(id) = &p.claimed_identity {
                write!(f, ", claiming {id}")?;
            }
            write!(f, ", serial {}", p.serial)?;
        }
        Ok(())
    }
}

/// Where one connection's verifier leaves what it refused.
#[derive(Clone, Debug, Default)]
pub struct RefusalSlot(Arc<Mutex<Option<CertificateRefusal>>>);

impl RefusalSlot {
    fn put(&self, refusal: CertificateRefusal) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(refusal);
    }

    /// The refusal of this connection's handshake, if `handshake_error` (the error the TLS
    /// acceptor returned) is a refused client certificate; `None` for other failures (the
    /// peer hung up, spoke something else than TLS, timed out).
    pub fn refusal(&self, handshake_error: &std::io::Error) -> Option<CertificateRefusal> {
        let recorded = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if recorded.is_some() {
            return recorded;
        }
        let rustls_error = handshake_error.get_ref()?.downcast_ref::<Error>()?;
        Some(CertificateRefusal {
            reason: RefusalReason::of(rustls_error)?,
            error: rustls_error.to_string(),
            presented: None,
        })
    }
}

/// A `ClientCertVerifier` that asks `inner` and records each refusal in its slot.
#[derive(Debug)]
pub struct RecordingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    slot: RefusalSlot,
}

impl RecordingVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, slot: RefusalSlot) -> Self {
        Self { inner, slot }
    }

    fn record<T>(&self, cert: &CertificateDer<'_>, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            if let Some(reason) = RefusalReason::of(e) {
                self.slot.put(CertificateRefusal {
                    reason,
                    error: e.to_string(),
                    presented: presented(cert),
                });
            }
        }
        result
    }
}

impl ClientCertVerifier for RecordingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let result = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        self.record(end_entity, result)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let result = self.inner.verify_tls12_signature(message, cert, dss);
        self.record(cert, result)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let result = self.inner.verify_tls13_signature(message, cert, dss);
        self.record(cert, result)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// What a refused certificate says about itself, if it parses.
fn presented(cert: &CertificateDer<'_>) -> Option<PresentedCertificate> {
    let info = certificate_info(cert).ok()?;
    let claimed_identity = info
        .uris
        .iter()
        .find(|u| u.starts_with(URI_PREFIX))
        .or_else(|| info.uris.first())
        .or_else(|| info.dns_names.first())
        .cloned();
    Some(PresentedCertificate {
        subject: info.subject,
        claimed_identity,
        serial: info.serial,
    })
}

/// The coordinator's server TLS, one config per accepted connection so that each handshake
/// records its own refusal ([`AuditedServerTls::connection`]).
pub struct AuditedServerTls {
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<SingleCertAndKey>,
    sessions: Arc<dyn StoresServerSessions>,
    alpn: Vec<Vec<u8>>,
}

impl AuditedServerTls {
    pub(super) fn new(
        provider: Arc<CryptoProvider>,
        verifier: Arc<dyn ClientCertVerifier>,
        certified: CertifiedKey,
        alpn: Vec<Vec<u8>>,
    ) -> Self {
        Self {
            provider,
            verifier,
            certified: Arc::new(SingleCertAndKey::from(certified)),
            sessions: ServerSessionMemoryCache::new(256),
            alpn,
        }
    }

    /// A server config for one connection (TLS 1.3, client certificate required) and the
    /// slot in which its verifier leaves a refusal. Cheap: everything is shared but the slot.
    pub fn connection(&self) -> Result<(Arc<ServerConfig>, RefusalSlot), TlsError> {
        let slot = RefusalSlot::default();
        let verifier = Arc::new(RecordingVerifier::new(self.verifier.clone(), slot.clone()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.certified.clone());
        config.alpn_protocols = self.alpn.clone();
        config.session_storage = self.sessions.clone();
        Ok((Arc::new(config), slot))
    }
}

impl fmt::Debug for AuditedServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditedServerTls")
            .field("alpn", &self.alpn)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
