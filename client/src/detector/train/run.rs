//! One training run's state and its optimizer step: forward (float16 on CUDA, `Precision`), loss, backward
//! (with dynamic loss scaling on CUDA), the FedProx gradient, AdamW; the learning-rate
//! schedule's position across resumed runs; checkpoints and the final report.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::adamw::AdamW;
use super::resume::{LossScale, Plan, TrainingPosition, TrainingState};
use super::{
    learning_rate, CheckpointPolicy, FedProx, Progress, Stop, StopReason, TrainConfig, TrainError,
    TrainReport,
};
use crate::data::Batch;
use crate::detector::loss::centernet_loss;
use crate::detector::targets::TargetMaps;
use crate::detector::{CheckpointInfo, Detector, Precision};

/// PyTorch GradScaler's initial scale and growth interval.
const INITIAL_LOSS_SCALE: f64 = 65536.0;
const LOSS_SCALE_GROWTH_STEPS: u32 = 2000;

/// The state of one training run.
pub(super) struct Run<'c> {
    cfg: &'c TrainConfig,
    opt: AdamW,
    /// Trainable variables and, under FedProx, their reference values.
    prox: Vec<(Tensor, Tensor)>,
    /// Dynamic loss scaling for float16 training; `None` without mixed precision.
    scaler: Option<LossScale>,
    classes: usize,
    device: Device,
    per_epoch: u64,
    /// Steps and seconds of the runs this one resumes.
    steps_before: u64,
    seconds_before: f64,
    /// Steps of this run.
    step: u64,
    /// Batches of the current epoch trained, by this run or the one it resumes.
    batch_in_epoch: u64,
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
        let per_epoch = per_epoch as u64;
        let training = cfg.resume.as_ref().and_then(|r| r.training.as_ref());
        let (steps_before, seconds_before) = match (&cfg.resume, training) {
            (_, Some(t)) => (t.position.steps_done, t.position.seconds_done),
            // Without a recorded position, whole epochs are all that is known.
            (Some(r), None) => (u64::from(r.epoch) * per_epoch, 0.0),
            (None, None) => (0, 0.0),
        };
        let moments = training.map(|t| &t.optimizer).or(cfg.moments.as_ref());
        let opt = AdamW::new(det, cfg.weight_decay, moments)?;
        let device = det.device();
        let amp = cfg.mixed_precision && device.is_cuda();
        let scaler = amp.then(|| {
            training
                .and_then(|t| t.position.loss_scale)
                .unwrap_or(LossScale {
                    scale: INITIAL_LOSS_SCALE,
                    good_steps: 0,
                })
        });
        Ok(Self {
            cfg,
            opt,
            prox: prox_pairs(det, cfg.fedprox.as_ref())?,
            scaler,
            classes: det.class_names().len(),
            device,
            per_epoch,
            steps_before,
            seconds_before,
            step: 0,
            batch_in_epoch: 0,
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

    /// Position in the cosine, 0 to 1: this run's progress, placed in its stretch of a longer
    /// cosine when it has one.
    fn schedule_progress(&self) -> f64 {
        let progress = self.run_progress();
        self.cfg.lr_span.map_or(progress, |span| span.at(progress))
    }

    /// How far through its plan this run is, 0 to 1, over this run and the ones it resumes.
    fn run_progress(&self) -> f64 {
        let done = (self.steps_before + self.step) as f64;
        match self.cfg.stop {
            Stop::Epochs(n) => {
                let total = u64::from(n) * self.per_epoch;
                if total == 0 {
                    0.0
                } else {
                    done / total as f64
                }
            }
            Stop::Steps(n) => done / (self.steps_before + n) as f64,
            Stop::WallClock(d) => {
                (self.seconds_before + self.started.elapsed().as_secs_f64())
                    / (self.seconds_before + d.as_secs_f64())
            }
        }
    }

    /// The warmup of this run: the configured steps, but never more than a third of a run
    /// whose length is known in steps. A warmup as long as the run multiplies a cosine that
    /// has already decayed: a plant whose round is 18 steps under a 100-step warmup never
    /// got past a fifth of its learning rate (the first round of a federation was wasted for
    /// every plant of the DeepPCB study). Runs of 300 steps or more keep the configured
    /// warmup; a wall-clock run keeps it too.
    fn warmup_steps(&self) -> u64 {
        let total = match self.cfg.stop {
            Stop::Epochs(n) => u64::from(n) * self.per_epoch,
            Stop::Steps(n) => self.steps_before + n,
            Stop::WallClock(_) => return self.cfg.warmup_steps,
        };
        capped_warmup(self.cfg.warmup_steps, total)
    }

    /// What the cosine decays towards, in totals over every run.
    fn plan(&self) -> Plan {
        match self.cfg.stop {
            Stop::Epochs(n) => Plan::Epochs(n),
            Stop::Steps(n) => Plan::Steps(self.steps_before + n),
            Stop::WallClock(d) => Plan::Seconds(self.seconds_before + d.as_secs_f64()),
        }
    }

    /// A new epoch whose first `skipped` batches were trained by the run this one resumes.
    pub(super) fn start_epoch(&mut self, skipped: u64) {
        self.epoch_loss = (0.0, 0);
        self.batch_in_epoch = skipped;
    }

    pub(super) fn end_epoch(&mut self) {
        self.batch_in_epoch = 0;
    }

    /// One optimizer step on `batch`.
    pub(super) fn step(
        &mut self,
        det: &Detector,
        batch: &Batch,
        epoch: u32,
    ) -> Result<Progress, TrainError> {
        // The warmup counts optimizer updates, so it runs again whenever the moments restart.
        let lr = learning_rate(
            self.cfg.lr,
            self.warmup_steps(),
            self.opt.steps_taken(),
            self.schedule_progress(),
        );
        let images = det.images_tensor(batch)?;
        let targets =
            TargetMaps::build(&batch.annotations, self.classes, batch.height, batch.width)?
                .to_tensors(self.device)?;
        let amp = self.scaler.is_some();
        let precision = if amp {
            Precision::Float16
        } else {
            Precision::Float32
        };
        let out = det.forward_in(&images, true, precision)?;
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
            self.opt.step(lr)?;
        }
        self.step += 1;
        self.batch_in_epoch += 1;
        self.images += batch.batch as u64;
        self.epoch_loss.0 += value;
        self.epoch_loss.1 += 1;
        let elapsed = self.started.elapsed();
        Ok(Progress {
            epoch,
            step: self.step,
            total_steps: match self.cfg.stop {
                Stop::Epochs(n) => {
                    Some((u64::from(n) * self.per_epoch).saturating_sub(self.steps_before))
                }
                Stop::Steps(n) => Some(n),
                Stop::WallClock(_) => None,
            },
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
        self.opt.for_each_grad(|grad| {
            grad.f_internal_amp_non_finite_check_and_unscale(&mut found_inf, &inv)
        })?;
        let ok = found_inf.f_double_value(&[0])? == 0.0;
        if ok {
            scaler.good_steps += 1;
            if scaler.good_steps >= LOSS_SCALE_GROWTH_STEPS {
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

    /// Writes the weights and everything needed to resume exactly: the optimizer state, the
    /// schedule position and the batch reached in `epoch` (epochs completed before it).
    pub(super) fn checkpoint(
        &self,
        det: &Detector,
        policy: &CheckpointPolicy,
        epoch: u32,
    ) -> Result<(), TrainError> {
        let position = TrainingPosition {
            steps_done: self.steps_before + self.step,
            seconds_done: self.seconds_before + self.started.elapsed().as_secs_f64(),
            batches_into_epoch: self.batch_in_epoch,
            plan: self.plan(),
            loss_scale: self.scaler,
        };
        let info = CheckpointInfo {
            epoch,
            metrics: serde_json::json!({ "train_loss": self.mean_loss(), "steps": self.step }),
            preprocess: policy.preprocess.clone(),
            recipe: policy.recipe.clone(),
            training: Some(TrainingState {
                position,
                optimizer: self.opt.state()?,
            }),
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
            moments: self
                .opt
                .state()
                .inspect_err(|e| tracing::warn!(error = %e, "cannot copy AdamW's moments off the device; the next round starts afresh"))
                .ok(),
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

/// `warmup` steps, at most a third of a `total`-step run (rounded up, at least 1 when a
/// warmup was asked for).
pub(super) fn capped_warmup(warmup: u64, total: u64) -> u64 {
    if warmup == 0 {
        return 0;
    }
    warmup.min(total.div_ceil(3).max(1))
}

#[cfg(test)]
mod warmup_tests {
    use super::capped_warmup;

    #[test]
    fn a_warmup_never_spans_more_than_a_third_of_the_run() {
        // The DeepPCB study: plants of 18 to 108 steps a round under a 100-step warmup.
        assert_eq!(capped_warmup(100, 18), 6);
        assert_eq!(capped_warmup(100, 108), 36);
        // The centralised baseline's 375-step rounds keep the whole warmup.
        assert_eq!(capped_warmup(100, 375), 100);
        assert_eq!(capped_warmup(100, 300), 100);
        assert_eq!(capped_warmup(100, 299), 100);
        assert_eq!(capped_warmup(100, 297), 99);
        assert_eq!(capped_warmup(0, 18), 0);
        assert_eq!(capped_warmup(5, 1), 1);
        assert_eq!(capped_warmup(5, 0), 1);
    }
}
