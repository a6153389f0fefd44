//! Mutual TLS for fedinspect: rustls server and client configurations built from PEM files,
//! checked at load time, and the identity scheme that names each peer.
//!
//! # Identity
//! A peer is who its certificate's SAN URI says: `urn:fedinspect:plant:<id>`,
//! `urn:fedinspect:admin:<name>` or `urn:fedinspect:coordinator:<name>`, with the name matching
//! `[a-z0-9][a-z0-9-_.]{0,62}`. Nothing else (subject CN, DNS names) is ever read as an identity;
//! a certificate without exactly one such URI is refused. See [`peer_identity`].
//!
//! # Trust
//! Both sides trust only the CA file they are given, never the system roots. The server requires
//! a client certificate chaining to that CA; the client requires the same of the server. Only
//! TLS 1.3 is offered: both ends are ours, so there is no legacy peer to accommodate.
//!
//! # Load-time checks
//! [`TlsMaterial::load`] reads the CA, own chain and own key and refuses, each with its own
//! [`TlsError`] variant: a missing file, unreadable PEM, a file without a certificate or key, a
//! key that does not match the certificate, a certificate (or CA) outside its validity dates, a
//! certificate the CA did not issue, one that is not a fedinspect identity or has the wrong role.
//!
//! # tonic
//! tonic (with `tls-ring`) builds its own rustls configs from PEM; [`TlsMaterial::tonic_pem`]
//! hands over the PEM bytes that passed these checks. gRPC needs ALPN `h2`; set
//! `alpn_protocols` on the rustls configs here when serving HTTP/2 over them directly.
//!
//! # Refused client certificates
//! The coordinator does not use tonic's acceptor: [`TlsMaterial::audited_server_tls`] gives
//! one server config per connection whose [`RecordingVerifier`] keeps what it refused, so the
//! acceptor can audit it with the peer's address (`refusal`).

mod identity;
mod load;
mod refusal;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use identity::{
    certificate_info, format_time, peer_identity, validate_name, CertificateInfo, PeerIdentity,
    Role, MAX_NAME_LEN, URI_PREFIX,
};
pub use refusal::{
    AuditedServerTls, CertificateRefusal, PresentedCertificate, RecordingVerifier, RefusalReason,
    RefusalSlot,
};

/// Everything that can be wrong with TLS files, certificates or peers.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} file {} does not exist; fix the path or create it with `fedinspect-certs init`", path.display())]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("cannot read {what} file {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} file {} is not readable PEM ({reason}); replace it with the PEM file `fedinspect-certs` wrote", path.display())]
    UnreadablePem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} file {} holds no certificate; expected a -----BEGIN CERTIFICATE----- block (convert DER with `openssl x509 -inform der`)", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("key file {} holds no private key; expected a -----BEGIN PRIVATE KEY----- block", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("private key {} does not belong to certificate {}; configure the key issued with that certificate", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{what} {} expired at {not_after} (valid from {not_before}, now {now}); issue a new one with `fedinspect-certs`", path.display())]
    CertificateExpired {
        what: &'static str,
        path: PathBuf,
        not_before: String,
        not_after: String,
        now: String,
    },
    #[error("{what} {} is not valid until {not_before} (valid to {not_after}, now {now}); check this machine's clock", path.display())]
    CertificateNotYetValid {
        what: &'static str,
        path: PathBuf,
        not_before: String,
        not_after: String,
        now: String,
    },
    #[error("certificate {} was not issued by the CA in {}; use the CA that issued it, or enrol this node again with the configured CA", cert.display(), ca.display())]
    NotSignedByCa { cert: PathBuf, ca: PathBuf },
    #[error("CA file {} cannot serve as a trust anchor ({reason}); point it at the CA's ca.pem", path.display())]
    InvalidCa { path: PathBuf, reason: String },
    #[error("certificate {} is refused by the CA chain check ({reason}); reissue it with `fedinspect-certs`", path.display())]
    CertificateRejected { path: PathBuf, reason: String },
    #[error("not a valid X.509 certificate ({reason})")]
    BadCertificate { reason: String },
    #[error("certificate '{subject}' is not a fedinspect identity ({reason}); issue it with `fedinspect-certs`, which adds a SAN URI urn:fedinspect:<role>:<name>")]
    NotFedinspectIdentity { subject: String, reason: String },
    #[error("'{name}' is not a valid {role} name: use 1 to 63 characters from a-z, 0-9, '-', '_' and '.', starting with a letter or digit")]
    InvalidName { role: Role, name: String },
    #[error("unknown role '{0}'; expected plant, admin or coordinator")]
    UnknownRole(String),
    #[error("{found} '{id}' is not allowed here, a {expected} certificate is required; configure the certificate issued for this {expected}")]
    WrongRole {
        expected: Role,
        found: Role,
        id: String,
    },
    #[error(
        "peer presented no certificate; it must connect with its fedinspect client certificate"
    )]
    NoPeerCertificate,
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// Where a node's TLS files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the CA certificate(s) to trust, and only those.
    pub ca_cert: PathBuf,
    /// PEM file with the node's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM file with the node's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// The PEM bytes tonic's `Identity::from_pem` and `Certificate::from_pem` take, after checks.
#[derive(Clone)]
pub struct TonicPem {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// A node's checked TLS material: its identity, trust store, chain and key.
pub struct TlsMaterial {
    identity: PeerIdentity,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
    pem: TonicPem,
}

impl TlsMaterial {
    /// Loads `files` for a node of `role` and runs every load-time check (see the module docs).
    pub fn load(files: &TlsFiles, role: Role) -> Result<Self, TlsError> {
        load::load_at(files, role, SystemTime::now())
    }

    /// Our own identity, read from our certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    /// A server config that requires a client certificate issued by the CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = client_verifier(self.roots.clone(), self.provider.clone())?;
        let config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(config_error)?;
        Ok(Arc::new(config))
    }

    /// The server TLS of a coordinator that audits refused client certificates: one config
    /// per connection, each recording its own refusal ([`AuditedServerTls::connection`]).
    /// `alpn` is offered as is (gRPC needs `h2`).
    pub fn audited_server_tls(&self, alpn: &[&[u8]]) -> Result<AuditedServerTls, TlsError> {
        let verifier = client_verifier(self.roots.clone(), self.provider.clone())?;
        let certified = rustls::sign::CertifiedKey::from_der(
            self.chain.clone(),
            self.key.clone_key(),
            &self.provider,
        )
        .map_err(config_error)?;
        Ok(AuditedServerTls::new(
            self.provider.clone(),
            verifier,
            certified,
            alpn.iter().map(|p| p.to_vec()).collect(),
        ))
    }

    /// A client config that presents our certificate and trusts only the CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(config_error)?;
        Ok(Arc::new(config))
    }

    /// The checked PEM files, for tonic's `ServerTlsConfig` / `ClientTlsConfig`.
    pub fn tonic_pem(&self) -> &TonicPem {
        &self.pem
    }
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TonicPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TonicPem")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Loads the coordinator's files and builds its server config.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    TlsMaterial::load(files, Role::Coordinator)?.server_config()
}

/// Loads a plant's or admin's files and builds its client config.
pub fn client_config(files: &TlsFiles, role: Role) -> Result<Arc<ClientConfig>, TlsError> {
    TlsMaterial::load(files, role)?.client_config()
}

/// Loads and checks `files` for `role` and returns the PEM bytes for tonic.
pub fn tonic_pem(files: &TlsFiles, role: Role) -> Result<TonicPem, TlsError> {
    Ok(TlsMaterial::load(files, role)?.pem)
}

/// The identity of a connected peer from the certificates rustls verified
/// (`ServerConnection::peer_certificates`, or tonic's `Request::peer_certs`).
pub fn identity_of_peer(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    peer_identity(leaf)
}

/// Reads every certificate in a PEM file (for `fedinspect-certs show`).
pub fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = load::read_file("certificate", path)?;
    load::certificates("certificate", path, &pem)
}

fn client_verifier(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

fn config_error(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}
