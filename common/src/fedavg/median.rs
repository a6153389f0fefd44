//! Coordinate-wise median: a robust [`Strategy`] for rounds where a plant may send a poisoned
//! delta (boosted, sign-flipped, or with an inflated sample count).
//!
//! Per coordinate, the new value is `base + median_k(delta_k[i])` over the plants that trained
//! on at least one sample. With an even number of plants the median is the mean of the two
//! middle values, computed in f64 (exact) and rounded once with the base. As long as fewer than
//! half of the plants are malicious, every coordinate stays between two honest plants' values,
//! however large the attackers' values are.
//!
//! # Unweighted, on purpose
//!
//! Every plant has one vote, whatever its sample count. A sample-weighted median would let one
//! plant that claims ten times its data outvote all others: the coordinator can cap a sample
//! count (`limits.max_samples_per_plant`, the plant's declared dataset size) but cannot verify
//! it. The cost is that a plant with much data counts as much as a small one; on well-balanced
//! federations that costs little, on very unbalanced ones prefer FedAvg with a norm bound.

use super::coordinate::{self, Reducer, COORDINATE_TILE};
use super::error::FedAvgError;
use super::source::PlantUpdate;
use super::strategy::Strategy;
use crate::model::{ModelState, Tensor};

/// The coordinate-wise median of the plants' deltas, one vote per plant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoordinateMedian;

impl Reducer for CoordinateMedian {
    fn reduce(&self, sorted: &[f32]) -> f64 {
        let k = sorted.len();
        if k % 2 == 1 {
            f64::from(sorted[k / 2])
        } else {
            // The sum of two f32 values is exact in f64, and halving it is exact too.
            (f64::from(sorted[k / 2 - 1]) + f64::from(sorted[k / 2])) / 2.0
        }
    }
}

impl CoordinateMedian {
    /// [`Strategy::aggregate`] with tiles of `tile` values (tests: the result never depends on it).
    pub fn aggregate_with_tile(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
        tile: usize,
    ) -> Result<ModelState, FedAvgError> {
        coordinate::aggregate(self, base, updates, tile)
    }
}

impl Strategy for CoordinateMedian {
    fn name(&self) -> &str {
        "median"
    }

    fn aggregate(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
    ) -> Result<ModelState, FedAvgError> {
        coordinate::aggregate(self, base, updates, COORDINATE_TILE)
    }

    fn aggregate_part(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
        part: usize,
        parts: usize,
    ) -> Result<Vec<(String, Tensor)>, FedAvgError> {
        coordinate::aggregate_part(self, base, updates, part, parts, COORDINATE_TILE)
    }
}
