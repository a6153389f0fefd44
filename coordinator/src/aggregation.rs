//! Turning a round's accepted deltas into the next model: norm clipping, the configured
//! strategy (FedAvg, FedAvg with a server learning rate and momentum, median or trimmed mean) and its call, and the version's metrics. Pure and
//! synchronous: no I/O of its own; the round driver opens the stored blobs as
//! [`DeltaSource`]s (which the strategy reads tile by tile) and calls this on a blocking
//! thread.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedinspect_common::fedavg::{
    CoordinateMedian, DeltaSource, FedAvg, FedAvgError, PlantUpdate, Strategy,
};
use fedinspect_common::{ModelState, Tensor};

use crate::config::AggregationStrategy;

/// One accepted update: its delta as the strategy reads it (already clipped if it was).
pub struct Input<'a> {
    pub plant_id: &'a str,
    pub num_samples: u64,
    pub delta: &'a dyn DeltaSource,
    pub metrics: &'a BTreeMap<String, f64>,
}

/// The strategy `[aggregation]` names, for a base aggregated from `previous` (the base's
/// parent version; only server momentum reads it).
pub fn strategy_for(
    choice: &AggregationStrategy,
    previous: Option<Arc<ModelState>>,
) -> Box<dyn Strategy + Send + Sync> {
    match choice {
        AggregationStrategy::FedAvg => Box::new(FedAvg),
        AggregationStrategy::Median => Box::new(CoordinateMedian),
        AggregationStrategy::TrimmedMean(tm) => Box::new(tm.clone()),
        AggregationStrategy::ServerStep(s) => Box::new(s.clone().after(previous)),
    }
}

/// The factor that brings a delta of L2 norm `norm` down to `bound`, if it is above.
pub fn clip_scale(norm: f64, bound: f64) -> Option<f32> {
    (norm > bound).then(|| (bound / norm) as f32)
}

/// Multiplies every value of `delta` by `scale` (f32, so a recomputation gives the same bits).
pub fn apply_scale(delta: &mut ModelState, scale: f32) {
    for (_, t) in delta.iter_mut() {
        for v in t.data_mut() {
            *v *= scale;
        }
    }
}

/// The next model from `base` and the inputs, in the strategy's canonical order.
pub fn aggregate(
    strategy: &dyn Strategy,
    base: &ModelState,
    inputs: &[Input<'_>],
) -> Result<ModelState, FedAvgError> {
    let updates: Vec<PlantUpdate<'_>> = inputs
        .iter()
        .map(|i| PlantUpdate::new(i.plant_id, i.num_samples, i.delta))
        .collect();
    strategy.aggregate(base, &updates)
}

/// Part `part` of `parts` of [`aggregate`]: the tensors of that part, the same values (see
/// `Strategy::aggregate_part`). The round driver runs the parts on threads of their own.
pub fn aggregate_part(
    strategy: &dyn Strategy,
    base: &ModelState,
    inputs: &[Input<'_>],
    part: usize,
    parts: usize,
) -> Result<Vec<(String, Tensor)>, FedAvgError> {
    let updates: Vec<PlantUpdate<'_>> = inputs
        .iter()
        .map(|i| PlantUpdate::new(i.plant_id, i.num_samples, i.delta))
        .collect();
    strategy.aggregate_part(base, &updates, part, parts)
}

/// Per metric name, the sample-weighted mean over the plants that reported it, from
/// (plant id, sample count, metrics), summed in plant-id order so it is the same on every
/// recomputation. Non-finite values are ignored.
pub fn weighted_metrics<'a>(
    plants: impl IntoIterator<Item = (&'a str, u64, &'a BTreeMap<String, f64>)>,
) -> BTreeMap<String, f64> {
    let mut order: Vec<(&str, u64, &BTreeMap<String, f64>)> = plants.into_iter().collect();
    order.sort_by(|a, b| a.0.cmp(b.0));
    let mut sums: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (_, num_samples, metrics) in order {
        for (name, &value) in metrics {
            if value.is_finite() && num_samples > 0 {
                let w = num_samples as f64;
                let e = sums.entry(name).or_default();
                e.0 += w * value;
                e.1 += w;
            }
        }
    }
    sums.into_iter()
        .map(|(name, (sum, weight))| (name.to_string(), sum / weight))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedinspect_common::fedavg::FedAvg;
    use fedinspect_common::Tensor;

    fn model(values: &[f32]) -> ModelState {
        let mut m = ModelState::new();
        m.insert(
            "w",
            Tensor::new(vec![values.len()], values.to_vec()).unwrap(),
        )
        .unwrap();
        m
    }

    #[test]
    fn clip_only_above_the_bound() {
        assert_eq!(clip_scale(1.0, 2.0), None);
        assert_eq!(clip_scale(2.0, 2.0), None);
        assert_eq!(clip_scale(4.0, 2.0), Some(0.5));
        let mut d = model(&[3.0, 4.0]);
        apply_scale(&mut d, clip_scale(5.0, 1.0).unwrap());
        assert_eq!(d.get("w").unwrap().data(), &[0.6, 0.8]);
    }

    #[test]
    fn weighted_fedavg_and_metrics_by_hand() {
        let base = model(&[1.0, 1.0]);
        let (d1, d2) = (model(&[1.0, 0.0]), model(&[4.0, 2.0]));
        let (m1, m2) = (
            BTreeMap::from([("loss".to_string(), 1.0)]),
            BTreeMap::from([("loss".to_string(), 4.0), ("acc".to_string(), f64::NAN)]),
        );
        let inputs = [
            Input {
                plant_id: "b",
                num_samples: 3,
                delta: &d2,
                metrics: &m2,
            },
            Input {
                plant_id: "a",
                num_samples: 1,
                delta: &d1,
                metrics: &m1,
            },
        ];
        let out = aggregate(&FedAvg, &base, &inputs).unwrap();
        // (1·1 + 3·4)/4 = 3.25 and (1·0 + 3·2)/4 = 1.5, added to the base.
        assert_eq!(out.get("w").unwrap().data(), &[4.25, 2.5]);
        let metrics = weighted_metrics(
            inputs
                .iter()
                .map(|i| (i.plant_id, i.num_samples, i.metrics)),
        );
        assert_eq!(metrics.len(), 1, "{metrics:?}");
        assert_eq!(metrics["loss"], 3.25);
    }
}
