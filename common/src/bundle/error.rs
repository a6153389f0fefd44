//! Everything that can go wrong building, verifying, packing or unpacking a bundle: one variant
//! per cause, each naming the file and saying what to do, so a plant engineer reading a refused
//! install knows whether the download, the key or the coordinator is at fault.

use std::io;
use std::path::PathBuf;

use super::trtexec::TrtexecError;
use crate::model::ModelError;
use crate::onnx::OnnxError;
use crate::signing::SigningError;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot {action} {}: {source}; check the folder's permissions and free space", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot export the model to ONNX: {0}")]
    Export(#[from] OnnxError),
    #[error("cannot write the weights: {0}")]
    Weights(#[from] ModelError),
    #[error("cannot sign the manifest: {0}")]
    Signing(#[from] SigningError),
    #[error("invalid bundle metadata: {0}; fix what the caller passes to build_bundle")]
    Metadata(String),
    #[error("{} already exists; a bundle directory is never overwritten, choose a new folder or remove the old one", path.display())]
    DestinationExists { path: PathBuf },
    #[error("{} is not a bundle directory ({reason}); pass the folder that holds manifest.json", path.display())]
    NotADirectory { path: PathBuf, reason: String },
    #[error("bundle {} has no {file}; the download is incomplete or this is not a bundle, fetch it again", dir.display())]
    MissingManifest { dir: PathBuf, file: &'static str },
    #[error("{} is {size} bytes, more than the {limit} a manifest may have; this is not a fedinspect bundle manifest", path.display())]
    ManifestTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{} is not a valid bundle signature ({reason}); fetch the bundle again", path.display())]
    SignatureMalformed { path: PathBuf, reason: String },
    #[error("bundle {} was signed by key {found} but this plant pins coordinator key {expected}; the bundle comes from another coordinator, or the pinned key is outdated (check the coordinator public key in the plant's config)", dir.display())]
    WrongKey {
        dir: PathBuf,
        expected: String,
        found: String,
    },
    #[error("the signature of {} does not verify: manifest.json was altered after signing or the signature is forged; do not install it, fetch it again from the coordinator", dir.display())]
    BadSignature { dir: PathBuf },
    #[error("{} is signed but not a valid manifest ({reason}); the coordinator wrote a manifest this version cannot read, upgrade the client", path.display())]
    ManifestMalformed { path: PathBuf, reason: String },
    #[error("bundle format '{found}' is not '{expected}', the only one this version reads; upgrade the client or rebuild the bundle with a matching coordinator", expected = super::FORMAT)]
    UnsupportedFormat { found: String },
    #[error("bundle {} lacks {name}, which its manifest lists; the download is incomplete, fetch it again", dir.display())]
    MissingFile { dir: PathBuf, name: String },
    #[error("bundle {} holds {name}, which its manifest does not list; refusing unsigned content, fetch a clean copy", dir.display())]
    UnexpectedFile { dir: PathBuf, name: String },
    #[error("{name} in bundle {} is not a regular file ({kind}); bundles hold plain files only, fetch a clean copy", dir.display())]
    NotARegularFile {
        dir: PathBuf,
        name: String,
        kind: &'static str,
    },
    #[error("{name} in bundle {} is {found} bytes but the manifest says {expected}{}; fetch it again", dir.display(), truncated_hint(*found, *expected))]
    SizeMismatch {
        dir: PathBuf,
        name: String,
        expected: u64,
        found: u64,
    },
    #[error("{name} in bundle {} has SHA-256 {found} but the manifest says {expected}: the file was altered or corrupted; do not install it, fetch it again", dir.display())]
    HashMismatch {
        dir: PathBuf,
        name: String,
        expected: String,
        found: String,
    },
    #[error("bundle manifest SHA-256 is {found} but the install task names {expected}; this is not the bundle the coordinator asked for, fetch it again")]
    ManifestHashMismatch { expected: String, found: String },
    #[error("bundle archive entry '{entry}' refused: {reason}; the download is corrupt or was tampered with, fetch it again")]
    ArchiveEntry { entry: String, reason: String },
    #[error(
        "bundle archive unreadable: {reason}; the download is truncated or corrupt, fetch it again"
    )]
    Archive { reason: String },
    #[error("engine build failed: {0}")]
    Engine(#[from] TrtexecError),
}

fn truncated_hint(found: u64, expected: u64) -> &'static str {
    if found < expected {
        " (truncated)"
    } else {
        ""
    }
}

impl BundleError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        BundleError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
