//! Checks a model state against the graph it is exported with, before anything is emitted:
//! every parameter present with its exact shape and finite values, and nothing else, so an
//! export never silently runs on a state made for another architecture.

use std::collections::BTreeSet;

use super::OnnxError;
use crate::arch::Graph;
use crate::model::ModelState;

/// The first problem, in graph order: a missing tensor, a wrong shape, a non-finite value;
/// then a tensor the graph does not own.
pub(super) fn check_state(graph: &Graph, state: &ModelState) -> Result<(), OnnxError> {
    let specs = graph.params();
    for spec in &specs {
        let tensor = state
            .get(&spec.name)
            .ok_or_else(|| OnnxError::MissingTensor {
                name: spec.name.clone(),
            })?;
        if tensor.shape() != spec.shape.as_slice() {
            return Err(OnnxError::TensorShape {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                found: tensor.shape().to_vec(),
            });
        }
        if let Some(index) = tensor.data().iter().position(|v| !v.is_finite()) {
            return Err(OnnxError::NonFinite {
                name: spec.name.clone(),
                index,
            });
        }
    }
    let known: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    match state.names().find(|name| !known.contains(name)) {
        Some(name) => Err(OnnxError::UnexpectedTensor {
            name: name.to_string(),
        }),
        None => Ok(()),
    }
}
