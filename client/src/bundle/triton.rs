//! An installed bundle laid out as a version of a Triton Inference Server model repository,
//! which many inspection lines already run:
//!
//! ```text
//! <repo>/<model name>/config.pbtxt        generated: platform, input, outputs, batching
//! <repo>/<model name>/<version>/model.plan   (platform tensorrt_plan)  or
//! <repo>/<model name>/<version>/model.onnx   (platform onnxruntime_onnx)
//! ```
//!
//! Dims in the config leave out the batch axis (Triton adds it, up to `max_batch_size`, the
//! bundle's `max_batch`); dynamic batching is on; the version policy serves the latest version
//! only, so a repository whose older versions have another format still loads. The version
//! folder is staged and renamed into place (Triton never sees half a model) and the config is
//! written atomically after it. An existing version folder is never replaced: laying out the
//! same file again is a no-op, a different one is refused.

use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_common::bundle::{
    is_valid_file_name, sha256_file, staging_sibling, sync_tree, BundleManifest, Dim,
    EnginePrecision, EngineTarget, FileRole,
};
use fedinspect_common::fsutil;

use super::install::InstalledBundle;

/// Which model file goes into the repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TritonFormat {
    /// The FP16 engine for the target if there is one, else the FP32 ONNX.
    Auto,
    /// The FP32 ONNX (onnxruntime).
    OnnxFp32,
    /// The INT8 QDQ ONNX (onnxruntime).
    OnnxInt8,
    /// The engine of this precision for the target (TensorRT).
    Plan(EnginePrecision),
}

/// Where and how to lay the bundle out.
#[derive(Clone, Debug)]
pub struct TritonRequest<'a> {
    pub repo: &'a Path,
    /// Default: the manifest's `model_name`.
    pub model_name: Option<&'a str>,
    /// Default: the model version.
    pub version: Option<u64>,
    /// This machine's GPU target (for engines); `None` without TensorRT.
    pub target: Option<&'a EngineTarget>,
    pub format: TritonFormat,
}

/// What was written.
#[derive(Clone, Debug, PartialEq)]
pub struct TritonLayout {
    pub model_dir: PathBuf,
    pub version_dir: PathBuf,
    pub config: PathBuf,
    pub model_file: PathBuf,
    /// `tensorrt_plan` or `onnxruntime_onnx`.
    pub platform: &'static str,
    /// Nothing was written: the same version with the same file was already there.
    pub unchanged: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TritonError {
    #[error("'{0}' cannot be a Triton model name; use 1 to 64 characters from [A-Za-z0-9_-]")]
    ModelName(String),
    #[error("the bundle has no {what}; choose another format (Auto falls back to the FP32 ONNX)")]
    NoSuchFile { what: String },
    #[error("version {version} of model '{model}' already exists in {} with a different model file; Triton versions never change, lay out under a new version or remove the old one first", repo.display())]
    VersionExists {
        model: String,
        version: u64,
        repo: PathBuf,
    },
    #[error("version 0 is not valid in a Triton repository; versions start at 1")]
    VersionZero,
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Lays `installed` out in the repository as `req` says.
pub fn layout_triton(
    installed: &InstalledBundle,
    req: &TritonRequest<'_>,
) -> Result<TritonLayout, TritonError> {
    let m = &installed.bundle.manifest;
    let name = req.model_name.unwrap_or(&m.model_name);
    let name_ok = is_valid_file_name(name)
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !name_ok {
        return Err(TritonError::ModelName(name.to_string()));
    }
    let version = req.version.unwrap_or(m.model_version);
    if version == 0 {
        return Err(TritonError::VersionZero);
    }
    let (source, platform, file_name, max_batch) = choose(installed, req)?;
    let model_dir = req.repo.join(name);
    let version_dir = model_dir.join(version.to_string());
    let model_file = version_dir.join(file_name);
    let config = model_dir.join("config.pbtxt");
    let text = config_pbtxt(m, &installed.id, name, platform, max_batch);
    let layout = |unchanged| TritonLayout {
        model_dir: model_dir.clone(),
        version_dir: version_dir.clone(),
        config: config.clone(),
        model_file: model_file.clone(),
        platform,
        unchanged,
    };
    if version_dir.exists() {
        let same = same_file(&source, &model_file)
            && fs::read_to_string(&config).ok().as_deref() == Some(text.as_str());
        if same {
            return Ok(layout(true));
        }
        return Err(TritonError::VersionExists {
            model: name.to_string(),
            version,
            repo: req.repo.to_path_buf(),
        });
    }
    fs::create_dir_all(&model_dir).map_err(|e| io("create", &model_dir, e))?;
    let staging = staging_sibling(&version_dir, "staging");
    let staged = (|| {
        fs::create_dir(&staging).map_err(|e| io("create", &staging, e))?;
        let staged_file = staging.join(file_name);
        fs::copy(&source, &staged_file).map_err(|e| io("copy", &staged_file, e))?;
        sync_tree(&staging).map_err(|e| io("sync", &staging, e))?;
        fs::rename(&staging, &version_dir).map_err(|e| io("rename into place", &version_dir, e))?;
        fsutil::sync_dir(&model_dir).map_err(|e| io("sync", &model_dir, e))
    })();
    if staged.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    staged?;
    fsutil::write_bytes_atomic(&config, text.as_bytes()).map_err(|e| io("write", &config, e))?;
    Ok(layout(false))
}

/// (source file, platform, file name in the version folder, max batch).
fn choose(
    installed: &InstalledBundle,
    req: &TritonRequest<'_>,
) -> Result<(PathBuf, &'static str, &'static str, u32), TritonError> {
    let m = &installed.bundle.manifest;
    let onnx = |role: FileRole| {
        m.file_with_role(role)
            .map(|f| {
                (
                    installed.bundle.path(&f.name),
                    "onnxruntime_onnx",
                    "model.onnx",
                    m.input.max_batch,
                )
            })
            .ok_or_else(|| TritonError::NoSuchFile {
                what: format!("{} file", role.as_str()),
            })
    };
    let plan = |precision: EnginePrecision| {
        let target = req.target.ok_or_else(|| TritonError::NoSuchFile {
            what: format!("{precision} engine (no GPU target given)"),
        })?;
        installed
            .engine(target, precision)
            .map(|(e, path)| (path, "tensorrt_plan", "model.plan", e.max_batch))
            .ok_or_else(|| TritonError::NoSuchFile {
                what: format!("{precision} engine for {target}"),
            })
    };
    match req.format {
        TritonFormat::OnnxFp32 => onnx(FileRole::OnnxFp32),
        TritonFormat::OnnxInt8 => onnx(FileRole::OnnxInt8Qdq),
        TritonFormat::Plan(p) => plan(p),
        TritonFormat::Auto => plan(EnginePrecision::Fp16).or_else(|_| onnx(FileRole::OnnxFp32)),
    }
}

/// The `config.pbtxt` text for `manifest` served as `name` on `platform`.
pub fn config_pbtxt(
    manifest: &BundleManifest,
    bundle_id: &str,
    name: &str,
    platform: &str,
    max_batch: u32,
) -> String {
    let dims = |shape: &[Dim]| {
        shape
            .iter()
            .skip(1)
            .map(|d| match d {
                Dim::Fixed(n) => n.to_string(),
                Dim::Symbolic(_) => "-1".to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = format!(
        "# Generated by fedinspect from bundle {bundle_id}: model version {}, model hash {}.\n\
         # Input: letterboxed, pixels * {:.9} (see the bundle's manifest.json); outputs are\n\
         # CenterNet heatmap logits and boxes, decoded as docs/bundles.md describes.\n",
        manifest.model_version, manifest.model_hash, manifest.preprocessing.pixel_scale
    );
    out.push_str(&format!("name: \"{name}\"\n"));
    out.push_str(&format!("platform: \"{platform}\"\n"));
    out.push_str(&format!("max_batch_size: {max_batch}\n"));
    out.push_str("version_policy: { latest: { num_versions: 1 } }\n");
    out.push_str("input [\n");
    out.push_str(&format!(
        "  {{\n    name: \"{}\"\n    data_type: TYPE_FP32\n    dims: [ {} ]\n  }}\n",
        manifest.input.name,
        dims(&manifest.input.shape)
    ));
    out.push_str("]\noutput [\n");
    let outputs: Vec<String> = manifest
        .outputs
        .iter()
        .map(|o| {
            format!(
                "  {{\n    name: \"{}\"\n    data_type: TYPE_FP32\n    dims: [ {} ]\n  }}",
                o.name,
                dims(&o.shape)
            )
        })
        .collect();
    out.push_str(&outputs.join(",\n"));
    out.push_str("\n]\ndynamic_batching { }\n");
    out
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (sha256_file(a), sha256_file(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> TritonError {
    TritonError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
