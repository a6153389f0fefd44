//! Tests of the exporter without a runtime: the file decodes back with the declared opset,
//! names and shapes; BatchNorm is gone and its folding matches a direct computation; bad
//! states are refused naming the tensor. (Parity with onnxruntime is
//! `client/tests/onnx_parity.rs`; the INT8 variant's wiring is `qdq_tests.rs`.)

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::proto::{data_type, tensor_shape_proto::dimension::Value, ModelProto, TensorProto};
use super::*;
use crate::arch::{ConvInit, Node, Op};
use crate::model::Tensor;

/// Operators the exporter may emit (the TensorRT-friendly list of the module doc).
const ALLOWED_FP32: [&str; 13] = [
    "Conv",
    "Add",
    "Mul",
    "Sigmoid",
    "Relu",
    "Concat",
    "Resize",
    "MaxPool",
    "MatMul",
    "Softmax",
    "Reshape",
    "Shape",
    "Transpose",
];

/// Deterministic values in `[-1, 1)`: a 64-bit LCG, so tests need no RNG crate.
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    pub(super) fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A state for `graph` with random weights and plausible BatchNorm statistics (variance in
/// `[0.25, 1.75)`, so folding changes every value).
pub(super) fn random_state(graph: &Graph, seed: u64) -> ModelState {
    let mut rng = Lcg(seed);
    let mut state = ModelState::new();
    for spec in graph.params() {
        let n: usize = spec.shape.iter().product();
        let data = (0..n)
            .map(|_| {
                let u = rng.next();
                if spec.name.ends_with("running_var") {
                    1.0 + 0.75 * u
                } else {
                    0.5 * u
                }
            })
            .collect();
        state
            .insert(spec.name, Tensor::new(spec.shape, data).unwrap())
            .unwrap();
    }
    state
}

pub(super) fn small_arch() -> ArchConfig {
    ArchConfig {
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        input_size: 320,
        ..ArchConfig::default()
    }
}

fn node(name: &str, op: Op, inputs: &[&str], channels: u32) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        channels,
    }
}

fn conv(kernel: u32, bias: bool) -> Op {
    Op::Conv {
        kernel,
        stride: 1,
        bias,
        init: ConvInit::Default,
    }
}

fn dims_of(model: &ModelProto, input: bool, index: usize) -> Vec<String> {
    let graph = model.graph.as_ref().unwrap();
    let info = if input {
        &graph.input[index]
    } else {
        &graph.output[index]
    };
    let Some(proto::type_proto::Value::TensorType(t)) =
        info.r#type.as_ref().unwrap().value.as_ref()
    else {
        panic!("{:?} is not a tensor", info.name);
    };
    assert_eq!(t.elem_type, Some(data_type::FLOAT));
    t.shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| match d.value.as_ref().unwrap() {
            Value::DimValue(v) => v.to_string(),
            Value::DimParam(p) => p.clone(),
        })
        .collect()
}

pub(super) fn initializer<'m>(model: &'m ModelProto, name: &str) -> &'m TensorProto {
    let graph = model.graph.as_ref().unwrap();
    graph
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no initializer {name}"))
}

pub(super) fn floats(t: &TensorProto) -> Vec<f32> {
    assert_eq!(t.data_type, Some(data_type::FLOAT));
    t.raw_data
        .as_ref()
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub(super) fn op_types(model: &ModelProto) -> Vec<String> {
    let graph = model.graph.as_ref().unwrap();
    graph
        .node
        .iter()
        .map(|n| n.op_type.clone().unwrap())
        .collect()
}

pub(super) fn metadata(model: &ModelProto) -> BTreeMap<String, String> {
    model
        .metadata_props
        .iter()
        .map(|e| (e.key.clone().unwrap(), e.value.clone().unwrap()))
        .collect()
}

/// Every node input is the graph input, an initializer, an earlier node's output or empty
/// (an omitted optional input), and every graph output is produced.
pub(super) fn assert_topological(model: &ModelProto) {
    let graph = model.graph.as_ref().unwrap();
    let mut known: HashSet<&str> = graph
        .initializer
        .iter()
        .map(|t| t.name.as_deref().unwrap())
        .collect();
    known.insert(INPUT_NAME);
    known.insert("");
    for n in &graph.node {
        for i in &n.input {
            assert!(known.contains(i.as_str()), "{:?} reads unknown {i}", n.name);
        }
        for o in &n.output {
            assert!(known.insert(o.as_str()), "{o} is produced twice");
        }
    }
    for o in &graph.output {
        assert!(known.contains(o.name.as_deref().unwrap()));
    }
}

#[test]
fn default_export_declares_opset_names_shapes_and_metadata() {
    let arch = ArchConfig::default();
    let graph = arch.graph().unwrap();
    let state = random_state(&graph, 1);
    let mut options = ExportOptions::for_arch(&arch);
    options.model_version = Some(7);
    options
        .metadata
        .insert("plant_set".to_string(), "canary".to_string());
    let bytes = export(&arch, &state, &options).unwrap();
    let model = decode(&bytes).unwrap();

    assert_eq!(model.ir_version, Some(8));
    assert_eq!(model.opset_import.len(), 1);
    assert_eq!(model.opset_import[0].domain.as_deref(), Some(""));
    assert_eq!(model.opset_import[0].version, Some(17));
    assert_eq!(model.producer_name.as_deref(), Some("fedinspect"));
    assert_eq!(
        model.producer_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(model.model_version, Some(7));

    let g = model.graph.as_ref().unwrap();
    assert_eq!(g.input.len(), 1);
    assert_eq!(g.input[0].name.as_deref(), Some("images"));
    assert_eq!(dims_of(&model, true, 0), ["batch", "2", "640", "640"]);
    let outputs: Vec<&str> = g
        .output
        .iter()
        .map(|o| o.name.as_deref().unwrap())
        .collect();
    assert_eq!(outputs, ["heatmap", "boxes"]);
    assert_eq!(dims_of(&model, false, 0), ["batch", "6", "160", "160"]);
    assert_eq!(dims_of(&model, false, 1), ["batch", "4", "160", "160"]);

    let meta = metadata(&model);
    assert_eq!(meta[META_MODEL_HASH], state.content_hash().to_hex());
    let back: ArchConfig = serde_json::from_str(&meta[META_ARCHITECTURE]).unwrap();
    assert_eq!(back, arch);
    assert_eq!(meta[META_PRECISION], "fp32");
    assert_eq!(meta["plant_set"], "canary");

    let ops = op_types(&model);
    assert!(!ops.iter().any(|o| o == "BatchNormalization"));
    for op in &ops {
        assert!(ALLOWED_FP32.contains(&op.as_str()), "emitted {op}");
    }
    // One Conv per conv node; SiLU as Sigmoid + Mul.
    let convs = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv { .. }))
        .count();
    assert_eq!(ops.iter().filter(|o| *o == "Conv").count(), convs);
    assert_topological(&model);
}

#[test]
fn initializers_are_the_parameters_with_batch_norm_folded_away() {
    let arch = small_arch();
    let graph = arch.graph().unwrap();
    let state = random_state(&graph, 2);
    let model = decode(&export(&arch, &state, &ExportOptions::for_arch(&arch)).unwrap()).unwrap();
    let g = model.graph.as_ref().unwrap();
    let names: BTreeSet<&str> = g
        .initializer
        .iter()
        .map(|t| t.name.as_deref().unwrap())
        .collect();
    assert_eq!(names.len(), g.initializer.len(), "duplicate initializer");

    // Parameters: every conv tensor under its own name, no BatchNorm tensor; each folded conv
    // gains a bias named after it. Exporter constants all contain ':'.
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for spec in graph.params() {
        let (node_name, _) = spec.name.rsplit_once('.').unwrap();
        match graph.node(node_name).unwrap().op {
            Op::BatchNorm => {
                let conv = &graph.node(node_name).unwrap().inputs[0];
                expected.insert(format!("{conv}.bias"));
            }
            _ => {
                expected.insert(spec.name.clone());
            }
        }
    }
    let params: BTreeSet<String> = names
        .iter()
        .filter(|n| !n.contains(':'))
        .map(|n| n.to_string())
        .collect();
    assert_eq!(params, expected);
    for spec in graph.params().iter().filter(|s| expected.contains(&s.name)) {
        let t = initializer(&model, &spec.name);
        let shape: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
        assert_eq!(t.dims, shape, "{}", spec.name);
    }
    // A plain conv keeps its values bit for bit; a folded one does not.
    let lateral = "neck.lateral1.weight";
    assert_eq!(
        floats(initializer(&model, lateral)),
        state.get(lateral).unwrap().data()
    );
    let stem = "backbone.stem.conv.weight";
    assert_ne!(
        floats(initializer(&model, stem)),
        state.get(stem).unwrap().data()
    );
    assert_eq!(
        initializer(&model, stem).doc_string.as_deref(),
        Some("BatchNorm 'backbone.stem.bn' folded in")
    );
}

#[test]
fn dynamic_spatial_declares_symbolic_sides() {
    let arch = small_arch();
    let state = random_state(&arch.graph().unwrap(), 3);
    let options = ExportOptions {
        spatial: Spatial::Dynamic,
        ..ExportOptions::for_arch(&arch)
    };
    let model = decode(&export(&arch, &state, &options).unwrap()).unwrap();
    assert_eq!(dims_of(&model, true, 0), ["batch", "2", "height", "width"]);
    assert_eq!(
        dims_of(&model, false, 0),
        ["batch", "6", "height/4", "width/4"]
    );
}

/// `[cout, cin, 3, 3]` conv, zero padding 1, stride 1, of a `[cin, h, w]` image; plain loops.
fn conv3x3(x: &[f64], cin: usize, h: usize, w: usize, weight: &[f64], cout: usize) -> Vec<f64> {
    let mut out = vec![0.0; cout * h * w];
    for o in 0..cout {
        for y in 0..h {
            for xx in 0..w {
                let mut acc = 0.0;
                for i in 0..cin {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (sy, sx) = (y as i64 + ky as i64 - 1, xx as i64 + kx as i64 - 1);
                            if sy < 0 || sx < 0 || sy >= h as i64 || sx >= w as i64 {
                                continue;
                            }
                            let v = x[(i * h + sy as usize) * w + sx as usize];
                            acc += v * weight[((o * cin + i) * 3 + ky) * 3 + kx];
                        }
                    }
                }
                out[(o * h + y) * w + xx] = acc;
            }
        }
    }
    out
}

#[test]
fn folded_conv_computes_conv_then_batch_norm() {
    // input (2 ch) -> c (3x3, 3 out, no bias) -> bn -> act (SiLU), on a 4x4 image.
    let graph = Graph {
        in_channels: 2,
        nodes: vec![
            node("input", Op::Input, &[], 2),
            node("c", conv(3, false), &["input"], 3),
            node("bn", Op::BatchNorm, &["c"], 3),
            node("act", Op::Silu, &["bn"], 3),
        ],
        outputs: vec!["act".into()],
    };
    let state = random_state(&graph, 4);
    let options = ExportOptions {
        spatial: Spatial::Fixed {
            height: 32,
            width: 32,
        },
        model_version: None,
        metadata: BTreeMap::new(),
    };
    let model = decode(&export_graph(&graph, &state, &options).unwrap()).unwrap();
    assert_eq!(op_types(&model), ["Conv", "Sigmoid", "Mul"]);
    let conv_node = &model.graph.as_ref().unwrap().node[0];
    assert_eq!(conv_node.input, ["images", "c.weight", "c.bias"]);
    assert_eq!(conv_node.output, ["bn"]);
    assert_eq!(
        metadata(&model)[META_GRAPH],
        serde_json::to_string(&graph).unwrap()
    );

    let f64s = |name: &str| -> Vec<f64> {
        state
            .get(name)
            .unwrap()
            .data()
            .iter()
            .map(|&v| f64::from(v))
            .collect()
    };
    let (w, gamma, beta) = (f64s("c.weight"), f64s("bn.weight"), f64s("bn.bias"));
    let (mean, var) = (f64s("bn.running_mean"), f64s("bn.running_var"));
    let folded_w: Vec<f64> = floats(initializer(&model, "c.weight"))
        .into_iter()
        .map(f64::from)
        .collect();
    let folded_b: Vec<f64> = floats(initializer(&model, "c.bias"))
        .into_iter()
        .map(f64::from)
        .collect();

    let (h, wd) = (4, 4);
    let mut rng = Lcg(99);
    let x: Vec<f64> = (0..2 * h * wd).map(|_| f64::from(rng.next())).collect();
    let direct = conv3x3(&x, 2, h, wd, &w, 3);
    let via_fold = conv3x3(&x, 2, h, wd, &folded_w, 3);
    let mut worst = 0f64;
    for o in 0..3 {
        for p in 0..h * wd {
            let conv_out = direct[o * h * wd + p];
            let bn = (conv_out - mean[o]) / (var[o] + 1e-5).sqrt() * gamma[o] + beta[o];
            let folded = via_fold[o * h * wd + p] + folded_b[o];
            worst = worst.max((bn - folded).abs());
        }
    }
    // Only the f32 rounding of the folded tensors remains.
    assert!(
        worst < 1e-6,
        "folded conv differs from conv + BN by {worst}"
    );
}

#[test]
fn batch_norm_without_a_foldable_conv_becomes_mul_and_add() {
    // bn1 follows the input; bn2 follows a conv that another node also reads.
    let graph = Graph {
        in_channels: 1,
        nodes: vec![
            node("input", Op::Input, &[], 1),
            node("bn1", Op::BatchNorm, &["input"], 1),
            node("c", conv(1, true), &["bn1"], 2),
            node("bn2", Op::BatchNorm, &["c"], 2),
            node("sum", Op::Add, &["c", "bn2"], 2),
        ],
        outputs: vec!["sum".into()],
    };
    let state = random_state(&graph, 5);
    let options = ExportOptions {
        spatial: Spatial::Dynamic,
        model_version: None,
        metadata: BTreeMap::new(),
    };
    let model = decode(&export_graph(&graph, &state, &options).unwrap()).unwrap();
    assert_eq!(
        op_types(&model),
        ["Mul", "Add", "Conv", "Mul", "Add", "Add"]
    );
    assert_topological(&model);
    let scale = floats(initializer(&model, "bn2:scale"));
    let shift = floats(initializer(&model, "bn2:shift"));
    assert_eq!(initializer(&model, "bn2:scale").dims, [2, 1, 1]);
    let get = |n: &str| state.get(n).unwrap().data().to_vec();
    for c in 0..2 {
        let s = get("bn2.weight")[c] / (get("bn2.running_var")[c] + 1e-5).sqrt();
        assert!((scale[c] - s).abs() < 1e-6);
        assert!((shift[c] - (get("bn2.bias")[c] - get("bn2.running_mean")[c] * s)).abs() < 1e-6);
    }
    // The unfolded conv keeps its own weights.
    assert_eq!(floats(initializer(&model, "c.weight")), get("c.weight"));
}

#[test]
fn attention_and_upsampling_use_the_documented_operators() {
    let arch = small_arch();
    let state = random_state(&arch.graph().unwrap(), 6);
    let model = decode(&export(&arch, &state, &ExportOptions::for_arch(&arch)).unwrap()).unwrap();
    let g = model.graph.as_ref().unwrap();
    let find = |name: &str| {
        g.node
            .iter()
            .find(|n| n.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no node {name}"))
    };
    let attr = |n: &proto::NodeProto, a: &str| {
        n.attribute
            .iter()
            .find(|x| x.name.as_deref() == Some(a))
            .cloned()
            .unwrap_or_else(|| panic!("no attribute {a}"))
    };
    let up = find("neck.up2");
    assert_eq!(up.op_type.as_deref(), Some("Resize"));
    assert_eq!(attr(up, "mode").s.unwrap(), b"nearest");
    assert_eq!(
        attr(up, "coordinate_transformation_mode").s.unwrap(),
        b"asymmetric"
    );
    assert_eq!(attr(up, "nearest_mode").s.unwrap(), b"floor");
    assert_eq!(
        floats(initializer(&model, &up.input[2])),
        [1.0, 1.0, 2.0, 2.0]
    );
    assert_eq!(up.input[1], "", "roi is omitted");

    let softmax = find("backbone.attn.weights");
    assert_eq!(attr(softmax, "axis").i, Some(-1));
    assert_eq!(attr(find("backbone.attn.q_t"), "perm").ints, vec![0, 2, 1]);
    let flat = initializer(&model, "backbone.attn.q_flat:shape");
    assert_eq!(flat.data_type, Some(data_type::INT64));
    let shape: Vec<i64> = flat
        .raw_data
        .as_ref()
        .unwrap()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(shape, [0, 0, -1]);
    assert_eq!(
        find("backbone.attn.unflat:shape").op_type.as_deref(),
        Some("Shape")
    );
    let scale = floats(initializer(&model, "backbone.attn.scaled:factor"));
    assert_eq!(scale, [1.0 / 8f32.sqrt()]);
    let stem = find("backbone.stem.conv");
    assert_eq!(attr(stem, "strides").ints, vec![2, 2]);
    assert_eq!(attr(stem, "pads").ints, vec![1, 1, 1, 1]);
}

fn export_err(state: &ModelState) -> OnnxError {
    let arch = small_arch();
    export(&arch, state, &ExportOptions::for_arch(&arch)).unwrap_err()
}

#[test]
fn bad_states_are_refused_naming_the_tensor() {
    let arch = small_arch();
    let good = random_state(&arch.graph().unwrap(), 7);

    let mut state = ModelState::new();
    for (name, t) in good.iter().filter(|(n, _)| *n != "head.box.bias") {
        state.insert(name, t.clone()).unwrap();
    }
    let err = export_err(&state);
    assert!(
        matches!(&err, OnnxError::MissingTensor { name } if name == "head.box.bias"),
        "{err}"
    );
    assert!(err.to_string().contains("head.box.bias"));

    let mut state = ModelState::new();
    for (name, t) in good.iter() {
        let t = if name == "neck.lateral2.weight" {
            Tensor::zeros(vec![16, 8, 1, 1]).unwrap()
        } else {
            t.clone()
        };
        state.insert(name, t).unwrap();
    }
    let err = export_err(&state);
    assert!(
        matches!(&err, OnnxError::TensorShape { name, found, .. }
            if name == "neck.lateral2.weight" && found == &[16, 8, 1, 1]),
        "{err}"
    );

    let mut state = good.clone();
    state
        .get_mut("backbone.s2.down.bn.running_mean")
        .unwrap()
        .data_mut()[3] = f32::NAN;
    let err = export_err(&state);
    assert!(
        matches!(&err, OnnxError::NonFinite { name, index: 3 }
            if name == "backbone.s2.down.bn.running_mean"),
        "{err}"
    );

    let mut state = good.clone();
    state
        .insert(
            "backbone.stem.bn.num_batches_tracked",
            Tensor::zeros(vec![1]).unwrap(),
        )
        .unwrap();
    let err = export_err(&state);
    assert!(
        matches!(&err, OnnxError::UnexpectedTensor { name }
            if name == "backbone.stem.bn.num_batches_tracked"),
        "{err}"
    );

    let mut state = good.clone();
    state
        .get_mut("backbone.s1.b0.cv2.bn.running_var")
        .unwrap()
        .data_mut()[1] = -0.5;
    let err = export_err(&state);
    assert!(
        matches!(&err, OnnxError::NegativeVariance { name, channel: 1, .. }
            if name == "backbone.s1.b0.cv2.bn.running_var"),
        "{err}"
    );
}

#[test]
fn bad_options_are_refused() {
    let arch = small_arch();
    let state = random_state(&arch.graph().unwrap(), 8);
    let mut options = ExportOptions::for_arch(&arch);
    options.spatial = Spatial::Fixed {
        height: 320,
        width: 300,
    };
    let err = export(&arch, &state, &options).unwrap_err();
    assert!(
        matches!(err, OnnxError::InputSize { width: 300, .. }),
        "{err}"
    );

    let mut options = ExportOptions::for_arch(&arch);
    options
        .metadata
        .insert(META_MODEL_HASH.to_string(), "forged".to_string());
    let err = export(&arch, &state, &options).unwrap_err();
    assert!(matches!(err, OnnxError::ReservedMetadata(_)), "{err}");

    assert!(matches!(decode(b"\xff\xff\xff"), Err(OnnxError::Decode(_))));
}

#[test]
fn export_is_deterministic() {
    let arch = small_arch();
    let state = random_state(&arch.graph().unwrap(), 9);
    let options = ExportOptions::for_arch(&arch);
    assert_eq!(
        export(&arch, &state, &options).unwrap(),
        export(&arch, &state, &options).unwrap()
    );
}
