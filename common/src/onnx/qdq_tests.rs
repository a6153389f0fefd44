//! Tests of the INT8 QDQ variant without a runtime: every convolution reads quantised
//! inputs and INT8 weights, scales follow the documented arithmetic, missing or broken
//! calibration ranges are refused, and ranges merge as a union. (onnxruntime runs it in
//! `client/tests/onnx_parity.rs`.)

use super::proto::data_type;
use super::tests::{
    assert_topological, floats, initializer, metadata, op_types, random_state, small_arch, Lcg,
};
use super::*;
use crate::arch::Op;
use crate::model::Tensor;

fn ranges_for(graph: &Graph) -> ActivationRanges {
    qdq::calibration_points(graph)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let r = ActivationRange {
                min: -0.3,
                max: 1.0 + i as f32,
            };
            (p, r)
        })
        .collect()
}

#[test]
fn qdq_quantises_every_conv_input_and_weight() {
    let arch = small_arch();
    let graph = arch.graph().unwrap();
    let state = random_state(&graph, 10);
    let ranges = ranges_for(&graph);
    let bytes = export_qdq(&arch, &state, &ranges, &ExportOptions::for_arch(&arch)).unwrap();
    let model = decode(&bytes).unwrap();
    assert_eq!(metadata(&model)[META_PRECISION], "int8_qdq");
    assert_topological(&model);
    let g = model.graph.as_ref().unwrap();
    let producer = |value: &str| {
        g.node
            .iter()
            .find(|n| n.output.iter().any(|o| o == value))
            .map(|n| n.op_type.clone().unwrap())
    };
    let mut convs = 0;
    for n in g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Conv"))
    {
        convs += 1;
        assert_eq!(producer(&n.input[0]).as_deref(), Some("DequantizeLinear"));
        assert_eq!(producer(&n.input[1]).as_deref(), Some("DequantizeLinear"));
        // The bias stays a float initializer.
        if let Some(b) = n.input.get(2) {
            assert_eq!(initializer(&model, b).data_type, Some(data_type::FLOAT));
        }
    }
    let graph_convs = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv { .. }))
        .count();
    assert_eq!(convs, graph_convs);
    // Weights are INT8 under their parameter names, one scale per output channel.
    let w = initializer(&model, "head.heatmap.weight");
    assert_eq!(w.data_type, Some(data_type::INT8));
    assert_eq!(w.dims, [6, 16, 1, 1]);
    assert_eq!(initializer(&model, "head.heatmap.weight:scale").dims, [6]);
    // The input's activation scale comes from its range: max(|-0.3|, 1.0) / 127.
    let s = floats(initializer(&model, "images:scale"));
    assert_eq!(s, [1.0 / 127.0]);
    // Each activation is quantised once even when several convs read it.
    let quantizers = op_types(&model)
        .iter()
        .filter(|o| *o == "QuantizeLinear")
        .count();
    assert_eq!(quantizers, qdq::calibration_points(&graph).len());
}

#[test]
fn qdq_needs_a_finite_range_for_every_point() {
    let arch = small_arch();
    let graph = arch.graph().unwrap();
    let state = random_state(&graph, 11);
    let options = ExportOptions::for_arch(&arch);
    let mut ranges = ranges_for(&graph);
    ranges.remove("backbone.s3.b0.add");
    let err = export_qdq(&arch, &state, &ranges, &options).unwrap_err();
    assert!(
        matches!(&err, OnnxError::Calibration(m) if m.contains("backbone.s3.b0.add")),
        "{err}"
    );
    let mut ranges = ranges_for(&graph);
    ranges.insert(
        "backbone.stem.act".into(),
        ActivationRange {
            min: 1.0,
            max: f32::INFINITY,
        },
    );
    let err = export_qdq(&arch, &state, &ranges, &options).unwrap_err();
    assert!(
        matches!(&err, OnnxError::Calibration(m) if m.contains("backbone.stem.act")),
        "{err}"
    );
}

#[test]
fn per_channel_weights_round_trip_within_half_a_step() {
    let mut rng = Lcg(12);
    let data: Vec<f32> = (0..3 * 4)
        .map(|i| rng.next() * (i / 4 + 1) as f32)
        .collect();
    let mut w = Tensor::new(vec![3, 4, 1, 1], data).unwrap();
    w.data_mut()[4..8].fill(0.0); // an all-zero channel still gets a positive scale
    let (q, scales) = qdq::quantize_per_channel(&w);
    assert_eq!(scales.len(), 3);
    assert!(scales.iter().all(|&s| s > 0.0));
    for (o, row) in w.data().chunks(4).enumerate() {
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(q[o * 4..o * 4 + 4].iter().any(|&v| v.abs() == 127) || absmax == 0.0);
        for (j, &v) in row.iter().enumerate() {
            let back = f32::from(q[o * 4 + j]) * scales[o];
            assert!((back - v).abs() <= scales[o] / 2.0 + 1e-7, "{back} vs {v}");
        }
    }
}

#[test]
fn calibration_graph_exposes_every_point_and_ranges_merge_as_a_union() {
    let graph = small_arch().graph().unwrap();
    let points = qdq::calibration_points(&graph);
    assert_eq!(points[0], "input");
    assert!(points.contains(&"backbone.attn.add".to_string()));
    assert!(points.contains(&"neck.merge1".to_string()));
    let cal = qdq::calibration_graph(&graph);
    assert_eq!(cal.outputs[..2], graph.outputs[..]);
    assert_eq!(cal.outputs.len(), 2 + points.len());
    cal.validate().unwrap();

    let r = |min, max| ActivationRange { min, max };
    let a: ActivationRanges = [("x".to_string(), r(-1.0, 2.0))].into();
    let b: ActivationRanges = [
        ("x".to_string(), r(-0.5, 3.0)),
        ("y".to_string(), r(0.0, 1.0)),
    ]
    .into();
    let m = qdq::merge_ranges([&a, &b]);
    assert_eq!(m["x"], r(-1.0, 3.0));
    assert_eq!(m["y"], r(0.0, 1.0));
}
