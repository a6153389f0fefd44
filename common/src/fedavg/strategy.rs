//! The aggregation [`Strategy`] trait, in the shape of Flower's, and [`FedAvg`], its first
//! implementation.

use super::canonical::aggregate_canonical;
use super::error::FedAvgError;
use super::source::PlantUpdate;
use crate::model::ModelState;

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
}
