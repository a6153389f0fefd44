//! What aggregation reads: a plant's delta as a [`DeltaSource`] readable by range, and the
//! [`PlantUpdate`] that pairs it with the plant's id and sample count.

use std::fmt;
use std::io;

use crate::model::ModelState;

/// A plant's delta, readable tensor by tensor and range by range.
///
/// In memory a [`ModelState`] is one; the coordinator can back one with the upload blob on
/// disk, so that a recomputation never needs every delta in memory at once. The aggregation
/// reads each value exactly once, in tiles of a few ten thousand values, tensor by tensor in
/// name order and, inside a tensor, by increasing offset.
pub trait DeltaSource {
    /// The tensors this delta holds, as (name, shape), in any order.
    fn tensors(&self) -> Vec<(&str, &[usize])>;

    /// Fills `out` with the values `offset..offset + out.len()` of tensor `name` (row-major).
    /// Called only with a name from [`tensors`](Self::tensors) and a range inside its shape.
    fn read(&self, name: &str, offset: usize, out: &mut [f32]) -> io::Result<()>;

    /// All values of tensor `name` when they already lie in memory, so that the aggregation
    /// reads them in place instead of copying them through [`read`](Self::read).
    fn as_slice(&self, name: &str) -> Option<&[f32]> {
        let _ = name;
        None
    }
}

impl DeltaSource for ModelState {
    fn tensors(&self) -> Vec<(&str, &[usize])> {
        self.iter().map(|(name, t)| (name, t.shape())).collect()
    }

    fn read(&self, name: &str, offset: usize, out: &mut [f32]) -> io::Result<()> {
        let data = self
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no tensor '{name}'")))?
            .data();
        let src = offset
            .checked_add(out.len())
            .and_then(|end| data.get(offset..end))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {offset}+{} is outside tensor '{name}'", out.len()),
                )
            })?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn as_slice(&self, name: &str) -> Option<&[f32]> {
        self.get(name).map(|t| t.data())
    }
}

/// One plant's contribution to a round: its delta and the number of samples it trained on.
pub struct PlantUpdate<'a> {
    /// The plant's id; the canonical order of accumulation is ascending byte order of ids.
    pub plant: String,
    /// Sample count `n_k`, the plant's weight. Zero is allowed: the plant contributes nothing.
    pub num_samples: u64,
    /// `local - base`, tensor by tensor.
    pub delta: &'a dyn DeltaSource,
}

impl<'a> PlantUpdate<'a> {
    pub fn new(plant: impl Into<String>, num_samples: u64, delta: &'a dyn DeltaSource) -> Self {
        Self {
            plant: plant.into(),
            num_samples,
            delta,
        }
    }
}

impl fmt::Debug for PlantUpdate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlantUpdate")
            .field("plant", &self.plant)
            .field("num_samples", &self.num_samples)
            .finish_non_exhaustive()
    }
}
