//! The development PKI: one folder holding a CA, the coordinator's, admin's and plants'
//! certificates and keys, and the coordinator's Ed25519 signing key; creating it ([`init`]) and
//! enrolling one more plant into it ([`enrol_plant`]).
//!
//! # Layout
//! ```text
//! DIR/
//!   ca.pem  ca.key                          CA (ECDSA P-256, 10 years)
//!   coordinator.pem  coordinator.key        server: localhost, 127.0.0.1, ::1, extra names;
//!                                           urn:fedinspect:coordinator:<name>
//!   admin.pem  admin.key                    client: urn:fedinspect:admin:<name>
//!   plants/<id>.pem  plants/<id>.key        client: urn:fedinspect:plant:<id>
//!   coordinator-signing.key                 Ed25519 PKCS#8 PEM (see crate::signing)
//!   coordinator-signing.pub                 Ed25519 public key, hex
//! ```
//! Every `.key` file is written with mode 0600, every file atomically. Leaves are valid for
//! [`LEAF_DAYS`] days. The folder holds the CA key, so in a real deployment it stays on the
//! machine that enrols plants; a plant receives only `ca.pem` and its own pair.
//!
//! [`init`] never replaces an existing PKI unless asked to (`force`), since a new CA invalidates
//! every certificate the old one issued.
//!
//! # For tests
//! [`Validity::expired`] / [`Validity::not_yet_valid`] with [`issue_test_plant`] give a
//! certificate outside its dates; a second [`init`] in another folder gives certificates from
//! another CA.

mod ca;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use ca::{CertificateAuthority, IssuedCert, LeafSpec, Validity, CA_DAYS, LEAF_DAYS};

use crate::fsutil;
use crate::signing::{SigningError, SigningKey};
use crate::tls::{validate_name, Role, TlsError, TlsFiles};

/// Subject common name of a development CA, followed by a random tag so two CAs never share a
/// name: operators can tell them apart, and a certificate from another CA fails as
/// "unknown issuer" rather than as a bad signature.
pub const CA_COMMON_NAME: &str = "fedinspect development CA";

/// Everything that can go wrong creating or using a PKI folder.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} already holds a PKI ({} exists); pass --force to replace it, which invalidates every certificate it issued", dir.display(), existing.display())]
    AlreadyInitialised { dir: PathBuf, existing: PathBuf },
    #[error("no CA in {} (ca.pem or ca.key missing); run `fedinspect-certs init --out {}` first", dir.display(), dir.display())]
    NoCa { dir: PathBuf },
    #[error("CA key {} may be read by other users (mode {mode:03o}); run `chmod 600 {}`", path.display(), path.display())]
    InsecureKey { path: PathBuf, mode: u32 },
    #[error("ca.key in {} does not belong to ca.pem; restore the matching pair", dir.display())]
    CaKeyMismatch { dir: PathBuf },
    #[error("{} is malformed ({reason}); restore it from backup", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("plant '{id}' already has a certificate at {}; delete it first to reissue", path.display())]
    PlantExists { id: String, path: PathBuf },
    #[error("plant '{0}' is listed twice; plant ids must be unique")]
    DuplicatePlant(String),
    #[error(
        "'{0}' is neither a DNS name nor an IP address; coordinator names must be one of the two"
    )]
    InvalidServerName(String),
    #[error(transparent)]
    Identity(#[from] TlsError),
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("cannot write or read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create certificate: {0}")]
    Certificate(String),
}

/// Paths inside a PKI folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiLayout {
    root: PathBuf,
}

/// What [`init`] creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOptions {
    pub plants: Vec<String>,
    pub admin: String,
    pub coordinator: String,
    /// Extra DNS names or IP addresses for the coordinator certificate.
    pub coordinator_names: Vec<String>,
    /// Replace an existing PKI in the folder.
    pub force: bool,
}

impl PkiLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    pub fn coordinator_cert(&self) -> PathBuf {
        self.root.join("coordinator.pem")
    }

    pub fn coordinator_key(&self) -> PathBuf {
        self.root.join("coordinator.key")
    }

    pub fn coordinator_signing_key(&self) -> PathBuf {
        self.root.join("coordinator-signing.key")
    }

    pub fn coordinator_verifying_key(&self) -> PathBuf {
        self.root.join("coordinator-signing.pub")
    }

    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("admin.pem")
    }

    pub fn admin_key(&self) -> PathBuf {
        self.root.join("admin.key")
    }

    pub fn plants_dir(&self) -> PathBuf {
        self.root.join("plants")
    }

    pub fn plant_cert(&self, id: &str) -> PathBuf {
        self.plants_dir().join(format!("{id}.pem"))
    }

    pub fn plant_key(&self, id: &str) -> PathBuf {
        self.plants_dir().join(format!("{id}.key"))
    }

    pub fn coordinator_files(&self) -> TlsFiles {
        self.files(self.coordinator_cert(), self.coordinator_key())
    }

    pub fn admin_files(&self) -> TlsFiles {
        self.files(self.admin_cert(), self.admin_key())
    }

    pub fn plant_files(&self, id: &str) -> TlsFiles {
        self.files(self.plant_cert(id), self.plant_key(id))
    }

    fn files(&self, cert: PathBuf, key: PathBuf) -> TlsFiles {
        TlsFiles {
            ca_cert: self.ca_cert(),
            cert,
            key,
        }
    }

    /// Every file [`init`] writes for these plants.
    fn init_files(&self, plants: &[String]) -> Vec<PathBuf> {
        let mut files = vec![
            self.ca_cert(),
            self.ca_key(),
            self.coordinator_cert(),
            self.coordinator_key(),
            self.coordinator_signing_key(),
            self.coordinator_verifying_key(),
            self.admin_cert(),
            self.admin_key(),
        ];
        for id in plants {
            files.extend([self.plant_cert(id), self.plant_key(id)]);
        }
        files
    }
}

impl InitOptions {
    /// Plants `plant-1` to `plant-<n>`, admin `admin`, coordinator `coordinator`.
    pub fn with_plant_count(n: usize) -> Self {
        Self {
            plants: (1..=n).map(|i| format!("plant-{i}")).collect(),
            admin: "admin".into(),
            coordinator: "coordinator".into(),
            coordinator_names: Vec::new(),
            force: false,
        }
    }

    fn validate(&self) -> Result<(), PkiError> {
        let mut seen = BTreeSet::new();
        for id in &self.plants {
            validate_name(Role::Plant, id)?;
            if !seen.insert(id.as_str()) {
                return Err(PkiError::DuplicatePlant(id.clone()));
            }
        }
        validate_name(Role::Admin, &self.admin)?;
        validate_name(Role::Coordinator, &self.coordinator)?;
        Ok(())
    }
}

impl Default for InitOptions {
    fn default() -> Self {
        Self::with_plant_count(3)
    }
}

/// Creates a development PKI in `dir` (see the module docs for the layout).
///
/// Refuses if any file it would write exists, unless `opts.force`; with `force` it also deletes
/// the `.pem` / `.key` files in `plants/`, which the replaced CA signed. Everything is generated
/// in memory first and the CA written last, so a folder with `ca.pem` is complete.
pub fn init(dir: &Path, opts: &InitOptions) -> Result<PkiLayout, PkiError> {
    opts.validate()?;
    let layout = PkiLayout::new(dir);
    if !opts.force {
        let existing = layout
            .init_files(&opts.plants)
            .into_iter()
            .find(|p| p.exists());
        if let Some(existing) = existing {
            return Err(PkiError::AlreadyInitialised {
                dir: dir.to_path_buf(),
                existing,
            });
        }
    }

    let ca_name = format!("{CA_COMMON_NAME} {}", random_tag()?);
    let ca = CertificateAuthority::generate(&ca_name, Validity::days_from_now(CA_DAYS))?;
    let coordinator = ca.issue(&LeafSpec::coordinator(
        &opts.coordinator,
        &opts.coordinator_names,
    )?)?;
    let admin = ca.issue(&LeafSpec::admin(&opts.admin))?;
    let plants = opts
        .plants
        .iter()
        .map(|id| Ok((id, ca.issue(&LeafSpec::plant(id))?)))
        .collect::<Result<Vec<_>, PkiError>>()?;
    let signing = SigningKey::generate()?;

    if opts.force {
        remove_stale_plants(&layout)?;
    }
    coordinator.write(&layout.coordinator_cert(), &layout.coordinator_key())?;
    admin.write(&layout.admin_cert(), &layout.admin_key())?;
    for (id, issued) in &plants {
        issued.write(&layout.plant_cert(id), &layout.plant_key(id))?;
    }
    signing.save(&layout.coordinator_signing_key())?;
    signing
        .verifying_key()
        .save(&layout.coordinator_verifying_key())?;
    ca.write(&layout)?;
    Ok(layout)
}

/// Issues a certificate for one more plant from the CA in `dir` into `plants/<id>.pem|.key`.
/// Refuses a plant that already has a certificate.
pub fn enrol_plant(dir: &Path, plant_id: &str) -> Result<TlsFiles, PkiError> {
    validate_name(Role::Plant, plant_id)?;
    let layout = PkiLayout::new(dir);
    let cert_path = layout.plant_cert(plant_id);
    if cert_path.exists() || layout.plant_key(plant_id).exists() {
        return Err(PkiError::PlantExists {
            id: plant_id.to_string(),
            path: cert_path,
        });
    }
    let ca = CertificateAuthority::load(&layout)?;
    ca.issue(&LeafSpec::plant(plant_id))?
        .write(&cert_path, &layout.plant_key(plant_id))?;
    Ok(layout.plant_files(plant_id))
}

/// For tests: issues a plant certificate with any `validity` from the CA in `ca_dir`, written to
/// `out_dir/<id>.pem|.key` (overwriting), and returns its files with `ca_dir`'s `ca.pem`.
pub fn issue_test_plant(
    ca_dir: &Path,
    plant_id: &str,
    validity: Validity,
    out_dir: &Path,
) -> Result<TlsFiles, PkiError> {
    let layout = PkiLayout::new(ca_dir);
    let ca = CertificateAuthority::load(&layout)?;
    let files = TlsFiles {
        ca_cert: layout.ca_cert(),
        cert: out_dir.join(format!("{plant_id}.pem")),
        key: out_dir.join(format!("{plant_id}.key")),
    };
    ca.issue(&LeafSpec::plant(plant_id).with_validity(validity))?
        .write(&files.cert, &files.key)?;
    Ok(files)
}

/// Writes a certificate (0644) and its key (0600), each atomically; the key first, so a
/// certificate on disk always has its key.
fn write_key_pair(
    cert_path: &Path,
    cert_pem: &str,
    key_path: &Path,
    key_pem: &str,
) -> Result<(), PkiError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    fsutil::write_atomic_with_mode(key_path, Some(0o600), |w| w.write_all(key_pem.as_bytes()))
        .map_err(io(key_path))?;
    fsutil::write_atomic_with_mode(cert_path, Some(0o644), |w| w.write_all(cert_pem.as_bytes()))
        .map_err(io(cert_path))
}

/// Eight random hex digits.
fn random_tag() -> Result<String, PkiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Certificate("the system random source failed".into()))?;
    Ok(hex::encode(bytes))
}

fn remove_stale_plants(layout: &PkiLayout) -> Result<(), PkiError> {
    let dir = layout.plants_dir();
    let io = |path: &Path, source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io(&dir, e))?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("pem" | "key")) {
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}
