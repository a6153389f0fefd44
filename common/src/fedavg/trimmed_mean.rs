//! Coordinate-wise trimmed mean: a robust [`Strategy`] that keeps more of the honest plants'
//! information than the median while still ignoring a few extreme deltas.
//!
//! Per coordinate, the plants' values are sorted, the `t = floor(trim_fraction × K)` lowest
//! and `t` highest are dropped (K: plants that trained on at least one sample), and the new
//! value is `base + mean(rest)`: the kept values summed in f64 in ascending order, divided by
//! their count, added to the base and rounded once. It withstands up to `t` malicious plants;
//! with `t = 0` (fewer than `1 / trim_fraction` plants) it is the unweighted mean and offers
//! no protection, so the coordinator's config refuses a fraction that trims nothing at its
//! `target_participants`.
//!
//! Unweighted, as the median is and for the same reason: a plant's vote must not grow with a
//! sample count the coordinator cannot verify (see [`CoordinateMedian`](super::CoordinateMedian)).

use super::coordinate::{self, Reducer, COORDINATE_TILE};
use super::error::FedAvgError;
use super::source::PlantUpdate;
use super::strategy::Strategy;
use crate::model::{ModelState, Tensor};

/// The coordinate-wise mean after dropping the `trim_fraction` lowest and highest values.
#[derive(Clone, Debug, PartialEq)]
pub struct TrimmedMean {
    trim_fraction: f64,
    name: String,
}

/// A trim fraction outside `0 <= f < 0.5`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("trim fraction {0} must be at least 0 and below 0.5 (the share of plants dropped at each end of every coordinate), e.g. 0.1 or 0.2")]
pub struct BadTrimFraction(pub f64);

impl TrimmedMean {
    /// Refuses a fraction that is not finite, negative, or 0.5 and above (which would drop
    /// every value).
    pub fn new(trim_fraction: f64) -> Result<Self, BadTrimFraction> {
        if !(trim_fraction.is_finite() && (0.0..0.5).contains(&trim_fraction)) {
            return Err(BadTrimFraction(trim_fraction));
        }
        Ok(Self {
            trim_fraction,
            name: format!("trimmed_mean({trim_fraction})"),
        })
    }

    pub fn trim_fraction(&self) -> f64 {
        self.trim_fraction
    }

    /// How many values are dropped at each end when `plants` plants vote.
    pub fn trimmed_per_side(&self, plants: usize) -> usize {
        // Exact for any plant count a round can have (far below 2^52).
        (self.trim_fraction * plants as f64).floor() as usize
    }

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

impl Reducer for TrimmedMean {
    fn reduce(&self, sorted: &[f32]) -> f64 {
        let t = self.trimmed_per_side(sorted.len());
        let kept = &sorted[t..sorted.len() - t];
        // From -0.0, the identity of addition: the mean of identical deltas, zeros of either
        // sign included, is that delta.
        let sum = kept.iter().fold(-0.0f64, |acc, &v| acc + f64::from(v));
        sum / kept.len() as f64
    }
}

impl Strategy for TrimmedMean {
    /// `trimmed_mean(<fraction>)`, so the model record says how much was trimmed.
    fn name(&self) -> &str {
        &self.name
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
