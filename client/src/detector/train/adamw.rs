//! AdamW written over tch tensors, so that its moments and step count are ours to checkpoint
//! (tch's `nn::Optimizer` keeps them inside LibTorch, out of reach). The update is PyTorch's
//! (and LibTorch's `torch::optim::AdamW`): decoupled weight decay `w *= 1 - lr * wd`, then
//! `m = lerp(m, g, 1 - beta1)`, `v = lerp(v, g^2, 1 - beta2)` and
//! `w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
//!
//! tch 0.24 exposes neither `_fused_adamw_` nor the `_foreach_*` kernels, so each variable
//! takes eight in-place LibTorch calls into buffers kept between steps (no allocation): about
//! 500 calls for the default detector's 63 trainable tensors, about what LibTorch's own AdamW
//! makes from C++. Measured by `cost::step_cost` below at 2 threads: 1.9-2.0 ms per step
//! against LibTorch's 2.4-3.0 ms, under 1% of a training step (docs/benchmarks.md has the
//! training throughput before and after).

use tch::{Device, Kind, TchError, Tensor};

use super::resume::AdamWState;
use super::TrainError;
use crate::detector::{Detector, DetectorError};
use fedinspect_common::model::Tensor as HostTensor;
use fedinspect_common::ModelState;

/// PyTorch's defaults, and what tch's `nn::AdamW` used before.
pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// One trainable variable and its moments, on the variable's device.
struct Slot {
    name: String,
    var: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Room for `g^2` and then the denominator, so a step allocates nothing.
    scratch: Tensor,
}

pub(super) struct AdamW {
    weight_decay: f64,
    step: u64,
    slots: Vec<Slot>,
}

impl AdamW {
    /// An optimizer over `det`'s trainable variables, with zero moments or with `state`'s
    /// (which must hold both moments of exactly these variables, shapes included).
    pub(super) fn new(
        det: &Detector,
        weight_decay: f64,
        state: Option<&AdamWState>,
    ) -> Result<Self, TrainError> {
        let vars = det.trainable_variables();
        if let Some(state) = state {
            let shapes: Vec<(String, Vec<i64>)> =
                vars.iter().map(|(n, v)| (n.clone(), v.size())).collect();
            let problems = state.problems(&shapes, &|moment, name| format!("{moment} of '{name}'"));
            if !problems.is_empty() {
                return Err(TrainError::Resume(format!(
                    "the optimizer state does not fit the model: {}",
                    problems.join("; ")
                )));
            }
        }
        let device = det.device();
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let (exp_avg, exp_avg_sq) = match state {
                Some(s) => (
                    to_device(&s.exp_avg, &name, device)?,
                    to_device(&s.exp_avg_sq, &name, device)?,
                ),
                None => (var.f_zeros_like()?, var.f_zeros_like()?),
            };
            let scratch = var.f_empty_like()?;
            slots.push(Slot {
                name,
                var,
                exp_avg,
                exp_avg_sq,
                scratch,
            });
        }
        Ok(Self {
            weight_decay,
            step: state.map_or(0, |s| s.step),
            slots,
        })
    }

    /// Updates applied since the moments started.
    pub(super) fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Zeroes every gradient in place (keeping its memory for the next backward pass).
    pub(super) fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.var.zero_grad();
        }
    }

    /// Calls `f` on every gradient that exists (loss-scale unscaling works on them in place).
    pub(super) fn for_each_grad(
        &self,
        mut f: impl FnMut(&mut Tensor) -> Result<(), TchError>,
    ) -> Result<(), TrainError> {
        for s in &self.slots {
            let mut grad = s.var.f_grad()?;
            if grad.defined() {
                f(&mut grad)?;
            }
        }
        Ok(())
    }

    /// One update at learning rate `lr` from the gradients in place; variables without a
    /// gradient are left alone.
    pub(super) fn step(&mut self, lr: f64) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let t = self.step as f64;
        let step_size = lr / (1.0 - BETA1.powf(t));
        let sqrt_bc2 = (1.0 - BETA2.powf(t)).sqrt();
        // `w -= step_size * m / d` as `w += m / (d * -1 / step_size)`: tch's addcdiv_ has no
        // scale argument, so the scale goes into the denominator, which is a temporary anyway.
        let (d_scale, d_shift) = if step_size > 0.0 {
            (-1.0 / (step_size * sqrt_bc2), -EPS / step_size)
        } else {
            (0.0, 0.0)
        };
        let decay = 1.0 - lr * self.weight_decay;
        for s in &mut self.slots {
            let grad = s.var.f_grad()?;
            if !grad.defined() {
                continue;
            }
            if decay != 1.0 {
                let _ = s.var.f_mul_scalar_(decay)?;
            }
            let _ = s.exp_avg.f_lerp_(&grad, 1.0 - BETA1)?;
            let _ = grad.f_square_out(&s.scratch)?;
            let _ = s.exp_avg_sq.f_lerp_(&s.scratch, 1.0 - BETA2)?;
            if step_size > 0.0 {
                let _ = s.exp_avg_sq.f_sqrt_out(&s.scratch)?;
                let _ = s.scratch.f_mul_scalar_(d_scale)?;
                let _ = s.scratch.f_add_scalar_(d_shift)?;
                let _ = s.var.f_addcdiv_(&s.exp_avg, &s.scratch)?;
            }
        }
        Ok(())
    }

    /// The moments and step count, copied to host memory.
    pub(super) fn state(&self) -> Result<AdamWState, TrainError> {
        let mut exp_avg = ModelState::new();
        let mut exp_avg_sq = ModelState::new();
        for s in &self.slots {
            exp_avg
                .insert(s.name.clone(), to_host(&s.exp_avg)?)
                .map_err(DetectorError::from)?;
            exp_avg_sq
                .insert(s.name.clone(), to_host(&s.exp_avg_sq)?)
                .map_err(DetectorError::from)?;
        }
        Ok(AdamWState {
            step: self.step,
            exp_avg,
            exp_avg_sq,
        })
    }
}

fn to_device(moments: &ModelState, name: &str, device: Device) -> Result<Tensor, TrainError> {
    let t = moments
        .get(name)
        .ok_or_else(|| TrainError::Resume(format!("no moment for '{name}'")))?;
    let dims: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_slice(t.data())?
        .f_view(dims.as_slice())?
        .f_to_device(device)?)
}

fn to_host(t: &Tensor) -> Result<HostTensor, TrainError> {
    let src = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?;
    let n = src.numel();
    let mut data = vec![0f32; n];
    src.f_copy_data(&mut data, n)?;
    let shape = src.size().iter().map(|&d| d as usize).collect();
    Ok(HostTensor::new(shape, data).map_err(DetectorError::from)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedinspect_common::arch::ArchConfig;
    use tch::nn::{self, OptimizerConfig};

    fn tiny_detector() -> Detector {
        let arch = ArchConfig {
            num_classes: 2,
            input_size: 64,
            width: 0.25,
            fpn_width: 16,
            head_width: 16,
            ..ArchConfig::default()
        };
        Detector::seeded(arch, vec!["a".into(), "b".into()], Device::Cpu, 3).unwrap()
    }

    /// Gradients of `sum(w * c + w^2 / 2)` over the trainable variables, for fixed random
    /// `c`: smooth and well away from zero, so rounding differences between two optimizers
    /// stay rounding-sized. (A real loss would not do: conv biases under BatchNorm get
    /// gradients of pure rounding noise, which Adam scales up to whole learning-rate steps.)
    fn backward(det: &Detector) {
        // Coefficients from a fixed formula, not LibTorch's global generator: tests run in
        // parallel threads and would draw from it in between.
        let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (_, var) in det.trainable_variables() {
            let c = Tensor::arange(var.numel() as i64, (Kind::Float, Device::Cpu))
                .sin()
                .view(var.size().as_slice());
            loss = loss + (&var * c).sum(Kind::Float) + (&var * &var).sum(Kind::Float) * 0.5;
        }
        loss.backward();
    }

    fn max_abs_diff(a: &ModelState, b: &ModelState) -> f32 {
        a.iter()
            .flat_map(|(name, t)| t.data().iter().zip(b.get(name).unwrap().data()))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn follows_libtorchs_adamw() {
        tch::set_num_threads(1);
        let (ours_det, mut theirs_det) = (tiny_detector(), tiny_detector());
        let start = ours_det.state().unwrap();
        // Same starting weights whatever other threads did to the global generator.
        theirs_det.load_state(&start).unwrap();
        let mut ours = AdamW::new(&ours_det, 0.05, None).unwrap();
        let mut theirs = nn::AdamW {
            wd: 0.05,
            ..Default::default()
        }
        .build(theirs_det.var_store(), 1e-2)
        .unwrap();
        for step in 0..5 {
            // A changing learning rate, as under warmup.
            let lr = 1e-2 * f64::from(step + 1) / 5.0;
            ours.zero_grad();
            backward(&ours_det);
            ours.step(lr).unwrap();
            theirs.set_lr(lr);
            theirs.zero_grad();
            backward(&theirs_det);
            theirs.step();
        }
        let (a, b) = (ours_det.state().unwrap(), theirs_det.state().unwrap());
        let moved = max_abs_diff(&a, &start);
        let apart = max_abs_diff(&a, &b);
        assert!(moved > 1e-2, "five steps moved the weights by only {moved}");
        assert!(apart < 1e-6, "ours and LibTorch's AdamW differ by {apart}");
        assert_eq!(ours.steps_taken(), 5);
    }
}

/// The cost of one optimizer step for the default detector, ours against LibTorch's AdamW,
/// printed (training throughput itself is `tests/detector_throughput.rs`). Ignored by default:
/// `scripts/cargo test --release -p fedinspect-client --lib step_cost -- --ignored --nocapture`
#[cfg(test)]
mod cost {
    use std::time::Instant;

    use super::*;
    use fedinspect_common::arch::ArchConfig;
    use tch::nn::{self, OptimizerConfig};

    /// Best-of-`rounds` milliseconds per call of `f`, over blocks of `calls`.
    fn best_ms(rounds: usize, calls: usize, mut f: impl FnMut()) -> f64 {
        (0..rounds)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..calls {
                    f();
                }
                t.elapsed().as_secs_f64() * 1e3 / calls as f64
            })
            .fold(f64::INFINITY, f64::min)
    }

    #[test]
    #[ignore = "benchmark: run with --release -- --ignored --nocapture"]
    fn step_cost() {
        tch::set_num_threads(2);
        let arch = ArchConfig::default();
        let names = (0..arch.num_classes).map(|c| format!("c{c}")).collect();
        let det = Detector::seeded(arch, names, Device::Cpu, 0).unwrap();
        // Gradients of the right shapes, as after a backward pass.
        let loss = det
            .trainable_variables()
            .iter()
            .map(|(_, v)| v.sum(Kind::Float))
            .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
        loss.backward();
        let mut ours = AdamW::new(&det, 1e-4, None).unwrap();
        let mut theirs = nn::AdamW {
            wd: 1e-4,
            ..Default::default()
        }
        .build(det.var_store(), 1e-3)
        .unwrap();
        let (rounds, calls) = (7, 50);
        for round in 0..2 {
            let ours_ms = best_ms(rounds, calls, || ours.step(1e-3).unwrap());
            let theirs_ms = best_ms(rounds, calls, || theirs.step());
            let ours_zero = best_ms(rounds, calls, || ours.zero_grad());
            println!(
                "round {round}: AdamW step on {} tensors: ours {ours_ms:.3} ms, LibTorch's {theirs_ms:.3} ms; zero_grad {ours_zero:.3} ms",
                ours.slots.len()
            );
        }
    }
}
