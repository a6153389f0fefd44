//! The layout of the global model (names, shapes, flat offsets) that every update must match.

use std::collections::BTreeMap;

use super::error::FedAvgError;
use super::source::DeltaSource;
use crate::model::{ModelState, Tensor};

/// One tensor of the layout; `offset` is its start in the flat accumulator.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
}

/// Tensors of the base model in name (canonical) order.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Layout {
    entries: Vec<Entry>,
    total: usize,
}

impl Layout {
    pub fn of(model: &ModelState) -> Self {
        let mut total = 0;
        let entries = model
            .iter()
            .map(|(name, t)| {
                let e = Entry {
                    name: name.to_string(),
                    shape: t.shape().to_vec(),
                    offset: total,
                    numel: t.numel(),
                };
                total += t.numel();
                e
            })
            .collect();
        Self { entries, total }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of values of the whole model.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Index of tensor `name` (entries are sorted by name, as in [`ModelState`]).
    pub fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
    }

    /// Refuses a delta that lacks a tensor, has an extra or repeated one, or a wrong shape.
    /// Problems are looked for in name order, so the same bad update always gives the same error.
    pub fn check(&self, plant: &str, delta: &dyn DeltaSource) -> Result<(), FedAvgError> {
        let mut got: BTreeMap<&str, &[usize]> = BTreeMap::new();
        for (name, shape) in delta.tensors() {
            if got.insert(name, shape).is_some() {
                return Err(FedAvgError::DuplicateTensor {
                    plant: plant.to_string(),
                    tensor: name.to_string(),
                });
            }
        }
        for e in &self.entries {
            match got.remove(e.name.as_str()) {
                None => {
                    return Err(FedAvgError::MissingTensor {
                        plant: plant.to_string(),
                        tensor: e.name.clone(),
                    })
                }
                Some(shape) if shape != e.shape.as_slice() => {
                    return Err(FedAvgError::ShapeMismatch {
                        plant: plant.to_string(),
                        tensor: e.name.clone(),
                        expected: e.shape.clone(),
                        got: shape.to_vec(),
                    })
                }
                Some(_) => {}
            }
        }
        match got.into_keys().next() {
            Some(extra) => Err(FedAvgError::UnexpectedTensor {
                plant: plant.to_string(),
                tensor: extra.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Refuses a base model whose names or shapes differ from this layout.
    pub fn check_base(&self, base: &ModelState) -> Result<(), FedAvgError> {
        let mut theirs = base.iter();
        for e in &self.entries {
            match theirs.next() {
                Some((name, t)) if name == e.name && t.shape() == e.shape.as_slice() => {}
                Some((name, _)) => {
                    return Err(FedAvgError::BaseChanged {
                        tensor: name.min(e.name.as_str()).to_string(),
                    })
                }
                None => {
                    return Err(FedAvgError::BaseChanged {
                        tensor: e.name.clone(),
                    })
                }
            }
        }
        match theirs.next() {
            Some((name, _)) => Err(FedAvgError::BaseChanged {
                tensor: name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Assembles the averaged tensors (one per entry, in order) into a model.
    pub fn assemble(&self, data: Vec<Vec<f32>>) -> ModelState {
        let pairs = self.entries.iter().zip(data).map(|(e, values)| {
            let t = Tensor::new(e.shape.clone(), values)
                .expect("fedavg writes exactly numel values per tensor of the layout");
            (e.name.clone(), t)
        });
        ModelState::from_tensors(pairs).expect("layout names come from a valid ModelState")
    }
}
