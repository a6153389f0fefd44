//! The walk from a validated [`Graph`] to an ONNX `GraphProto`: one or a few ONNX nodes per
//! graph node, in graph order (already topological), initializers from the checked model
//! state, BatchNorm folded away, and, for the INT8 variant, Quantize/Dequantize pairs in front
//! of every convolution.
//!
//! Value names: a node's output is named after the node (`backbone.s1.b0.add`), the input is
//! `images`, the graph outputs are `heatmap` and `boxes`; values the exporter adds contain a
//! `:` (`backbone.stem.act:sigmoid`), which node names cannot.

use std::collections::{HashMap, HashSet};

use super::fold::{self, Affine};
use super::messages::{
    float_scalar, float_tensor, int, int64_tensor, int8_tensor, ints, map_dims, string, value_info,
};
use super::plan::{conv_batch_norm_pairs, strides, value_names};
use super::proto::{AttributeProto, GraphProto, NodeProto, TensorProto};
use super::qdq::{self, ActivationRanges};
use super::{OnnxError, Spatial, INPUT_NAME};
use crate::arch::{Graph, Node, Op};
use crate::model::{ModelState, Tensor};

/// The ONNX graph of `graph` with `state`'s (checked) weights; INT8 QDQ when `ranges` is given.
pub(super) fn emit(
    graph: &Graph,
    state: &ModelState,
    spatial: Spatial,
    ranges: Option<&ActivationRanges>,
) -> Result<GraphProto, OnnxError> {
    let mut e = Emitter {
        state,
        ranges,
        nodes: Vec::new(),
        initializers: Vec::new(),
        values: value_names(graph)?,
        dequantized: HashMap::new(),
    };
    let folds = conv_batch_norm_pairs(graph);
    let folded: HashSet<&str> = folds.values().copied().collect();
    for node in &graph.nodes {
        match &node.op {
            Op::BatchNorm if folded.contains(node.name.as_str()) => {}
            Op::Conv { .. } => e.conv(node, folds.get(node.name.as_str()).copied())?,
            _ => e.plain(node)?,
        }
    }
    let strides = strides(graph);
    let outputs = graph
        .outputs
        .iter()
        .map(|name| {
            let not_a_map =
                || OnnxError::Unsupported(format!("output '{name}' is not a feature map"));
            let index = graph
                .nodes
                .iter()
                .position(|n| &n.name == name)
                .ok_or_else(not_a_map)?;
            let stride = strides[index].ok_or_else(not_a_map)?;
            let dims = map_dims(graph.nodes[index].channels, stride, spatial);
            Ok(value_info(&e.value(name)?, dims))
        })
        .collect::<Result<Vec<_>, OnnxError>>()?;
    Ok(GraphProto {
        node: e.nodes,
        name: Some("fedinspect_detector".to_string()),
        initializer: e.initializers,
        doc_string: None,
        input: vec![value_info(
            INPUT_NAME,
            map_dims(graph.in_channels, 1, spatial),
        )],
        output: outputs,
        value_info: Vec::new(),
    })
}

struct Emitter<'g> {
    state: &'g ModelState,
    ranges: Option<&'g ActivationRanges>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Graph node name to the name of the ONNX value holding its output.
    values: HashMap<&'g str, String>,
    /// Graph node name to its quantised-dequantised value (INT8 only), made once per value.
    dequantized: HashMap<String, String>,
}

impl<'g> Emitter<'g> {
    fn value(&self, node: &str) -> Result<String, OnnxError> {
        self.values
            .get(node)
            .cloned()
            .ok_or_else(|| OnnxError::Unsupported(format!("'{node}' is not a node")))
    }

    fn tensor(&self, name: &str) -> Result<&'g Tensor, OnnxError> {
        self.state
            .get(name)
            .ok_or_else(|| OnnxError::MissingTensor {
                name: name.to_string(),
            })
    }

    fn push(&mut self, op: &str, name: String, inputs: Vec<String>, output: String) {
        self.push_with(op, name, inputs, output, Vec::new());
    }

    fn push_with(
        &mut self,
        op: &str,
        name: String,
        inputs: Vec<String>,
        output: String,
        attribute: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![output],
            name: Some(name),
            op_type: Some(op.to_string()),
            domain: None,
            attribute,
            doc_string: None,
        });
    }

    /// Adds an initializer and hands back its name.
    fn initializer(&mut self, tensor: TensorProto) -> String {
        let name = tensor.name.clone().unwrap_or_default();
        self.initializers.push(tensor);
        name
    }

    /// A convolution, with the BatchNorm `bn` folded in when given: its output then carries
    /// the BatchNorm's value name.
    fn conv(&mut self, node: &'g Node, bn: Option<&str>) -> Result<(), OnnxError> {
        let Op::Conv {
            kernel,
            stride,
            bias,
            ..
        } = node.op
        else {
            return Err(OnnxError::Unsupported(format!(
                "'{}' is not a conv",
                node.name
            )));
        };
        let input = node
            .inputs
            .first()
            .ok_or_else(|| OnnxError::Unsupported(format!("conv '{}' has no input", node.name)))?;
        let weight_name = format!("{}.weight", node.name);
        let bias_name = format!("{}.bias", node.name);
        let weight = self.tensor(&weight_name)?;
        let bias_tensor = if bias {
            Some(self.tensor(&bias_name)?)
        } else {
            None
        };
        let (weight, bias_tensor, output, doc) = match bn {
            Some(bn) => {
                let affine = fold::batch_norm_affine(bn, self.state)?;
                let names = (weight_name.as_str(), bias_name.as_str());
                let (w, b) = fold::fold_into_conv(weight, bias_tensor, &affine, names, bn)?;
                let doc = format!("BatchNorm '{bn}' folded in");
                (w, Some(b), self.value(bn)?, Some(doc))
            }
            None => (
                weight.clone(),
                bias_tensor.cloned(),
                self.value(&node.name)?,
                None,
            ),
        };
        let x = self.activation(input)?;
        let w = match self.ranges {
            Some(_) => self.quantized_weight(&weight_name, &weight, doc.clone())?,
            None => self.initializer(float_tensor(&weight_name, &weight, doc.clone())),
        };
        let mut inputs = vec![x, w];
        if let Some(b) = bias_tensor {
            inputs.push(self.initializer(float_tensor(&bias_name, &b, doc)));
        }
        let k = i64::from(kernel);
        let s = i64::from(stride);
        let p = k / 2;
        let attrs = vec![
            ints("kernel_shape", &[k, k]),
            ints("strides", &[s, s]),
            ints("pads", &[p, p, p, p]),
            ints("dilations", &[1, 1]),
            int("group", 1),
        ];
        self.push_with("Conv", node.name.clone(), inputs, output, attrs);
        Ok(())
    }

    /// The value a convolution reads for graph node `input`: the value itself, or in the INT8
    /// variant its QuantizeLinear -> DequantizeLinear copy at the calibrated scale.
    fn activation(&mut self, input: &str) -> Result<String, OnnxError> {
        let value = self.value(input)?;
        let Some(ranges) = self.ranges else {
            return Ok(value);
        };
        if let Some(dq) = self.dequantized.get(input) {
            return Ok(dq.clone());
        }
        let range = ranges.get(input).ok_or_else(|| {
            OnnxError::Calibration(format!(
                "no activation range for '{input}'; calibrate with qdq::calibration_points of this graph"
            ))
        })?;
        let scale = qdq::activation_scale(input, range)?;
        let scale = self.initializer(float_scalar(&format!("{value}:scale"), scale));
        let zero = self.initializer(int8_tensor(&format!("{value}:zero_point"), &[], &[0]));
        let (q, dq) = (format!("{value}:q"), format!("{value}:dq"));
        let inputs = vec![value.clone(), scale.clone(), zero.clone()];
        self.push("QuantizeLinear", q.clone(), inputs, q.clone());
        self.push(
            "DequantizeLinear",
            dq.clone(),
            vec![q, scale, zero],
            dq.clone(),
        );
        self.dequantized.insert(input.to_string(), dq.clone());
        Ok(dq)
    }

    /// An INT8 weight initializer (named after the parameter) with per-output-channel scales,
    /// and the DequantizeLinear that turns it back into float for the convolution.
    fn quantized_weight(
        &mut self,
        name: &str,
        weight: &Tensor,
        doc: Option<String>,
    ) -> Result<String, OnnxError> {
        let (values, scales) = qdq::quantize_per_channel(weight);
        let mut q = int8_tensor(name, weight.shape(), &values);
        q.doc_string = doc;
        let q = self.initializer(q);
        let scales = Tensor::new(vec![scales.len()], scales)
            .map_err(|e| OnnxError::Unsupported(e.to_string()))?;
        let scale = self.initializer(float_tensor(&format!("{name}:scale"), &scales, None));
        let zeros = vec![0i8; scales.numel()];
        let zero_name = format!("{name}:zero_point");
        let zero = self.initializer(int8_tensor(&zero_name, &[zeros.len()], &zeros));
        let dq = format!("{name}:dq");
        let attrs = vec![int("axis", 0)];
        self.push_with(
            "DequantizeLinear",
            dq.clone(),
            vec![q, scale, zero],
            dq.clone(),
            attrs,
        );
        Ok(dq)
    }

    /// Every op other than Conv.
    fn plain(&mut self, node: &'g Node) -> Result<(), OnnxError> {
        let name = node.name.clone();
        let inputs = node
            .inputs
            .iter()
            .map(|i| self.value(i))
            .collect::<Result<Vec<String>, OnnxError>>()?;
        let out = self.value(&node.name)?;
        let first = || {
            inputs
                .first()
                .cloned()
                .ok_or_else(|| OnnxError::Unsupported(format!("node '{}' has no input", node.name)))
        };
        match &node.op {
            Op::Input => {}
            Op::Conv { .. } => return self.conv(node, None),
            Op::BatchNorm => {
                let x = first()?;
                let affine = fold::batch_norm_affine(&node.name, self.state)?;
                let (scale, shift) = self.affine_initializers(&node.name, &affine)?;
                let scaled = format!("{out}:scaled");
                self.push(
                    "Mul",
                    format!("{name}:scale"),
                    vec![x, scale],
                    scaled.clone(),
                );
                self.push("Add", name, vec![scaled, shift], out);
            }
            Op::Silu => {
                let x = first()?;
                let sig = format!("{out}:sigmoid");
                self.push("Sigmoid", sig.clone(), vec![x.clone()], sig.clone());
                self.push("Mul", name, vec![x, sig], out);
            }
            Op::Relu => self.push("Relu", name, inputs, out),
            Op::Sigmoid => self.push("Sigmoid", name, inputs, out),
            Op::Add => self.push("Add", name, inputs, out),
            Op::MatMul => self.push("MatMul", name, inputs, out),
            Op::Concat => self.push_with("Concat", name, inputs, out, vec![int("axis", 1)]),
            Op::Upsample2x => {
                let x = first()?;
                let scales = Tensor::new(vec![4], vec![1.0, 1.0, 2.0, 2.0])
                    .map_err(|e| OnnxError::Unsupported(e.to_string()))?;
                let scales =
                    self.initializer(float_tensor(&format!("{out}:scales"), &scales, None));
                let attrs = vec![
                    string("mode", "nearest"),
                    string("coordinate_transformation_mode", "asymmetric"),
                    string("nearest_mode", "floor"),
                ];
                // Inputs: X, roi (unused, empty name), scales.
                self.push_with("Resize", name, vec![x, String::new(), scales], out, attrs);
            }
            Op::MaxPool { kernel, stride } => {
                let (k, s) = (i64::from(*kernel), i64::from(*stride));
                let p = k / 2;
                let attrs = vec![
                    ints("kernel_shape", &[k, k]),
                    ints("strides", &[s, s]),
                    ints("pads", &[p, p, p, p]),
                ];
                self.push_with("MaxPool", name, inputs, out, attrs);
            }
            Op::FlattenSpatial => {
                let x = first()?;
                // 0 copies the input's axis: [N, C, H, W] -> [N, C, H*W] for any N, H, W.
                let shape = self.initializer(int64_tensor(&format!("{out}:shape"), &[0, 0, -1]));
                self.push("Reshape", name, vec![x, shape], out);
            }
            Op::Transpose => self.push_with(
                "Transpose",
                name,
                inputs,
                out,
                vec![ints("perm", &[0, 2, 1])],
            ),
            Op::Scale { factor } => {
                let x = first()?;
                let f = self.initializer(float_scalar(&format!("{out}:factor"), *factor));
                self.push("Mul", name, vec![x, f], out);
            }
            Op::Softmax => self.push_with("Softmax", name, inputs, out, vec![int("axis", -1)]),
            Op::ReshapeLike => {
                let (Some(x), Some(like)) = (inputs.first(), inputs.get(1)) else {
                    return Err(OnnxError::Unsupported(format!(
                        "reshape '{}' needs two inputs",
                        node.name
                    )));
                };
                let shape = format!("{out}:shape");
                self.push("Shape", shape.clone(), vec![like.clone()], shape.clone());
                self.push("Reshape", name, vec![x.clone(), shape], out);
            }
        }
        Ok(())
    }

    /// Initializers `[C, 1, 1]` for an unfolded BatchNorm's scale and shift.
    fn affine_initializers(
        &mut self,
        bn: &str,
        affine: &Affine,
    ) -> Result<(String, String), OnnxError> {
        let mut names = Vec::with_capacity(2);
        for (what, values) in [("scale", &affine.scale), ("shift", &affine.shift)] {
            let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            let tensor_name = format!("{bn}:{what}");
            if data.iter().any(|v| !v.is_finite()) {
                return Err(OnnxError::FoldOverflow {
                    bn: bn.to_string(),
                    tensor: tensor_name,
                });
            }
            let t = Tensor::new(vec![data.len(), 1, 1], data)
                .map_err(|e| OnnxError::Unsupported(e.to_string()))?;
            let doc = Some(format!("BatchNorm '{bn}' in inference form"));
            names.push(self.initializer(float_tensor(&tensor_name, &t, doc)));
        }
        let shift = names.pop().unwrap_or_default();
        let scale = names.pop().unwrap_or_default();
        Ok((scale, shift))
    }
}
