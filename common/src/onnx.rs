//! ONNX export of the detector, written by our own code: an [`ArchConfig`] (or any validated
//! [`Graph`]) and a [`ModelState`] become the bytes of an ONNX `ModelProto`, with no Python and
//! no LibTorch on the way, so the coordinator can export any stored version.
//!
//! # The file
//! - Opset: `ai.onnx` version [`OPSET`] (17), IR version [`IR_VERSION`] (8, the IR of opset 17).
//!   TensorRT's ONNX parser covers opset 17 from TensorRT 8.6 on, and nothing here needs newer.
//! - Input [`INPUT_NAME`] (`images`): float32 `[batch, C, H, W]`, pixels scaled to `[0, 1]`
//!   as the client's preprocessing produces them. The batch axis is the symbolic `batch`; H and
//!   W are fixed to the architecture's `input_size` unless [`Spatial::Dynamic`] makes them the
//!   symbols `height` and `width` (then they must be multiples of 32 at run time).
//! - Outputs [`HEATMAP_OUTPUT`] (`heatmap`, class logits `[batch, classes, H/4, W/4]`, before
//!   the sigmoid) and [`BOXES_OUTPUT`] (`boxes`, `[batch, 4, H/4, W/4]`), exactly what the tch
//!   module returns, so `client::detector::decode` applies unchanged.
//! - Operators (chosen for TensorRT): Conv, Add, Mul, Sigmoid (SiLU is `x * sigmoid(x)`), Relu,
//!   Concat, Resize (nearest, `asymmetric` + `floor`, which is PyTorch's nearest x2), MaxPool,
//!   MatMul, Softmax (last axis), Reshape, Shape and Transpose; the INT8 variant adds
//!   QuantizeLinear and DequantizeLinear. No BatchNormalization node is emitted.
//! - BatchNorm is folded into the convolution before it (eps 1e-5, as in training):
//!   `W' = W * g / sqrt(var + eps)` per output channel and
//!   `b' = beta + (b - mean) * g / sqrt(var + eps)`, computed in f64 and stored as f32. A
//!   BatchNorm that does not follow a convolution read only by it becomes a per-channel Mul and
//!   Add. Folded tensors keep the convolution's parameter names (`backbone.stem.conv.weight`,
//!   `backbone.stem.conv.bias`) with a doc string naming the BatchNorm folded in; every other
//!   initializer is named after its parameter, and the exporter's own constants contain a `:`
//!   (`neck.up2:scales`), which parameter names never do.
//! - Metadata: producer `fedinspect` and the crate version; `metadata_props` hold the model
//!   state's content hash ([`META_MODEL_HASH`], the hash of the unfolded weights, the one the
//!   federation signs) and the architecture as JSON ([`META_ARCHITECTURE`], or
//!   [`META_GRAPH`] for a bare graph), plus any caller entries.
//!
//! [`export_qdq`] writes the explicitly quantised (QDQ) INT8 variant; see [`qdq`].

mod emit;
mod fold;
mod messages;
mod plan;
pub mod proto;
pub mod qdq;
#[cfg(test)]
mod qdq_tests;
#[cfg(test)]
mod tests;
mod weights;

use std::collections::BTreeMap;

use prost::Message;

use crate::arch::{ArchConfig, ArchError, Graph, MAX_STRIDE};
use crate::model::ModelState;
use proto::{ModelProto, OperatorSetIdProto, StringStringEntryProto};

pub use qdq::{ActivationRange, ActivationRanges};

/// The `ai.onnx` operator set the exported models import.
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;
/// Name of the model's input.
pub const INPUT_NAME: &str = "images";
/// Name of the class heatmap output (logits).
pub const HEATMAP_OUTPUT: &str = "heatmap";
/// Name of the box regression output.
pub const BOXES_OUTPUT: &str = "boxes";
/// `ModelProto.producer_name` of every exported file.
pub const PRODUCER: &str = "fedinspect";
/// Metadata key: hex SHA-256 content hash of the exported [`ModelState`].
pub const META_MODEL_HASH: &str = "fedinspect.model_hash";
/// Metadata key: the [`ArchConfig`] as JSON (exports from an architecture).
pub const META_ARCHITECTURE: &str = "fedinspect.architecture";
/// Metadata key: the [`Graph`] as JSON (exports from a bare graph).
pub const META_GRAPH: &str = "fedinspect.graph";
/// Metadata key: `fp32` or `int8_qdq`.
pub const META_PRECISION: &str = "fedinspect.precision";

/// How the input's spatial axes are declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spatial {
    /// Fixed sides, multiples of 32 (what TensorRT builds its fastest engines for).
    Fixed { height: u32, width: u32 },
    /// Symbolic `height` and `width`.
    Dynamic,
}

impl Spatial {
    /// The architecture's inference size, `input_size` x `input_size`.
    pub fn of(arch: &ArchConfig) -> Self {
        Spatial::Fixed {
            height: arch.input_size,
            width: arch.input_size,
        }
    }
}

/// What to write besides the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportOptions {
    pub spatial: Spatial,
    /// `ModelProto.model_version`: the federation's version number when exporting a stored
    /// version.
    pub model_version: Option<i64>,
    /// Extra `metadata_props` entries; keys starting with `fedinspect.` are the exporter's.
    pub metadata: BTreeMap<String, String>,
}

impl ExportOptions {
    /// Fixed input at the architecture's `input_size`, no version, no extra metadata.
    pub fn for_arch(arch: &ArchConfig) -> Self {
        Self {
            spatial: Spatial::of(arch),
            model_version: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// Why a model could not be exported (or a file not read back).
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("the model state has no tensor '{name}', which the architecture needs; export a state trained with this architecture")]
    MissingTensor { name: String },
    #[error("tensor '{name}' has shape {found:?} but the architecture needs {expected:?}; the state was trained with another architecture (check width, classes and channels)")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor '{name}' is not a parameter of the architecture; export with the architecture the state was trained with")]
    UnexpectedTensor { name: String },
    #[error("tensor '{name}' holds a non-finite value (NaN or infinity) at index {index}; the model is corrupt or training diverged, export another version")]
    NonFinite { name: String, index: usize },
    #[error("tensor '{name}' holds {value} at channel {channel}: a running variance below -1e-5 cannot be folded; the model state is corrupt")]
    NegativeVariance {
        name: String,
        channel: usize,
        value: f32,
    },
    #[error("folding '{bn}' into '{tensor}' overflows float32; the BatchNorm statistics are implausible, export another version")]
    FoldOverflow { bn: String, tensor: String },
    #[error("input size {height}x{width}: sides must be non-zero multiples of {MAX_STRIDE}")]
    InputSize { height: u32, width: u32 },
    #[error("metadata key '{0}' is reserved for the exporter; use a key that does not start with 'fedinspect.'")]
    ReservedMetadata(String),
    #[error("cannot export this graph: {0}")]
    Unsupported(String),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("not an ONNX model: {0}")]
    Decode(String),
}

/// The FP32 ONNX model of `arch` holding `state`'s weights, as file bytes.
pub fn export(
    arch: &ArchConfig,
    state: &ModelState,
    options: &ExportOptions,
) -> Result<Vec<u8>, OnnxError> {
    let graph = arch.graph()?;
    let described = (META_ARCHITECTURE, architecture_json(arch)?);
    let model = build(&graph, state, options, None, described)?;
    Ok(model.encode_to_vec())
}

/// [`export`] for a bare graph (`metadata_props` carry the graph instead of an architecture).
/// The graph's output nodes `head.heatmap` and `head.box` become `heatmap` and `boxes`; other
/// outputs keep their node names.
pub fn export_graph(
    graph: &Graph,
    state: &ModelState,
    options: &ExportOptions,
) -> Result<Vec<u8>, OnnxError> {
    graph.validate()?;
    let described = (META_GRAPH, graph_json(graph)?);
    let model = build(graph, state, options, None, described)?;
    Ok(model.encode_to_vec())
}

/// The INT8 QDQ model of `arch`: see [`qdq`] for what is quantised and how `ranges` (the
/// merged calibration statistics) are used.
pub fn export_qdq(
    arch: &ArchConfig,
    state: &ModelState,
    ranges: &ActivationRanges,
    options: &ExportOptions,
) -> Result<Vec<u8>, OnnxError> {
    let graph = arch.graph()?;
    let described = (META_ARCHITECTURE, architecture_json(arch)?);
    let model = build(&graph, state, options, Some(ranges), described)?;
    Ok(model.encode_to_vec())
}

/// Decodes file bytes into the message structs of [`proto`], for inspection.
pub fn decode(bytes: &[u8]) -> Result<ModelProto, OnnxError> {
    ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))
}

fn architecture_json(arch: &ArchConfig) -> Result<String, OnnxError> {
    serde_json::to_string(arch).map_err(|e| OnnxError::Unsupported(e.to_string()))
}

fn graph_json(graph: &Graph) -> Result<String, OnnxError> {
    serde_json::to_string(graph).map_err(|e| OnnxError::Unsupported(e.to_string()))
}

fn build(
    graph: &Graph,
    state: &ModelState,
    options: &ExportOptions,
    ranges: Option<&ActivationRanges>,
    described: (&str, String),
) -> Result<ModelProto, OnnxError> {
    if let Spatial::Fixed { height, width } = options.spatial {
        if height == 0 || width == 0 || height % MAX_STRIDE != 0 || width % MAX_STRIDE != 0 {
            return Err(OnnxError::InputSize { height, width });
        }
    }
    if let Some(key) = options
        .metadata
        .keys()
        .find(|k| k.starts_with("fedinspect."))
    {
        return Err(OnnxError::ReservedMetadata(key.clone()));
    }
    weights::check_state(graph, state)?;
    let onnx_graph = emit::emit(graph, state, options.spatial, ranges)?;
    let precision = if ranges.is_some() { "int8_qdq" } else { "fp32" };
    let mut metadata = vec![
        (META_MODEL_HASH.to_string(), state.content_hash().to_hex()),
        (described.0.to_string(), described.1),
        (META_PRECISION.to_string(), precision.to_string()),
    ];
    metadata.extend(options.metadata.clone());
    Ok(ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some(PRODUCER.to_string()),
        producer_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        domain: None,
        model_version: options.model_version,
        doc_string: Some(
            "fedinspect defect detector (CenterNet): images [batch, C, H, W] in [0, 1] -> \
             heatmap logits [batch, classes, H/4, W/4], boxes [batch, 4, H/4, W/4]"
                .to_string(),
        ),
        graph: Some(onnx_graph),
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto {
                key: Some(key),
                value: Some(value),
            })
            .collect(),
    })
}
