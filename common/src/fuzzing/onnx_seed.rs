//! The ONNX seed: a small hand-built model that uses every kind of field the exporter writes
//! (a real export of even the smallest detector is hundreds of KB, too big for a seed).

use super::seeds::seed_model;
use crate::onnx::proto::{
    attribute_type, data_type, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::onnx::META_MODEL_HASH;

/// A three-node ONNX model using every kind of field the exporter writes: raw and typed
/// initializers, int, ints, float and string attributes, fixed and symbolic dimensions,
/// metadata.
pub(super) fn onnx_seed() -> Vec<u8> {
    use prost::Message;
    use tensor_shape_proto::dimension::Value;
    let dim = |v| tensor_shape_proto::Dimension {
        value: Some(v),
        denotation: None,
    };
    let value_info = |name: &str, channels: i64| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(data_type::FLOAT),
                shape: Some(TensorShapeProto {
                    dim: vec![
                        dim(Value::DimParam("batch".into())),
                        dim(Value::DimValue(channels)),
                        dim(Value::DimValue(64)),
                        dim(Value::DimValue(64)),
                    ],
                }),
            })),
            denotation: None,
        }),
        doc_string: None,
    };
    let attr = |name: &str, kind: i32| AttributeProto {
        name: Some(name.into()),
        r#type: Some(kind),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str, attribute| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: Some(format!("{output}:node")),
        op_type: Some(op.into()),
        attribute,
        ..Default::default()
    };
    let weight: Vec<u8> = [0.5f32, -1.25]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        producer_name: Some("fedinspect".into()),
        producer_version: Some("0.1.0".into()),
        graph: Some(GraphProto {
            node: vec![
                node(
                    "Conv",
                    &["images", "conv.weight", "conv.bias"],
                    "conv",
                    vec![
                        AttributeProto {
                            ints: vec![1, 1],
                            ..attr("kernel_shape", attribute_type::INTS)
                        },
                        AttributeProto {
                            i: Some(1),
                            ..attr("group", attribute_type::INT)
                        },
                    ],
                ),
                node(
                    "LeakyRelu",
                    &["conv"],
                    "act",
                    vec![AttributeProto {
                        f: Some(0.1),
                        ..attr("alpha", attribute_type::FLOAT)
                    }],
                ),
                node(
                    "Resize",
                    &["act", "", "up:scales"],
                    "heatmap",
                    vec![AttributeProto {
                        s: Some(b"nearest".to_vec()),
                        ..attr("mode", attribute_type::STRING)
                    }],
                ),
            ],
            name: Some("seed".into()),
            initializer: vec![
                TensorProto {
                    dims: vec![2, 1, 1, 1],
                    data_type: Some(data_type::FLOAT),
                    name: Some("conv.weight".into()),
                    doc_string: Some("BatchNorm folded in".into()),
                    raw_data: Some(weight),
                    ..Default::default()
                },
                TensorProto {
                    dims: vec![2],
                    data_type: Some(data_type::FLOAT),
                    float_data: vec![0.0, 0.25],
                    name: Some("conv.bias".into()),
                    ..Default::default()
                },
                TensorProto {
                    dims: vec![4],
                    data_type: Some(data_type::FLOAT),
                    float_data: vec![1.0, 1.0, 2.0, 2.0],
                    name: Some("up:scales".into()),
                    ..Default::default()
                },
            ],
            input: vec![value_info("images", 1)],
            output: vec![value_info("heatmap", 2)],
            ..Default::default()
        }),
        metadata_props: vec![StringStringEntryProto {
            key: Some(META_MODEL_HASH.into()),
            value: Some(seed_model().content_hash().to_hex()),
        }],
        ..Default::default()
    };
    model.encode_to_vec()
}
