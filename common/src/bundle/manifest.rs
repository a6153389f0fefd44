//! The bundle manifest (`manifest.json`): what the model is, how to feed it and read its
//! outputs, and every file with its role, size and SHA-256. It is the one document the
//! coordinator signs; everything else in a bundle is trusted only through it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::arch::ArchConfig;

mod check;

/// The signed description of a bundle. Unknown fields are refused: a newer format is a new
/// [`FORMAT`] string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    /// [`FORMAT`].
    pub format: String,
    /// A name for the model, used as the Triton model name by default.
    pub model_name: String,
    /// The federation's model version the weights are.
    pub model_version: u64,
    /// Hex [`crate::ModelHash`] of the weights (the hash the coordinator signs per version).
    pub model_hash: String,
    /// When the coordinator built the bundle (RFC 3339, UTC), as its caller said.
    pub built_at: String,
    pub architecture: ArchConfig,
    pub input: InputSpec,
    pub outputs: Vec<OutputSpec>,
    pub preprocessing: Preprocessing,
    pub postprocessing: Postprocessing,
    /// Class `i` of the heatmap is `class_names[i]`.
    pub class_names: Vec<String>,
    /// Detections scoring below this are not reported.
    pub score_threshold: f32,
    /// Metrics of this model measured when the bundle was built (e.g. `map_50`).
    pub metrics: BTreeMap<String, f64>,
    /// Every file of the bundle except `manifest.json` and `manifest.sig`.
    pub files: Vec<FileEntry>,
    /// The TensorRT engines among `files`.
    pub engines: Vec<EngineEntry>,
    /// Why the bundle has the engines it has (e.g. "trtexec not found on the build host").
    pub engine_note: String,
}

/// A dimension: a fixed size or a symbolic name such as `batch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(u64),
    Symbolic(String),
}

/// The model's one input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// `images`.
    pub name: String,
    /// `float32`.
    pub dtype: String,
    /// `["batch", C, H, W]` (NCHW).
    pub shape: Vec<Dim>,
    /// Largest batch the engines were built for (their optimisation profile's maximum), and
    /// Triton's `max_batch_size`.
    pub max_batch: u32,
}

/// One output tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<Dim>,
    /// What the values are, in words.
    pub meaning: String,
}

/// How an image becomes the input tensor: channel `c` is
/// `(pixel * pixel_scale - mean[c]) / std[c]` after the letterbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// What each input channel holds, e.g. `["image_grey", "template_grey"]`.
    pub channels: Vec<String>,
    pub pixel_scale: f64,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub letterbox: LetterboxSpec,
    /// CLAHE applied to each channel before the letterbox, when the model was trained with it.
    pub clahe: Option<ClaheSpec>,
}

/// Resize keeping the aspect ratio to fit `size x size`, centred, padded with `pad_value`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LetterboxSpec {
    pub size: u32,
    pub pad_value: u8,
    /// `triangle` (bilinear), the client loader's filter.
    pub resize_filter: String,
}

/// Contrast-limited adaptive histogram equalisation, as `client::data::clahe` applies it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaheSpec {
    pub tiles: u32,
    pub clip_limit: f32,
}

/// How outputs become detections (what `client::detector::decode` does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postprocessing {
    /// `centernet`: sigmoid of the heatmap, peaks = cells equal to their `peak_window` maximum.
    pub method: String,
    pub peak_window: u32,
    /// At most this many detections per image.
    pub top_k: u32,
    /// Input pixels per output cell.
    pub output_stride: u32,
}

/// What a file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileRole {
    OnnxFp32,
    OnnxInt8Qdq,
    WeightsSafetensors,
    Engine,
}

/// One file of the bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub role: FileRole,
    pub name: String,
    pub size: u64,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// An engine's numeric precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnginePrecision {
    /// From the FP32 ONNX with `--fp16`.
    Fp16,
    /// From the INT8 QDQ ONNX with `--int8`.
    Int8,
}

/// Where an engine runs: TensorRT engines are specific to a GPU generation and a TensorRT
/// version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineTarget {
    /// `major.minor`, as `nvidia-smi --query-gpu=compute_cap` prints it (`8.6`).
    pub compute_capability: String,
    /// Dotted TensorRT version (`10.3.0`).
    pub tensorrt_version: String,
}

/// One TensorRT engine of the bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineEntry {
    /// Its name in `files`.
    pub file: String,
    pub precision: EnginePrecision,
    pub target: EngineTarget,
    /// The TensorRT version that built it, as its trtexec reported (equals the target's).
    pub tensorrt_version: String,
    /// The ONNX file it was built from.
    pub source: String,
    /// Largest batch of its optimisation profile.
    pub max_batch: u32,
}

impl InputSpec {
    /// `[C, H, W]` of a `["batch", C, H, W]` input with fixed C, H and W.
    pub fn chw(&self) -> Option<[u64; 3]> {
        match self.shape.as_slice() {
            [_, Dim::Fixed(c), Dim::Fixed(h), Dim::Fixed(w)] => Some([*c, *h, *w]),
            _ => None,
        }
    }
}

impl FileRole {
    /// The role as the manifest writes it (`onnx-fp32`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FileRole::OnnxFp32 => "onnx-fp32",
            FileRole::OnnxInt8Qdq => "onnx-int8-qdq",
            FileRole::WeightsSafetensors => "weights-safetensors",
            FileRole::Engine => "engine",
        }
    }
}

impl fmt::Display for EnginePrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EnginePrecision::Fp16 => "fp16",
            EnginePrecision::Int8 => "int8",
        })
    }
}

impl EnginePrecision {
    /// The ONNX file role an engine of this precision is built from.
    pub fn source_role(self) -> FileRole {
        match self {
            EnginePrecision::Fp16 => FileRole::OnnxFp32,
            EnginePrecision::Int8 => FileRole::OnnxInt8Qdq,
        }
    }
}

impl fmt::Display for EngineTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "compute capability {}, TensorRT {}",
            self.compute_capability, self.tensorrt_version
        )
    }
}

impl EngineTarget {
    /// Checks the two fields' syntax (`8.6`, `10.3.0`).
    pub fn validate(&self) -> Result<(), String> {
        let numeric = |s: &str, parts: std::ops::RangeInclusive<usize>| {
            let n = s.split('.').count();
            parts.contains(&n)
                && s.split('.')
                    .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
        };
        if !numeric(&self.compute_capability, 2..=2) {
            return Err(format!(
                "compute capability '{}' is not major.minor (e.g. 8.6)",
                self.compute_capability
            ));
        }
        if !numeric(&self.tensorrt_version, 2..=4) {
            return Err(format!(
                "TensorRT version '{}' is not dotted (e.g. 10.3.0)",
                self.tensorrt_version
            ));
        }
        Ok(())
    }

    /// `sm86-trt10.3.0`, used in file and cache names.
    pub fn slug(&self) -> String {
        format!(
            "sm{}-trt{}",
            self.compute_capability.replace('.', ""),
            self.tensorrt_version
        )
    }
}

/// `engine-<precision>-<target slug>.plan`.
pub fn engine_file_name(precision: EnginePrecision, target: &EngineTarget) -> String {
    format!("engine-{precision}-{}.plan", target.slug())
}

impl BundleManifest {
    /// The entry of file `name`.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The (only) file with `role`, for the single-file roles.
    pub fn file_with_role(&self, role: FileRole) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.role == role)
    }

    /// The engine for `target` and `precision`, if the bundle has one.
    pub fn engine_for(
        &self,
        target: &EngineTarget,
        precision: EnginePrecision,
    ) -> Option<&EngineEntry> {
        self.engines
            .iter()
            .find(|e| &e.target == target && e.precision == precision)
    }
}
