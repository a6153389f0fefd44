//! The aggregation [`Strategy`] trait, in the shape of Flower's, and [`FedAvg`], its first
//! implementation.

use super::canonical::{aggregate_canonical, aggregate_canonical_part};
use super::error::FedAvgError;
use super::source::PlantUpdate;
use crate::model::{ModelState, Tensor};

/// How a round's plant updates become the next global model.
///
/// Pure and synchronous, like Flower's `aggregate_train`: the round driver owns the loop,
/// deadlines, storage and failures (a plant that failed simply is not among `updates`), and a
/// strategy only validates and combines. The result must depend on the set of updates only,
/// not on their order, so that a recomputation after a crash publishes the same model. A new
/// strategy (median, trimmed mean, FedAdam) is one file implementing this trait; it can read
/// deltas tile by tile through [`DeltaSource`](super::DeltaSource) as [`FedAvg`] does.
pub trait Strategy {
    /// Short name for logs and the model manifest, e.g. `"fedavg"`.
    fn name(&self) -> &str;

    /// The next global model from `base` and the plants' deltas.
    fn aggregate(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
    ) -> Result<ModelState, FedAvgError>;

    /// Part `part` of `parts` of [`aggregate`](Self::aggregate), so that a caller can run the
    /// parts on threads of their own and put the tensors together: the union of the parts
    /// must be exactly the model `aggregate` returns. The default computes everything in
    /// part 0 (no parallelism); a strategy that works value by value overrides it.
    fn aggregate_part(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
        part: usize,
        parts: usize,
    ) -> Result<Vec<(String, Tensor)>, FedAvgError> {
        let _ = parts;
        if part > 0 {
            return Ok(Vec::new());
        }
        let model = self.aggregate(base, updates)?;
        Ok(model
            .iter()
            .map(|(name, t)| (name.to_string(), t.clone()))
            .collect())
    }
}

/// Federated averaging weighted by sample count, computed canonically
/// ([`aggregate_canonical`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    fn aggregate(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
    ) -> Result<ModelState, FedAvgError> {
        aggregate_canonical(base, updates)
    }

    fn aggregate_part(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
        part: usize,
        parts: usize,
    ) -> Result<Vec<(String, Tensor)>, FedAvgError> {
        aggregate_canonical_part(base, updates, part, parts)
    }
}
