//! FedAvg with a server learning rate and heavy-ball server momentum: the canonical weighted
//! mean of the plants' deltas, scaled by `server_lr` before it is added to the base, plus
//! `momentum` times the step that made the base (FedOpt's server SGD, Reddi et al. 2021,
//! "Adaptive Federated Optimization"; with momentum, FedAvgM, Hsu et al. 2019).
//!
//! # Why
//!
//! A FedAvg round moves the model by the mean of K short trajectories. When the plants'
//! data differ, their deltas point partly in different directions and the mean is shorter
//! than any one of them; and a round's K plants together see K batches per step, a batch K
//! times the one the plants' learning rate was tuned for. A server learning rate above 1
//! lengthens the step the plants agree on, as a larger learning rate for a larger batch
//! would (the linear scaling rule of large-batch training). Momentum lengthens only what the
//! rounds agree on *over time*: a direction kept round after round adds up to `1 / (1 - momentum)`
//! times the step, while what changes from round to round (one round's plants against the
//! next's) cancels.
//!
//! # Momentum without server state
//!
//! Heavy ball keeps a velocity `v_t = momentum * v_{t-1} + mean_step_t` and moves
//! `w_{t+1} = w_t + lr * v_t`. Since `w_t - w_{t-1} = lr * v_{t-1}`, that is
//! `w_{t+1} = w_t + lr * mean_step_t + momentum * (w_t - w_{t-1})`: the velocity is the
//! difference between the base and the version it was aggregated from (its parent in the
//! lineage). The coordinator keeps no optimiser state that a crash, a backup or a rollback
//! could lose or desynchronise: a round's model is a pure function of its base, the base's
//! parent and the stored updates. After a rollback the next round continues from the
//! restored version's own step. A base without a parent (the initial model) has no step:
//! its round is plain (scaled) FedAvg.
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
//! `new[i] = (((base[i] as f64) + lr * ((m as f64) - (base[i] as f64)))
//! + momentum * ((base[i] as f64) - (previous[i] as f64))) as f32`. Every step is
//! a fixed sequence of IEEE operations without FMA, so a recomputation after a crash gives the
//! same bits, on every CPU. With `server_lr = 1` and no momentum it is exactly
//! [`FedAvg`](super::FedAvg).

use std::sync::Arc;

use super::canonical::aggregate_canonical_part;
use super::error::FedAvgError;
use super::source::PlantUpdate;
use super::strategy::Strategy;
use crate::model::{ModelState, Tensor};

/// Largest server learning rate accepted: beyond it one round overshoots by an order of
/// magnitude what the plants agreed on.
pub const MAX_SERVER_LR: f64 = 10.0;

/// Largest server momentum accepted: at 0.99 a steady direction is amplified 100 times.
pub const MAX_SERVER_MOMENTUM: f64 = 0.99;

/// FedAvg whose step is multiplied by a server learning rate, with optional heavy-ball
/// momentum. As configured it has no previous step; the round driver gives it the base's
/// parent with [`after`](Self::after).
#[derive(Clone, Debug, PartialEq)]
pub struct ServerStep {
    lr: f64,
    momentum: f64,
    name: String,
    /// The version the base was aggregated from; momentum steps along `base - previous`.
    previous: Option<Arc<ModelState>>,
}

/// A server learning rate that is not finite or outside `0 < lr <= 10`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("server learning rate {0} must be above 0 and at most {MAX_SERVER_LR} (1 is plain FedAvg; 1.5 to 3 lengthen each round's step), e.g. 2")]
pub struct BadServerLr(pub f64);

/// A server momentum that is not finite or outside `0 <= momentum <= 0.99`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("server momentum {0} must be at least 0 and at most {MAX_SERVER_MOMENTUM} (0 is none; 0.5 to 0.9 are usual), e.g. 0.5")]
pub struct BadServerMomentum(pub f64);

impl ServerStep {
    /// A server learning rate without momentum.
    pub fn new(lr: f64) -> Result<Self, BadServerLr> {
        if !(lr.is_finite() && lr > 0.0 && lr <= MAX_SERVER_LR) {
            return Err(BadServerLr(lr));
        }
        Ok(Self {
            lr,
            momentum: 0.0,
            name: step_name(lr, 0.0),
            previous: None,
        })
    }

    /// The same step with heavy-ball momentum `momentum`.
    pub fn with_momentum(self, momentum: f64) -> Result<Self, BadServerMomentum> {
        Self::check_momentum(momentum)?;
        Ok(Self {
            momentum,
            name: step_name(self.lr, momentum),
            ..self
        })
    }

    /// Whether `momentum` is one [`with_momentum`](Self::with_momentum) takes.
    pub fn check_momentum(momentum: f64) -> Result<(), BadServerMomentum> {
        if momentum.is_finite() && (0.0..=MAX_SERVER_MOMENTUM).contains(&momentum) {
            Ok(())
        } else {
            Err(BadServerMomentum(momentum))
        }
    }

    /// This step for a base that was aggregated from `previous` (its parent version; `None`
    /// for an initial model). Only momentum reads it.
    pub fn after(self, previous: Option<Arc<ModelState>>) -> Self {
        Self { previous, ..self }
    }

    pub fn server_lr(&self) -> f64 {
        self.lr
    }

    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// Whether aggregation reads the base's parent version.
    pub fn needs_previous(&self) -> bool {
        self.momentum > 0.0
    }
}

/// The name a version's record gets: `fedavg(server_lr=2)`, or
/// `fedavg(server_lr=1,momentum=0.5)` with momentum.
pub fn step_name(lr: f64, momentum: f64) -> String {
    if momentum == 0.0 {
        format!("fedavg(server_lr={lr})")
    } else {
        format!("fedavg(server_lr={lr},momentum={momentum})")
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
        let previous = self.previous.as_deref().filter(|_| self.momentum > 0.0);
        for (name, t) in &mut tensors {
            if is_running_statistic(name) {
                continue;
            }
            let from = base
                .get(name)
                .expect("the canonical mean has exactly the base's tensors");
            let before = match previous {
                None => None,
                Some(p) => match p.get(name) {
                    Some(b) if b.shape() == from.shape() => Some(b.data()),
                    _ => {
                        return Err(FedAvgError::PreviousMismatch {
                            tensor: name.clone(),
                        })
                    }
                },
            };
            let from = from.data();
            for (i, (v, &b)) in t.data_mut().iter_mut().zip(from).enumerate() {
                let b = f64::from(b);
                let mut next = b + self.lr * (f64::from(*v) - b);
                if let Some(before) = before {
                    next += self.momentum * (b - f64::from(before[i]));
                }
                let next = next as f32;
                if !next.is_finite() {
                    return Err(FedAvgError::Overflow {
                        tensor: name.clone(),
                        index: i,
                    });
                }
                *v = next;
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

    #[test]
    fn momentum_adds_the_step_that_made_the_base_to_parameters_only() {
        let previous = state(&[
            ("conv.weight", vec![0.5, -2.0, 1.0]),
            ("bn.running_mean", vec![9.0, 9.0, 9.0]),
        ]);
        let base = state(&[
            ("conv.weight", vec![1.0, -2.0, 0.5]),
            ("bn.running_mean", vec![1.0, 1.0, 1.0]),
        ]);
        let a = state(&[
            ("conv.weight", vec![0.25, 1.0, -0.5]),
            ("bn.running_mean", vec![-0.5, 0.0, 0.5]),
        ]);
        let updates = [PlantUpdate::new("a", 3, &a)];
        let step = ServerStep::new(1.0)
            .unwrap()
            .with_momentum(0.5)
            .unwrap()
            .after(Some(Arc::new(previous)));
        let out = step.aggregate(&base, &updates).unwrap();
        // base + delta + 0.5 * (base - previous): the previous step was [0.5, 0.0, -0.5].
        assert_eq!(values(&out, "conv.weight"), vec![1.5, -1.0, -0.25]);
        // Running statistics: the plain mean, no momentum.
        assert_eq!(values(&out, "bn.running_mean"), vec![0.5, 1.0, 1.5]);
        assert_eq!(step.name(), "fedavg(server_lr=1,momentum=0.5)");
    }

    #[test]
    fn momentum_from_the_lineage_is_heavy_ball_with_a_velocity() {
        // Five rounds of a steady step plus round-to-round noise: the lineage form (no state
        // but the last two versions) follows v = beta v + step; w += lr v.
        let (lr, beta) = (1.5, 0.8);
        let step = ServerStep::new(lr).unwrap().with_momentum(beta).unwrap();
        let mut lineage = vec![Arc::new(state(&[("w", vec![0.0, 1.0])]))];
        let mut w = [0.0f64, 1.0];
        let mut velocity = [0.0f64; 2];
        for r in 0..5 {
            let noise = if r % 2 == 0 { 0.01 } else { -0.01 };
            let d = [0.125 + noise, -0.0625];
            let delta = state(&[("w", vec![d[0] as f32, d[1] as f32])]);
            let base = lineage.last().unwrap().clone();
            let previous = (lineage.len() > 1).then(|| lineage[lineage.len() - 2].clone());
            let next = step
                .clone()
                .after(previous)
                .aggregate(&base, &[PlantUpdate::new("p", 4, &delta)])
                .unwrap();
            for i in 0..2 {
                velocity[i] = beta * velocity[i] + f64::from(d[i] as f32);
                w[i] += lr * velocity[i];
                let got = f64::from(next.get("w").unwrap().data()[i]);
                assert!(
                    (got - w[i]).abs() < 1e-5,
                    "round {r} value {i}: {got} vs {}",
                    w[i]
                );
            }
            lineage.push(Arc::new(next));
        }
        // Well past five plain steps of 1.5 x 0.125 = 0.9375 (momentum built up).
        assert!(w[0] > 2.0, "{w:?}");
    }

    #[test]
    fn without_a_previous_version_momentum_is_the_plain_step_bit_for_bit() {
        let base = state(&[("w", vec![0.1, 0.2, 0.3]), ("bn.running_var", vec![1.0; 3])]);
        let a = state(&[
            ("w", vec![0.013, -0.7, 1e-3]),
            ("bn.running_var", vec![0.1; 3]),
        ]);
        let updates = [PlantUpdate::new("a", 7, &a)];
        let plain = ServerStep::new(1.3).unwrap();
        let with = plain.clone().with_momentum(0.9).unwrap();
        assert_eq!(
            with.clone().after(None).aggregate(&base, &updates).unwrap(),
            plain.aggregate(&base, &updates).unwrap()
        );
        // Momentum 0 ignores a previous version and keeps the old name.
        let zero = plain.clone().with_momentum(0.0).unwrap();
        assert_eq!(zero.name(), "fedavg(server_lr=1.3)");
        assert!(!zero.needs_previous() && with.needs_previous());
        let far = Arc::new(state(&[
            ("w", vec![-5.0; 3]),
            ("bn.running_var", vec![1.0; 3]),
        ]));
        assert_eq!(
            zero.after(Some(far)).aggregate(&base, &updates).unwrap(),
            plain.aggregate(&base, &updates).unwrap()
        );
    }

    #[test]
    fn momentum_parts_put_together_equal_the_whole() {
        let previous = Arc::new(state(&[
            ("a.weight", vec![0.4; 5]),
            ("c.bias", vec![1.0; 2]),
        ]));
        let base = state(&[("a.weight", vec![0.5; 5]), ("c.bias", vec![2.0; 2])]);
        let d = state(&[
            ("a.weight", vec![0.1, 0.2, 0.3, 0.4, 0.5]),
            ("c.bias", vec![0.7, -0.7]),
        ]);
        let updates = [PlantUpdate::new("p", 5, &d)];
        let s = ServerStep::new(0.7)
            .unwrap()
            .with_momentum(0.6)
            .unwrap()
            .after(Some(previous));
        let whole = s.aggregate(&base, &updates).unwrap();
        let mut parts = Vec::new();
        for p in 0..3 {
            parts.extend(s.aggregate_part(&base, &updates, p, 3).unwrap());
        }
        assert_eq!(ModelState::from_tensors(parts).unwrap(), whole);
    }

    #[test]
    fn a_previous_version_of_another_shape_is_refused_by_name() {
        let base = state(&[("w", vec![0.1, 0.2, 0.3])]);
        let a = state(&[("w", vec![0.0; 3])]);
        let updates = [PlantUpdate::new("a", 1, &a)];
        let s = ServerStep::new(1.0).unwrap().with_momentum(0.5).unwrap();
        for previous in [
            state(&[("w", vec![0.1, 0.2])]),
            state(&[("v", vec![0.0; 3])]),
        ] {
            let e = s
                .clone()
                .after(Some(Arc::new(previous)))
                .aggregate(&base, &updates)
                .unwrap_err();
            assert!(
                matches!(&e, FedAvgError::PreviousMismatch { tensor } if tensor == "w"),
                "{e}"
            );
            assert!(e.to_string().contains("server_momentum = 0"), "{e}");
        }
    }

    #[test]
    fn refuses_momentum_outside_its_range() {
        for m in [-0.1, 1.0, 0.995, f64::NAN, f64::INFINITY] {
            let e = ServerStep::new(1.0).unwrap().with_momentum(m).unwrap_err();
            assert!(e.to_string().contains("server momentum"), "{e}");
        }
        assert!(ServerStep::new(1.0).unwrap().with_momentum(0.99).is_ok());
    }
}
