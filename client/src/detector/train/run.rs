//! One training run's state and its optimizer step: forward under autocast, loss, backward
//! (with dynamic loss scaling on CUDA), the FedProx gradient, AdamW; plus checkpoints and the
//! final report.

use std::time::Instant;

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::{
    learning_rate, CheckpointPolicy, FedProx, Progress, Stop, StopReason, TrainConfig, TrainError,
    TrainReport,
};
use crate::data::Batch;
use crate::detector::loss::centernet_loss;
use crate::detector::targets::TargetMaps;
use crate::detector::{CheckpointInfo, Detector};

/// Dynamic loss scaling for float16 autocast (PyTorch's GradScaler defaults).
struct LossScaler {
    scale: f64,
    good_steps: u32,
}

/// The state of one training run.
pub(super) struct Run<'c> {
    cfg: &'c TrainConfig,
    opt: nn::Optimizer,
    /// Trainable variables and, under FedProx, their reference values.
    trainable: Vec<Tensor>,
    prox: Vec<(Tensor, Tensor)>,
    scaler: Option<LossScaler>,
    classes: usize,
    device: Device,
    /// Steps before this run in the whole schedule (resumed epochs), and planned in total.
    steps_before: u64,
    schedule_steps: Option<u64>,
    step: u64,
    images: u64,
    started: Instant,
    epoch_loss: (f64, u64),
}

impl<'c> Run<'c> {
    pub(super) fn new(
        det: &Detector,
        per_epoch: usize,
        cfg: &'c TrainConfig,
    ) -> Result<Self, TrainError> {
        let vs = det.var_store();
        let opt = nn::AdamW {
            wd: cfg.weight_decay,
            ..Default::default()
        }
        .build(vs, cfg.lr)?;
        // Epoch runs continue the schedule of the epochs already done; step and wall-clock
        // runs have their own.
        let (steps_before, schedule_steps) = match cfg.stop {
            Stop::Epochs(n) => {
                let per_epoch = per_epoch as u64;
                (
                    u64::from(cfg.start_epoch) * per_epoch,
                    Some(u64::from(n) * per_epoch),
                )
            }
            Stop::Steps(n) => (0, Some(n)),
            Stop::WallClock(_) => (0, None),
        };
        let device = det.device();
        let amp = cfg.mixed_precision && device.is_cuda();
        Ok(Self {
            cfg,
            opt,
            trainable: vs.trainable_variables(),
            prox: prox_pairs(det, cfg.fedprox.as_ref())?,
            scaler: amp.then_some(LossScaler {
                scale: 65536.0,
                good_steps: 0,
            }),
            classes: det.class_names().len(),
            device,
            steps_before,
            schedule_steps,
            step: 0,
            images: 0,
            started: Instant::now(),
            epoch_loss: (0.0, 0),
        })
    }

    pub(super) fn budget_spent(&self, epoch: u32) -> bool {
        match self.cfg.stop {
            Stop::Epochs(n) => epoch >= n,
            Stop::WallClock(d) => self.started.elapsed() >= d,
            Stop::Steps(n) => self.step >= n,
        }
    }

    /// Position in the cosine, 0 to 1.
    fn schedule_progress(&self) -> f64 {
        match (self.cfg.stop, self.schedule_steps) {
            (Stop::WallClock(d), _) => self.started.elapsed().as_secs_f64() / d.as_secs_f64(),
            (_, Some(total)) if total > 0 => (self.steps_before + self.step) as f64 / total as f64,
            _ => 0.0,
        }
    }

    pub(super) fn reset_epoch_loss(&mut self) {
        self.epoch_loss = (0.0, 0);
    }

    /// One optimizer step on `batch`.
    pub(super) fn step(
        &mut self,
        det: &Detector,
        batch: &Batch,
        epoch: u32,
    ) -> Result<Progress, TrainError> {
        let lr = learning_rate(
            self.cfg.lr,
            self.cfg.warmup_steps,
            self.step,
            self.schedule_progress(),
        );
        self.opt.set_lr(lr);
        let images = det.images_tensor(batch)?;
        let targets =
            TargetMaps::build(&batch.annotations, self.classes, batch.height, batch.width)?
                .to_tensors(self.device)?;
        let amp = self.scaler.is_some();
        let out = tch::autocast(amp, || det.forward(&images, true))?;
        let loss = centernet_loss(&out, &targets, self.cfg.box_weight)?;
        let value = loss.total.f_double_value(&[])?;
        if !value.is_finite() {
            return Err(TrainError::Diverged {
                step: self.step,
                loss: value,
            });
        }
        self.opt.zero_grad();
        let apply = match &self.scaler {
            Some(s) => {
                loss.total.f_mul_scalar(s.scale)?.f_backward()?;
                self.unscale_grads()?
            }
            None => {
                loss.total.f_backward()?;
                true
            }
        };
        if apply {
            self.add_prox_grads()?;
            self.opt.step();
        }
        self.step += 1;
        self.images += batch.batch as u64;
        self.epoch_loss.0 += value;
        self.epoch_loss.1 += 1;
        let elapsed = self.started.elapsed();
        Ok(Progress {
            epoch,
            step: self.step,
            total_steps: self
                .schedule_steps
                .map(|t| t.saturating_sub(self.steps_before)),
            loss: value,
            heatmap_loss: loss.heatmap.f_double_value(&[])?,
            box_loss: loss.boxes.f_double_value(&[])?,
            lr,
            images_per_sec: self.images as f64 / elapsed.as_secs_f64().max(1e-9),
            elapsed,
        })
    }

    /// Divides the gradients by the loss scale; false (and a smaller scale) when any is not
    /// finite, in which case the step is skipped.
    fn unscale_grads(&mut self) -> Result<bool, TrainError> {
        let Some(scaler) = self.scaler.as_mut() else {
            return Ok(true);
        };
        let mut found_inf = Tensor::f_zeros([1], (Kind::Float, self.device))?;
        let inv = Tensor::f_full([1], 1.0 / scaler.scale, (Kind::Float, self.device))?;
        for var in &self.trainable {
            let mut grad = var.f_grad()?;
            if grad.defined() {
                grad.f_internal_amp_non_finite_check_and_unscale(&mut found_inf, &inv)?;
            }
        }
        let ok = found_inf.f_double_value(&[0])? == 0.0;
        if ok {
            scaler.good_steps += 1;
            if scaler.good_steps >= 2000 {
                scaler.scale *= 2.0;
                scaler.good_steps = 0;
            }
        } else {
            scaler.scale /= 2.0;
            scaler.good_steps = 0;
        }
        Ok(ok)
    }

    /// FedProx: the gradient of `mu / 2 * ||w - w_ref||^2` is `mu * (w - w_ref)`, added in
    /// place rather than through the autograd graph.
    fn add_prox_grads(&self) -> Result<(), TrainError> {
        let Some(p) = self.cfg.fedprox.as_ref().filter(|p| p.mu > 0.0) else {
            return Ok(());
        };
        let _guard = tch::no_grad_guard();
        for (w, reference) in &self.prox {
            let mut grad = w.f_grad()?;
            if grad.defined() {
                let pull = w.f_sub(reference)?.f_mul_scalar(p.mu)?;
                let _ = grad.f_add_(&pull)?;
            }
        }
        Ok(())
    }

    pub(super) fn checkpoint(
        &self,
        det: &Detector,
        policy: &CheckpointPolicy,
        epoch: u32,
    ) -> Result<(), TrainError> {
        let info = CheckpointInfo {
            epoch,
            metrics: serde_json::json!({ "train_loss": self.mean_loss(), "steps": self.step }),
            preprocess: policy.preprocess.clone(),
        };
        det.save_checkpoint(&policy.path, &info)?;
        Ok(())
    }

    fn mean_loss(&self) -> f64 {
        let (sum, n) = self.epoch_loss;
        if n == 0 {
            f64::NAN
        } else {
            sum / n as f64
        }
    }

    pub(super) fn report(&self, epochs_completed: u32, reason: StopReason) -> TrainReport {
        let seconds = self.started.elapsed().as_secs_f64();
        TrainReport {
            epochs_completed,
            steps: self.step,
            images: self.images,
            seconds,
            images_per_sec: self.images as f64 / seconds.max(1e-9),
            last_loss: self.mean_loss(),
            reason,
        }
    }
}

/// Pairs each trainable variable with its reference value from `prox`, checking that the
/// reference covers exactly the model's variables with the same shapes.
fn prox_pairs(det: &Detector, prox: Option<&FedProx>) -> Result<Vec<(Tensor, Tensor)>, TrainError> {
    let Some(prox) = prox else {
        return Ok(Vec::new());
    };
    let vars = det.var_store().variables();
    let mut problems = Vec::new();
    for name in prox.reference.names().filter(|n| !vars.contains_key(*n)) {
        problems.push(format!("'{name}' is not in the model"));
    }
    let mut pairs = Vec::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let Some(r) = prox.reference.get(name) else {
            problems.push(format!("'{name}' is missing"));
            continue;
        };
        let dims: Vec<i64> = r.shape().iter().map(|&d| d as i64).collect();
        if dims != var.size() {
            problems.push(format!(
                "'{name}' has shape {:?}, the model {:?}",
                r.shape(),
                var.size()
            ));
            continue;
        }
        if var.requires_grad() {
            let t = Tensor::f_from_slice(r.data())?
                .f_view(dims.as_slice())?
                .f_to_device(det.device())?;
            pairs.push((var.shallow_clone(), t));
        }
    }
    if problems.is_empty() {
        Ok(pairs)
    } else {
        Err(TrainError::FedProxReference(problems.join("; ")))
    }
}
