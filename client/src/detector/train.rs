//! Local training: a blocking, synchronous loop (the client agent runs it on its own thread)
//! with AdamW, linear warmup then cosine decay, an optional FedProx proximal term, mixed
//! precision on CUDA, progress through a callback that may stop the run, and checkpoints.
//!
//! Resuming: load a checkpoint with [`Detector::load_checkpoint`] and pass its epoch as
//! [`TrainConfig::start_epoch`]. Weights, BatchNorm statistics and the schedule position
//! resume; AdamW's moments do not (they are not checkpointed), so the warmup runs again.

use std::error::Error;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fedinspect_common::ModelState;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, TchError, Tensor};

use super::loss::{centernet_loss, DEFAULT_BOX_WEIGHT};
use super::targets::TargetMaps;
use super::{CheckpointInfo, Detector, DetectorError};
use crate::data::{Batch, Preprocess};

/// An error from the data side, passed through unchanged.
pub type DataError = Box<dyn Error + Send + Sync>;

/// Where training batches come from: one pass over the data per epoch.
pub trait BatchSource {
    /// Batches in one epoch, for the learning-rate schedule.
    fn batches_per_epoch(&self) -> usize;
    /// The batches of epoch `epoch` (0-based); `seed` and `epoch` fix shuffling and
    /// augmentation.
    fn epoch(
        &mut self,
        epoch: u32,
        seed: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch, DataError>> + '_>, DataError>;
}

/// The same batches every epoch (tests, benchmarks, overfitting checks).
pub struct FixedBatches(pub Vec<Batch>);

impl BatchSource for FixedBatches {
    fn batches_per_epoch(&self) -> usize {
        self.0.len()
    }

    fn epoch(
        &mut self,
        _epoch: u32,
        _seed: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch, DataError>> + '_>, DataError> {
        Ok(Box::new(self.0.iter().cloned().map(Ok)))
    }
}

/// When training stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    /// After this many epochs in total (a resumed run counts the checkpoint's epochs).
    Epochs(u32),
    /// After this much wall-clock time; the cosine follows elapsed time, like the baseline.
    WallClock(Duration),
    /// After this many optimizer steps in this run.
    Steps(u64),
}

/// FedProx: adds `mu / 2 * ||w - reference||^2` over trainable weights to the loss.
#[derive(Clone, Debug)]
pub struct FedProx {
    pub mu: f64,
    /// Usually the global model this round started from.
    pub reference: ModelState,
}

/// Where and how often to write checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointPolicy {
    pub path: PathBuf,
    /// After every this many epochs; the final state is always written.
    pub every_epochs: u32,
    /// Recorded in the checkpoint so evaluation preprocesses alike.
    pub preprocess: Option<Preprocess>,
}

#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Peak learning rate (after warmup).
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub box_weight: f64,
    pub stop: Stop,
    /// Seeds LibTorch (`tch::manual_seed`) and is passed to the batch source.
    pub seed: u64,
    /// Epochs already done (from a checkpoint); the next epoch is numbered `start_epoch`.
    pub start_epoch: u32,
    /// Autocast (float16 with dynamic loss scaling) when the detector is on CUDA.
    pub mixed_precision: bool,
    pub fedprox: Option<FedProx>,
    pub checkpoint: Option<CheckpointPolicy>,
}

impl Default for TrainConfig {
    /// The baseline's recipe: AdamW 2e-3, weight decay 1e-4, 100 warmup steps, box weight 0.1.
    fn default() -> Self {
        Self {
            lr: 2e-3,
            weight_decay: 1e-4,
            warmup_steps: 100,
            box_weight: DEFAULT_BOX_WEIGHT,
            stop: Stop::Epochs(1),
            seed: 0,
            start_epoch: 0,
            mixed_precision: true,
            fedprox: None,
            checkpoint: None,
        }
    }
}

/// Reported after every optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub epoch: u32,
    /// Steps done in this run, this one included.
    pub step: u64,
    /// Planned steps of this run, when the stop condition fixes them.
    pub total_steps: Option<u64>,
    pub loss: f64,
    pub heatmap_loss: f64,
    pub box_loss: f64,
    pub lr: f64,
    /// Images per second since the run started.
    pub images_per_sec: f64,
    pub elapsed: Duration,
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Finished,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Epochs completed in total, a resumed checkpoint's included.
    pub epochs_completed: u32,
    pub steps: u64,
    pub images: u64,
    pub seconds: f64,
    pub images_per_sec: f64,
    /// Mean total loss over the last epoch run (or the steps run, if fewer).
    pub last_loss: f64,
    pub reason: StopReason,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training config: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error("reading training data: {0}")]
    Data(DataError),
    #[error("epoch {epoch} had no batches; the training set is empty or smaller than a batch")]
    EmptyEpoch { epoch: u32 },
    #[error("loss became {loss} at step {step}; training diverged, lower the learning rate")]
    Diverged { step: u64, loss: f64 },
    #[error("FedProx reference does not fit the model: {0}")]
    FedProxReference(String),
    #[error("libtorch: {0}")]
    Tch(#[from] TchError),
}

impl TrainConfig {
    /// Every problem at once.
    pub fn validate(&self) -> Result<(), TrainError> {
        let mut problems = Vec::new();
        if !(self.lr.is_finite() && self.lr > 0.0) {
            problems.push(format!("lr is {}; use a positive number", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            problems.push(format!("weight_decay is {}; use 0 or more", self.weight_decay));
        }
        if !(self.box_weight.is_finite() && self.box_weight >= 0.0) {
            problems.push(format!("box_weight is {}; use 0 or more", self.box_weight));
        }
        match self.stop {
            Stop::Epochs(n) if n <= self.start_epoch => problems.push(format!(
                "stop after {n} epochs but {} are already done",
                self.start_epoch
            )),
            Stop::WallClock(d) if d.is_zero() => problems.push("wall-clock budget is 0".into()),
            Stop::Steps(0) => problems.push("stop after 0 steps".into()),
            _ => {}
        }
        if let Some(p) = &self.fedprox {
            if !(p.mu.is_finite() && p.mu >= 0.0) {
                problems.push(format!("FedProx mu is {}; use 0 or more", p.mu));
            }
        }
        if matches!(&self.checkpoint, Some(c) if c.every_epochs == 0) {
            problems.push("checkpoint every 0 epochs; use 1 or more".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TrainError::Config(problems))
        }
    }
}

/// The learning rate at `step` of a run that is `progress` (0..1) through its cosine.
pub fn learning_rate(base: f64, warmup_steps: u64, step: u64, progress: f64) -> f64 {
    let warm = if warmup_steps == 0 {
        1.0
    } else {
        ((step + 1) as f64 / warmup_steps as f64).min(1.0)
    };
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos()) * warm
}

/// Trains `det` on `data` until `cfg.stop`, calling `progress` after every step; the callback
/// returns `ControlFlow::Break(())` to stop early (the state is still checkpointed).
pub fn train(
    det: &mut Detector,
    data: &mut dyn BatchSource,
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
) -> Result<TrainReport, TrainError> {
    cfg.validate()?;
    tch::manual_seed(cfg.seed as i64);
    let mut run = Run::new(det, data.batches_per_epoch(), cfg)?;
    let mut epoch = cfg.start_epoch;
    let mut reason = StopReason::Finished;
    'epochs: while !run.budget_spent(epoch) {
        let batches = data.epoch(epoch, cfg.seed).map_err(TrainError::Data)?;
        let mut seen = 0usize;
        run.reset_epoch_loss();
        for batch in batches {
            let batch = batch.map_err(TrainError::Data)?;
            seen += 1;
            let report = run.step(det, &batch, epoch)?;
            if progress(&report).is_break() {
                reason = StopReason::Cancelled;
                break 'epochs;
            }
            if run.budget_spent(epoch) {
                break 'epochs;
            }
        }
        if seen == 0 {
            return Err(TrainError::EmptyEpoch { epoch });
        }
        epoch += 1;
        if let Some(policy) = &cfg.checkpoint {
            if (epoch - cfg.start_epoch) % policy.every_epochs == 0 {
                run.checkpoint(det, policy, epoch)?;
            }
        }
    }
    if let Some(policy) = &cfg.checkpoint {
        run.checkpoint(det, policy, epoch)?;
    }
    Ok(run.report(epoch, reason))
}

/// Dynamic loss scaling for float16 autocast (PyTorch's GradScaler defaults).
struct LossScaler {
    scale: f64,
    good_steps: u32,
}

/// The state of one training run.
struct Run<'c> {
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
    fn new(det: &Detector, per_epoch: usize, cfg: &'c TrainConfig) -> Result<Self, TrainError> {
        let vs = det.var_store();
        let opt = nn::AdamW {
            wd: cfg.weight_decay,
            ..Default::default()
        }
        .build(vs, cfg.lr)?;
        let per_epoch = per_epoch as u64;
        let steps_before = u64::from(cfg.start_epoch) * per_epoch;
        let schedule_steps = match cfg.stop {
            Stop::Epochs(n) => Some(u64::from(n) * per_epoch),
            Stop::Steps(n) => Some(n),
            Stop::WallClock(_) => None,
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
            steps_before: if matches!(cfg.stop, Stop::Epochs(_)) {
                steps_before
            } else {
                0
            },
            schedule_steps,
            step: 0,
            images: 0,
            started: Instant::now(),
            epoch_loss: (0.0, 0),
        })
    }

    fn budget_spent(&self, epoch: u32) -> bool {
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

    fn reset_epoch_loss(&mut self) {
        self.epoch_loss = (0.0, 0);
    }

    /// One optimizer step on `batch`.
    fn step(&mut self, det: &Detector, batch: &Batch, epoch: u32) -> Result<Progress, TrainError> {
        let lr = learning_rate(
            self.cfg.lr,
            self.cfg.warmup_steps,
            self.step,
            self.schedule_progress(),
        );
        self.opt.set_lr(lr);
        let images = det.images_tensor(batch)?;
        let targets = TargetMaps::build(&batch.annotations, self.classes, batch.height, batch.width)?
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
            total_steps: self.schedule_steps.map(|t| t.saturating_sub(self.steps_before)),
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

    fn checkpoint(
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

    fn report(&self, epochs_completed: u32, reason: StopReason) -> TrainReport {
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
            problems.push(format!("'{name}' has shape {:?}, the model {:?}", r.shape(), var.size()));
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
