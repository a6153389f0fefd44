//! Signed inference bundles: what a plant's inspection line installs to run a published model,
//! provably the one the coordinator published.
//!
//! A bundle is a flat directory (no subfolders, no links):
//!
//! ```text
//! manifest.json                    what the bundle is (BundleManifest), as pretty JSON
//! manifest.sig                     Ed25519 signature of manifest.json's exact bytes (coordinator key)
//! model-fp32.onnx                  FP32 ONNX, BatchNorm folded (onnx::export)
//! model-int8-qdq.onnx              INT8 QDQ ONNX, when calibration ranges were given (onnx::export_qdq)
//! weights.safetensors              the model state, loadable as a client checkpoint
//! engine-<prec>-sm<cc>-trt<v>.plan TensorRT engines, where built (one per precision and target)
//! ```
//!
//! The manifest lists every file but itself and the signature, with its role, size and SHA-256;
//! [`verify_bundle`] checks the signature with a pinned key first, then refuses any file that is
//! missing, unlisted, of the wrong size or the wrong hash. [`build_bundle`] stages everything in a
//! temporary sibling folder and renames it into place, so a bundle directory is whole or absent.
//! [`pack`] and [`unpack`] turn a bundle into one deterministic tar stream (for `DownloadBundle`)
//! and back, refusing links, path traversal and oversized entries. [`trtexec`] runs NVIDIA's
//! `trtexec` with a time limit and [`engine_cache`] keeps what it built; [`TrtexecEngines`] puts
//! the two together as the engine step of a build.

mod archive;
mod build;
pub mod engine_cache;
mod engines;
mod error;
mod files;
mod manifest;
mod signature;
pub mod trtexec;
mod verify;

pub use archive::{pack, unpack, UnpackLimits};
pub use build::{
    build_bundle, default_preprocessing, rfc3339_utc, BuildReport, BundleInputs, BundleMetadata,
};
pub use engines::{EngineOutcome, EngineStep, NoEngines, StagedOnnx, TrtexecEngines};
pub use error::BundleError;
pub use files::{is_valid_file_name, sha256_file, staging_sibling, sync_tree};
pub use manifest::{
    engine_file_name, BundleManifest, ClaheSpec, Dim, EngineEntry, EnginePrecision, EngineTarget,
    FileEntry, FileRole, InputSpec, LetterboxSpec, OutputSpec, Postprocessing, Preprocessing,
};
pub use signature::{manifest_sha256, sign_manifest, verify_manifest, ManifestSignature};
pub use verify::{verify_bundle, VerifiedBundle};

/// Value of [`BundleManifest::format`]; a reader refuses any other.
pub const FORMAT: &str = "fedinspect-bundle-v1";
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The detached signature's file name.
pub const SIGNATURE_FILE: &str = "manifest.sig";
/// The FP32 ONNX model's file name.
pub const ONNX_FP32_FILE: &str = "model-fp32.onnx";
/// The INT8 QDQ ONNX model's file name.
pub const ONNX_INT8_QDQ_FILE: &str = "model-int8-qdq.onnx";
/// The weights' file name.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// Largest manifest a reader accepts (a real one is a few KiB).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Grey level of the letterbox padding, the client loader's `PAD_VALUE` (mid-grey).
pub const DEFAULT_LETTERBOX_PAD: u8 = 114;

/// The id of the bundle of model `version` whose manifest hashes to `manifest_sha256` (hex):
/// `v<version>-<first 16 hex digits>`. Coordinator and plants name bundles this way.
pub fn bundle_id(version: u64, manifest_sha256: &str) -> String {
    let short = manifest_sha256.get(..16).unwrap_or(manifest_sha256);
    format!("v{version}-{short}")
}
