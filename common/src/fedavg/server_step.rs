//! FedAvg with a server learning rate: the canonical weighted mean of the plants' deltas,
//! scaled by `server_lr` before it is added to the base (FedOpt's server SGD without
//! momentum, Reddi et al. 2021, "Adaptive Federated Optimization").
//!
//! # Why
//!
//! A FedAvg round moves the model by the mean of K short trajectories. When the plants'
//! data differ, their deltas point partly in different directions and the mean is shorter
//! than any one of them; and a round's K plants together see K batches per step, a batch K
//! times the one the plants' learning rate was tuned for. A server learning rate above 1
//! lengthens the step the plants agree on, as a larger learning rate for a larger batch
//! would (the linear scaling rule of large-batch training).
//!
//! # What is scaled
//!
//! Trained parameters only. BatchNorm's running statistics (`running_mean`, `running_var`,
//! `num_batches_tracked`) are estimates of the data, not steps of an optimiser: they keep the
//! plain mean (a scaled step could drive a variance below zero).
//!
//! # Canonical, like FedAvg
//!
//! Per element: `m = aggregate_canonical(...)[i]` (itself rounded once from f64), then
//! `new[i] = ((base[i] as f64) + lr * ((m as f64) - (base[i] as f64))) as f32`. Every step is
//! a fixed sequence of IEEE operations without FMA, so a recomputation after a crash gives the
//! same bits, on every CPU. With `server_lr = 1` it is exactly [`FedAvg`](super::FedAvg).

use super::canonical::aggregate_canonical_part;
use super::error::FedAvgError;
use super::source::PlantUpdate;
use super::strategy::Strategy;
use crate::model::{ModelState, Tensor};

/// Largest server learning rate accepted: beyond it one round overshoots by an order of
/// magnitude what the plants agreed on.
pub const MAX_SERVER_LR: f64 = 10.0;

/// FedAvg whose step is multiplied by a server learning rate.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerStep {
    lr: f64,
    name: String,
}

/// A server learning rate that is not finite or outside `0 < lr <= 10`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("server learning rate {0} must be above 0 and at most {MAX_SERVER_LR} (1 is plain FedAvg; 1.5 to 3 lengthen each round's step), e.g. 2")]
pub struct BadServerLr(pub f64);

impl ServerStep {
    pub fn new(lr: f64) -> Result<Self, BadServerLr> {
        if !(lr.is_finite() && lr > 0.0 && lr <= MAX_SERVER_LR) {
            return Err(BadServerLr(lr));
        }
        Ok(Self {
            lr,
            name: format!("fedavg(server_lr={lr})"),
        })
    }

    pub fn server_lr(&self) -> f64 {
        self.lr
    }
}

/// BatchNorm's running statistics, which keep the plain mean.
pub fn is_running_statistic(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|s| name.ends_with(s))
}

impl Strategy for ServerStep {
    fn name(&self) -> &str {
        &self.name
    }

    fn aggregate(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
    ) -> Result<ModelState, FedAvgError> {
        let tensors = self.aggregate_part(base, updates, 0, 1)?;
        Ok(ModelState::from_tensors(tensors).expect("layout names come from a valid ModelState"))
    }

    fn aggregate_part(
        &self,
        base: &ModelState,
        updates: &[PlantUpdate<'_>],
        part: usize,
        parts: usize,
    ) -> Result<Vec<(String, Tensor)>, FedAvgError> {
        let mut tensors = aggregate_canonical_part(base, updates, part, parts)?;
        for (name, t) in &mut tensors {
            if is_running_statistic(name) {
                continue;
            }
            let from = base
                .get(name)
                .expect("the canonical mean has exactly the base's tensors")
                .data();
            for (v, &b) in t.data_mut().iter_mut().zip(from) {
                let b = f64::from(b);
                *v = (b + self.lr * (f64::from(*v) - b)) as f32;
            }
        }
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fedavg::{aggregate_canonical, FedAvg};

    fn state(pairs: &[(&str, Vec<f32>)]) -> ModelState {
        ModelState::from_tensors(pairs.iter().map(|(n, v)| {
            (
                n.to_string(),
                Tensor::new(vec![v.len()], v.clone()).unwrap(),
            )
        }))
        .unwrap()
    }

    fn values(m: &ModelState, name: &str) -> Vec<f32> {
        m.get(name).unwrap().data().to_vec()
    }

    #[test]
    fn scales_the_mean_step_of_parameters_but_not_running_statistics() {
        let base = state(&[
            ("conv.weight", vec![1.0, -2.0, 0.5]),
            ("bn.running_var", vec![1.0, 1.0, 1.0]),
        ]);
        // Plant a (3 samples) and b (1 sample): weighted mean step [0.25, 1.0, -0.5] for
        // the weights, [-0.5, 0.25, 0.0] for the variance.
        let a = state(&[
            ("conv.weight", vec![0.0, 1.0, -0.5]),
            ("bn.running_var", vec![-0.5, 0.0, 0.0]),
        ]);
        let b = state(&[
            ("conv.weight", vec![1.0, 1.0, -0.5]),
            ("bn.running_var", vec![-0.5, 1.0, 0.0]),
        ]);
        let updates = [PlantUpdate::new("a", 3, &a), PlantUpdate::new("b", 1, &b)];
        let out = ServerStep::new(2.0)
            .unwrap()
            .aggregate(&base, &updates)
            .unwrap();
        assert_eq!(values(&out, "conv.weight"), vec![1.5, 0.0, -0.5]);
        assert_eq!(values(&out, "bn.running_var"), vec![0.5, 1.25, 1.0]);
        assert_eq!(out.names().count(), 2);
        assert_eq!(ServerStep::new(2.0).unwrap().name(), "fedavg(server_lr=2)");
    }

    #[test]
    fn a_server_lr_of_one_is_fedavg_bit_for_bit() {
        let base = state(&[
            ("w", vec![0.1, 0.2, 0.3, 1e-7]),
            ("bn.running_mean", vec![0.3; 4]),
        ]);
        let a = state(&[
            ("w", vec![0.013, -0.7, 1e-3, 3.3]),
            ("bn.running_mean", vec![0.01; 4]),
        ]);
        let b = state(&[
            ("w", vec![-0.2, 0.11, 7e-5, -1.0]),
            ("bn.running_mean", vec![0.2; 4]),
        ]);
        let updates = [PlantUpdate::new("a", 7, &a), PlantUpdate::new("b", 3, &b)];
        let step = ServerStep::new(1.0)
            .unwrap()
            .aggregate(&base, &updates)
            .unwrap();
        let avg = FedAvg.aggregate(&base, &updates).unwrap();
        assert_eq!(step, avg);
        assert_eq!(avg, aggregate_canonical(&base, &updates).unwrap());
    }

    #[test]
    fn parts_put_together_equal_the_whole_and_the_order_of_updates_does_not_matter() {
        let base = state(&[
            ("a.weight", vec![0.5; 5]),
            ("b.weight", vec![-0.25; 3]),
            ("c.bias", vec![2.0; 2]),
        ]);
        let d1 = state(&[
            ("a.weight", vec![0.1, 0.2, 0.3, 0.4, 0.5]),
            ("b.weight", vec![1.0, -1.0, 0.3]),
            ("c.bias", vec![0.7, -0.7]),
        ]);
        let d2 = state(&[
            ("a.weight", vec![-0.3, 0.01, 0.0, 2.0, 0.5]),
            ("b.weight", vec![0.2, 0.2, -0.9]),
            ("c.bias", vec![0.1, 0.3]),
        ]);
        let s = ServerStep::new(1.7).unwrap();
        let fwd = [
            PlantUpdate::new("p1", 5, &d1),
            PlantUpdate::new("p2", 2, &d2),
        ];
        let rev = [
            PlantUpdate::new("p2", 2, &d2),
            PlantUpdate::new("p1", 5, &d1),
        ];
        let whole = s.aggregate(&base, &fwd).unwrap();
        assert_eq!(whole, s.aggregate(&base, &rev).unwrap());
        let mut parts = Vec::new();
        for p in 0..3 {
            parts.extend(s.aggregate_part(&base, &fwd, p, 3).unwrap());
        }
        assert_eq!(ModelState::from_tensors(parts).unwrap(), whole);
    }

    #[test]
    fn refuses_learning_rates_outside_its_range() {
        for lr in [0.0, -1.0, f64::NAN, f64::INFINITY, 10.5] {
            let e = ServerStep::new(lr).unwrap_err();
            assert!(e.to_string().contains("server learning rate"), "{e}");
        }
        assert!(ServerStep::new(10.0).is_ok());
        assert!(ServerStep::new(0.5).is_ok());
    }
}
