//! Building a bundle directory from a model: the ONNX exports (FP32, and INT8 QDQ when
//! calibration ranges are given), the weights, the engine step, the manifest and its signature,
//! all staged in a temporary sibling folder, fsynced, and renamed into place.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::engines::{EngineStep, StagedOnnx};
use super::files::{sha256_file, staging_sibling, sync_tree};
use super::manifest::{
    BundleManifest, Dim, FileEntry, FileRole, InputSpec, LetterboxSpec, OutputSpec, Postprocessing,
    Preprocessing,
};
use super::signature::{manifest_sha256, sign_manifest};
use super::{
    BundleError, DEFAULT_LETTERBOX_PAD, FORMAT, MANIFEST_FILE, ONNX_FP32_FILE, ONNX_INT8_QDQ_FILE,
    SIGNATURE_FILE, WEIGHTS_FILE,
};
use crate::arch::{ArchConfig, BOX_CHANNELS, OUTPUT_STRIDE};
use crate::fsutil;
use crate::model::ModelState;
use crate::onnx::{self, ActivationRanges, ExportOptions, Spatial};
use crate::signing::SigningKey;

/// Safetensors metadata keys of `weights.safetensors`: those of a v1 detector checkpoint of
/// the client (`client::detector::checkpoint`), so the file loads as one.
const CHECKPOINT_FORMAT_KEY: &str = "fedinspect.format";
const CHECKPOINT_FORMAT_V1: &str = "fedinspect-detector-checkpoint-v1";
const CHECKPOINT_ARCH_KEY: &str = "fedinspect.arch";
const CHECKPOINT_CLASSES_KEY: &str = "fedinspect.class_names";
const CHECKPOINT_EPOCH_KEY: &str = "fedinspect.epoch";
const CHECKPOINT_METRICS_KEY: &str = "fedinspect.metrics";
/// Extra weights metadata: the federation's model version.
const MODEL_VERSION_KEY: &str = "fedinspect.model_version";

/// What the manifest says about the model besides what the weights determine.
#[derive(Clone, Debug, PartialEq)]
pub struct BundleMetadata {
    /// 1 to 64 characters from `[A-Za-z0-9_-]` (a Triton model name).
    pub model_name: String,
    pub model_version: u64,
    /// RFC 3339 time of the build, from the caller's clock.
    pub built_at: String,
    pub class_names: Vec<String>,
    pub score_threshold: f32,
    pub top_k: u32,
    pub metrics: BTreeMap<String, f64>,
    /// `None`: the client loader's defaults for the architecture (grey levels / 255, no
    /// mean or standard deviation, mid-grey letterbox, no CLAHE).
    pub preprocessing: Option<Preprocessing>,
    /// Largest batch of the engines' optimisation profile and Triton's `max_batch_size`.
    pub max_batch: u32,
}

impl BundleMetadata {
    /// Metadata with the defaults: name `fedinspect_detector`, top 100, batch up to 8, no
    /// metrics, default preprocessing.
    pub fn new(
        model_version: u64,
        class_names: Vec<String>,
        score_threshold: f32,
        built_at: impl Into<String>,
    ) -> Self {
        Self {
            model_name: "fedinspect_detector".to_string(),
            model_version,
            built_at: built_at.into(),
            class_names,
            score_threshold,
            top_k: 100,
            metrics: BTreeMap::new(),
            preprocessing: None,
            max_batch: 8,
        }
    }
}

/// The model to bundle.
#[derive(Clone, Debug)]
pub struct BundleInputs<'a> {
    pub arch: &'a ArchConfig,
    pub state: &'a ModelState,
    /// Merged calibration ranges; with them the bundle also carries the INT8 QDQ model.
    pub calibration: Option<&'a ActivationRanges>,
    pub metadata: BundleMetadata,
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub dir: PathBuf,
    pub manifest: BundleManifest,
    pub manifest_sha256: String,
    /// Time spent exporting ONNX and weights.
    pub export_seconds: f64,
    /// Time spent in the engine step.
    pub engine_seconds: f64,
}

/// Builds the bundle of `inputs` at `out` (which must not exist), signed with `key`.
pub fn build_bundle(
    out: &Path,
    inputs: &BundleInputs<'_>,
    key: &SigningKey,
    engines: &mut dyn EngineStep,
) -> Result<BuildReport, BundleError> {
    check_metadata(inputs.arch, &inputs.metadata).map_err(BundleError::Metadata)?;
    if out.exists() {
        return Err(BundleError::DestinationExists {
            path: out.to_path_buf(),
        });
    }
    let staging = staging_sibling(out, "staging");
    fs::create_dir_all(&staging).map_err(|e| BundleError::io("create", &staging, e))?;
    let staged = stage(&staging, inputs, key, engines);
    let finished = staged.and_then(|report| {
        if out.exists() {
            return Err(BundleError::DestinationExists {
                path: out.to_path_buf(),
            });
        }
        fs::rename(&staging, out).map_err(|e| BundleError::io("rename into place", out, e))?;
        let parent = staging.parent().unwrap_or(Path::new("."));
        fsutil::sync_dir(parent).map_err(|e| BundleError::io("sync", parent, e))?;
        Ok(report)
    });
    if finished.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    let mut report = finished?;
    report.dir = out.to_path_buf();
    Ok(report)
}

fn stage(
    dir: &Path,
    inputs: &BundleInputs<'_>,
    key: &SigningKey,
    engines: &mut dyn EngineStep,
) -> Result<BuildReport, BundleError> {
    let (arch, meta) = (inputs.arch, &inputs.metadata);
    let started = Instant::now();
    let options = ExportOptions {
        spatial: Spatial::of(arch),
        model_version: i64::try_from(meta.model_version).ok(),
        metadata: BTreeMap::new(),
    };
    let mut onnx_files = Vec::new();
    let fp32 = onnx::export(arch, inputs.state, &options)?;
    onnx_files.push(write_staged(
        dir,
        ONNX_FP32_FILE,
        FileRole::OnnxFp32,
        &fp32,
    )?);
    if let Some(ranges) = inputs.calibration {
        let int8 = onnx::export_qdq(arch, inputs.state, ranges, &options)?;
        let role = FileRole::OnnxInt8Qdq;
        onnx_files.push(write_staged(dir, ONNX_INT8_QDQ_FILE, role, &int8)?);
    }
    let weights = inputs
        .state
        .to_safetensors_bytes(&weights_metadata(arch, meta))?;
    write_staged(dir, WEIGHTS_FILE, FileRole::WeightsSafetensors, &weights)?;
    let export_seconds = started.elapsed().as_secs_f64();

    let input = input_spec(arch, meta.max_batch);
    let started = Instant::now();
    let engine_outcome = engines.build(&onnx_files, &input, dir)?;
    let engine_seconds = started.elapsed().as_secs_f64();

    let mut files = Vec::new();
    let named = [
        (FileRole::OnnxFp32, ONNX_FP32_FILE.to_string()),
        (FileRole::OnnxInt8Qdq, ONNX_INT8_QDQ_FILE.to_string()),
        (FileRole::WeightsSafetensors, WEIGHTS_FILE.to_string()),
    ];
    let engine_files = engine_outcome
        .engines
        .iter()
        .map(|e| (FileRole::Engine, e.file.clone()));
    for (role, name) in named.into_iter().chain(engine_files) {
        let path = dir.join(&name);
        if role == FileRole::OnnxInt8Qdq && !path.exists() {
            continue;
        }
        let (sha256, size) = sha256_file(&path).map_err(|e| BundleError::io("read", &path, e))?;
        files.push(FileEntry {
            role,
            name,
            size,
            sha256,
        });
    }
    let manifest = BundleManifest {
        format: FORMAT.to_string(),
        model_name: meta.model_name.clone(),
        model_version: meta.model_version,
        model_hash: inputs.state.content_hash().to_hex(),
        built_at: meta.built_at.clone(),
        architecture: arch.clone(),
        input,
        outputs: output_specs(arch),
        preprocessing: meta
            .preprocessing
            .clone()
            .unwrap_or_else(|| default_preprocessing(arch)),
        postprocessing: Postprocessing {
            method: "centernet".to_string(),
            peak_window: 3,
            top_k: meta.top_k,
            output_stride: OUTPUT_STRIDE,
        },
        class_names: meta.class_names.clone(),
        score_threshold: meta.score_threshold,
        metrics: meta.metrics.clone(),
        files,
        engines: engine_outcome.engines,
        engine_note: engine_outcome.note,
    };
    manifest
        .check()
        .map_err(|p| BundleError::Metadata(p.join("; ")))?;
    let mut bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BundleError::Metadata(format!("manifest does not serialise: {e}")))?;
    bytes.push(b'\n');
    let sig = sign_manifest(&bytes, key);
    let mut sig_bytes = serde_json::to_vec_pretty(&sig).expect("a signature serialises");
    sig_bytes.push(b'\n');
    write_file(dir, MANIFEST_FILE, &bytes)?;
    write_file(dir, SIGNATURE_FILE, &sig_bytes)?;
    sync_tree(dir).map_err(|e| BundleError::io("sync", dir, e))?;
    Ok(BuildReport {
        dir: dir.to_path_buf(),
        manifest,
        manifest_sha256: manifest_sha256(&bytes),
        export_seconds,
        engine_seconds,
    })
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, BundleError> {
    let path = dir.join(name);
    fsutil::write_bytes_atomic(&path, bytes).map_err(|e| BundleError::io("write", &path, e))?;
    Ok(path)
}

fn write_staged(
    dir: &Path,
    name: &str,
    role: FileRole,
    bytes: &[u8],
) -> Result<StagedOnnx, BundleError> {
    let path = write_file(dir, name, bytes)?;
    Ok(StagedOnnx {
        role,
        name: name.to_string(),
        path,
        sha256: super::files::sha256_hex(bytes),
    })
}

fn weights_metadata(arch: &ArchConfig, meta: &BundleMetadata) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CHECKPOINT_FORMAT_KEY.into(), CHECKPOINT_FORMAT_V1.into()),
        (CHECKPOINT_ARCH_KEY.into(), to_json(arch)),
        (CHECKPOINT_CLASSES_KEY.into(), to_json(&meta.class_names)),
        (CHECKPOINT_EPOCH_KEY.into(), "0".into()),
        (CHECKPOINT_METRICS_KEY.into(), to_json(&meta.metrics)),
        (MODEL_VERSION_KEY.into(), meta.model_version.to_string()),
    ])
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}

fn input_spec(arch: &ArchConfig, max_batch: u32) -> InputSpec {
    InputSpec {
        name: onnx::INPUT_NAME.to_string(),
        dtype: "float32".to_string(),
        shape: vec![
            Dim::Symbolic("batch".into()),
            Dim::Fixed(u64::from(arch.in_channels)),
            Dim::Fixed(u64::from(arch.input_size)),
            Dim::Fixed(u64::from(arch.input_size)),
        ],
        max_batch,
    }
}

fn output_specs(arch: &ArchConfig) -> Vec<OutputSpec> {
    let cells = u64::from(arch.input_size / OUTPUT_STRIDE);
    let shape = |c: u32| {
        vec![
            Dim::Symbolic("batch".into()),
            Dim::Fixed(u64::from(c)),
            Dim::Fixed(cells),
            Dim::Fixed(cells),
        ]
    };
    vec![
        OutputSpec {
            name: onnx::HEATMAP_OUTPUT.to_string(),
            dtype: "float32".to_string(),
            shape: shape(arch.num_classes),
            meaning: "class logits per output cell, before the sigmoid".to_string(),
        },
        OutputSpec {
            name: onnx::BOXES_OUTPUT.to_string(),
            dtype: "float32".to_string(),
            shape: shape(BOX_CHANNELS),
            meaning: "box width and height in output cells, then the x and y offset of the \
                      centre inside its cell"
                .to_string(),
        },
    ]
}

/// `t` as RFC 3339 in UTC to the second (`2025-01-31T12:00:00Z`), for [`BundleMetadata::built_at`].
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    let dt = time::OffsetDateTime::from(t);
    dt.replace_nanosecond(0)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The client loader's preprocessing for `arch`.
pub fn default_preprocessing(arch: &ArchConfig) -> Preprocessing {
    let channels: Vec<String> = match arch.in_channels {
        1 => vec!["grey".into()],
        2 => vec!["image_grey".into(), "template_grey".into()],
        _ => vec!["red".into(), "green".into(), "blue".into()],
    };
    let n = channels.len();
    Preprocessing {
        channels,
        pixel_scale: 1.0 / 255.0,
        mean: vec![0.0; n],
        std: vec![1.0; n],
        letterbox: LetterboxSpec {
            size: arch.input_size,
            pad_value: DEFAULT_LETTERBOX_PAD,
            resize_filter: "triangle".to_string(),
        },
        clahe: None,
    }
}

fn check_metadata(arch: &ArchConfig, meta: &BundleMetadata) -> Result<(), String> {
    let mut problems = Vec::new();
    let name_ok = !meta.model_name.is_empty()
        && meta.model_name.len() <= 64
        && meta
            .model_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        problems.push(format!(
            "model name '{}' must be 1 to 64 characters from [A-Za-z0-9_-]",
            meta.model_name
        ));
    }
    if meta.class_names.len() != arch.num_classes as usize {
        problems.push(format!(
            "{} class names for an architecture with {} classes",
            meta.class_names.len(),
            arch.num_classes
        ));
    }
    if !(0.0..=1.0).contains(&meta.score_threshold) {
        problems.push(format!(
            "score threshold {} is not in [0, 1]",
            meta.score_threshold
        ));
    }
    if meta.built_at.trim().is_empty() {
        problems.push("built_at is empty".into());
    }
    if meta.top_k == 0 {
        problems.push("top_k is 0".into());
    }
    if !(1..=1024).contains(&meta.max_batch) {
        problems.push(format!("max batch {} is not in 1..=1024", meta.max_batch));
    }
    if let Some((k, v)) = meta.metrics.iter().find(|(_, v)| !v.is_finite()) {
        problems.push(format!("metric '{k}' is {v}, not a finite number"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
