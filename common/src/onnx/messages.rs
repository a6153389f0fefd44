//! Constructors of the `onnx.proto` messages the emitter writes: initializers (raw
//! little-endian data), attributes, and the typed input and output declarations.

use super::proto::{
    attribute_type, data_type, tensor_shape_proto, type_proto, AttributeProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::Spatial;
use crate::model::{f32_le_bytes, Tensor};

/// Dimensions of a float32 feature map `[batch, channels, H/stride, W/stride]`: the batch is
/// the symbol `batch`; sides are numbers for a fixed input, symbols (`height/4`) otherwise.
pub(super) fn map_dims(channels: u32, stride: u32, spatial: Spatial) -> Vec<Dim> {
    let side = |fixed: u32, symbol: &str| match spatial {
        Spatial::Fixed { .. } => Dim::Value(i64::from(fixed / stride)),
        Spatial::Dynamic if stride == 1 => Dim::Param(symbol.to_string()),
        Spatial::Dynamic => Dim::Param(format!("{symbol}/{stride}")),
    };
    let (h, w) = match spatial {
        Spatial::Fixed { height, width } => (height, width),
        Spatial::Dynamic => (0, 0),
    };
    vec![
        Dim::Param("batch".to_string()),
        Dim::Value(i64::from(channels)),
        side(h, "height"),
        side(w, "width"),
    ]
}

/// One dimension of a declared shape.
pub(super) enum Dim {
    Value(i64),
    Param(String),
}

/// A float32 tensor declaration (graph input or output).
pub(super) fn value_info(name: &str, dims: Vec<Dim>) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value;
    let dim = dims
        .into_iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Value(v) => Value::DimValue(v),
                Dim::Param(p) => Value::DimParam(p),
            }),
            denotation: None,
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(data_type::FLOAT),
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        doc_string: None,
    }
}

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

pub(super) fn float_tensor(name: &str, t: &Tensor, doc: Option<String>) -> TensorProto {
    TensorProto {
        dims: dims(t.shape()),
        data_type: Some(data_type::FLOAT),
        name: Some(name.to_string()),
        doc_string: doc,
        raw_data: Some(f32_le_bytes(t.data()).into_owned()),
        ..TensorProto::default()
    }
}

pub(super) fn float_scalar(name: &str, v: f32) -> TensorProto {
    TensorProto {
        dims: Vec::new(),
        data_type: Some(data_type::FLOAT),
        name: Some(name.to_string()),
        raw_data: Some(v.to_le_bytes().to_vec()),
        ..TensorProto::default()
    }
}

pub(super) fn int8_tensor(name: &str, shape: &[usize], values: &[i8]) -> TensorProto {
    TensorProto {
        dims: dims(shape),
        data_type: Some(data_type::INT8),
        name: Some(name.to_string()),
        raw_data: Some(values.iter().map(|&v| v as u8).collect()),
        ..TensorProto::default()
    }
}

pub(super) fn int64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        dims: vec![values.len() as i64],
        data_type: Some(data_type::INT64),
        name: Some(name.to_string()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..TensorProto::default()
    }
}

fn attribute(name: &str, kind: i32) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(kind),
        ..AttributeProto::default()
    }
}

pub(super) fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        i: Some(v),
        ..attribute(name, attribute_type::INT)
    }
}

pub(super) fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        ints: v.to_vec(),
        ..attribute(name, attribute_type::INTS)
    }
}

pub(super) fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        s: Some(v.as_bytes().to_vec()),
        ..attribute(name, attribute_type::STRING)
    }
}
