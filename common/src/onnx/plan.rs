//! What the emitter decides about a graph before emitting anything: the ONNX value name of
//! every node, which convolution each BatchNorm folds into, and the stride of every output.

use std::collections::{HashMap, HashSet};

use super::{OnnxError, BOXES_OUTPUT, HEATMAP_OUTPUT, INPUT_NAME};
use crate::arch::{Graph, Op, BOX, HEATMAP};

/// Conv -> BatchNorm pairs that fold: the BatchNorm reads only the conv, and nothing else (no
/// other node, no graph output) reads the conv.
pub(super) fn conv_batch_norm_pairs(graph: &Graph) -> HashMap<&str, &str> {
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for node in &graph.nodes {
        for input in &node.inputs {
            *readers.entry(input.as_str()).or_default() += 1;
        }
    }
    for output in &graph.outputs {
        *readers.entry(output.as_str()).or_default() += 1;
    }
    let is_conv = |name: &str| {
        graph
            .node(name)
            .is_some_and(|n| matches!(n.op, Op::Conv { .. }))
    };
    graph
        .nodes
        .iter()
        .filter(|n| n.op == Op::BatchNorm && n.inputs.len() == 1)
        .filter(|n| is_conv(&n.inputs[0]) && readers.get(n.inputs[0].as_str()) == Some(&1))
        .map(|n| (n.inputs[0].as_str(), n.name.as_str()))
        .collect()
}

/// Each node's ONNX value name; fails when two would coincide (a node named `images`, say).
pub(super) fn value_names(graph: &Graph) -> Result<HashMap<&str, String>, OnnxError> {
    let mut names = HashMap::with_capacity(graph.nodes.len());
    let mut taken = HashSet::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let value = match (&node.op, node.name.as_str()) {
            (Op::Input, _) => INPUT_NAME.to_string(),
            (_, HEATMAP) if graph.outputs.contains(&node.name) => HEATMAP_OUTPUT.to_string(),
            (_, BOX) if graph.outputs.contains(&node.name) => BOXES_OUTPUT.to_string(),
            (_, name) => name.to_string(),
        };
        if graph.outputs.contains(&node.name) && node.op == Op::Input {
            return Err(OnnxError::Unsupported(format!(
                "the input '{}' is also an output",
                node.name
            )));
        }
        if !taken.insert(value.clone()) {
            return Err(OnnxError::Unsupported(format!(
                "node '{}' would be the ONNX value '{value}', which another value already is; rename the node",
                node.name
            )));
        }
        names.insert(node.name.as_str(), value);
    }
    Ok(names)
}

/// The stride of each node's output relative to the input, None for token matrices.
pub(super) fn strides(graph: &Graph) -> Vec<Option<u32>> {
    let mut out: Vec<Option<u32>> = Vec::with_capacity(graph.nodes.len());
    let of = |out: &[Option<u32>], name: Option<&String>| {
        name.and_then(|n| graph.nodes.iter().position(|m| &m.name == n))
            .and_then(|i| out.get(i).copied().flatten())
    };
    for node in &graph.nodes {
        let first = of(&out, node.inputs.first());
        let s = match &node.op {
            Op::Input => Some(1),
            Op::Conv { stride, .. } | Op::MaxPool { stride, .. } => first.map(|s| s * stride),
            Op::Upsample2x => first.map(|s| s / 2),
            Op::FlattenSpatial => None,
            Op::ReshapeLike => of(&out, node.inputs.get(1)),
            _ => first,
        };
        out.push(s);
    }
    out
}
