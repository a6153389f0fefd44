//! The INT8 variant's quantisation: what is quantised, the calibration statistics it needs,
//! and the arithmetic of the scales.
//!
//! Explicit quantisation in the form TensorRT builds INT8 engines from (and onnxruntime runs):
//! every convolution reads its input through QuantizeLinear -> DequantizeLinear and its
//! weight, stored as INT8, through DequantizeLinear. Everything is symmetric with zero point 0
//! (TensorRT's only INT8 mode):
//! - weights: per output channel, `scale = max |W'[o]| / 127` of the BatchNorm-folded weight;
//! - activations: per tensor, `scale = max(|min|, |max|) / 127` from [`ActivationRanges`].
//!
//! Biases stay float32 (TensorRT quantises them itself). The attention's two matrix products
//! stay in floating point: they are under 1% of the multiply-accumulates and softmax inputs
//! are where INT8 hurts most.
//!
//! Calibration ranges come from the plants: each runs [`calibration_graph`] (the detector with
//! every [`calibration_points`] value as an extra output) in eval mode on its own images,
//! records the minimum and maximum of each, and sends only those numbers; the coordinator
//! merges them with [`merge_ranges`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::OnnxError;
use crate::arch::{Graph, Op};
use crate::model::Tensor;

/// Smallest scale written, so that an all-zero tensor (a zero-initialised projection, say)
/// still gets the positive scale TensorRT requires.
const MIN_SCALE: f32 = 1e-12;

/// Observed extent of one activation tensor over the calibration images.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivationRange {
    pub min: f32,
    pub max: f32,
}

/// Ranges keyed by graph node name (the node whose output a convolution reads).
pub type ActivationRanges = BTreeMap<String, ActivationRange>;

/// The nodes whose outputs the INT8 variant quantises (the inputs of every convolution), in
/// graph order, each once.
pub fn calibration_points(graph: &Graph) -> Vec<String> {
    let mut points: Vec<String> = Vec::new();
    for node in &graph.nodes {
        if let (Op::Conv { .. }, Some(input)) = (&node.op, node.inputs.first()) {
            if !points.contains(input) {
                points.push(input.clone());
            }
        }
    }
    points
}

/// `graph` with every calibration point appended to its outputs (after the original ones), so
/// that one forward pass yields all the tensors to measure.
pub fn calibration_graph(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for point in calibration_points(graph) {
        if !g.outputs.contains(&point) {
            g.outputs.push(point);
        }
    }
    g
}

/// Ranges from several plants (or batches) merged: the union of their extents. A point
/// missing from one input keeps the others' extent.
pub fn merge_ranges<'a>(parts: impl IntoIterator<Item = &'a ActivationRanges>) -> ActivationRanges {
    let mut merged = ActivationRanges::new();
    for part in parts {
        for (name, r) in part {
            merged
                .entry(name.clone())
                .and_modify(|m: &mut ActivationRange| {
                    m.min = m.min.min(r.min);
                    m.max = m.max.max(r.max);
                })
                .or_insert(*r);
        }
    }
    merged
}

/// The symmetric per-tensor scale of `range`; fails on a non-finite or inverted range.
pub(super) fn activation_scale(name: &str, range: &ActivationRange) -> Result<f32, OnnxError> {
    if !(range.min.is_finite() && range.max.is_finite()) || range.min > range.max {
        return Err(OnnxError::Calibration(format!(
            "range of '{name}' is [{}, {}]; a range needs finite bounds with min <= max, recalibrate",
            range.min, range.max
        )));
    }
    Ok((range.min.abs().max(range.max.abs()) / 127.0).max(MIN_SCALE))
}

/// `weight` (`[out, ...]`) as INT8 values with one symmetric scale per output channel:
/// `q = clamp(round(w / scale), -127, 127)`.
pub(super) fn quantize_per_channel(weight: &Tensor) -> (Vec<i8>, Vec<f32>) {
    let out = weight.shape().first().copied().unwrap_or(1).max(1);
    let per_out = (weight.numel() / out).max(1);
    let mut values = Vec::with_capacity(weight.numel());
    let mut scales = Vec::with_capacity(out);
    for row in weight.data().chunks(per_out) {
        let absmax = row.iter().fold(0f32, |m, w| m.max(w.abs()));
        let scale = (absmax / 127.0).max(MIN_SCALE);
        // round() is half away from zero; QuantizeLinear rounds half to even. Either is a
        // valid quantisation of a constant: DequantizeLinear reads back what is stored.
        values.extend(
            row.iter()
                .map(|w| (w / scale).round().clamp(-127.0, 127.0) as i8),
        );
        scales.push(scale);
    }
    (values, scales)
}
