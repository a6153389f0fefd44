//! Local training: a blocking, synchronous loop (the client agent runs it on its own thread)
//! with AdamW, linear warmup then cosine decay, an optional FedProx proximal term, mixed
//! precision on CUDA, progress through a callback that may stop the run, and checkpoints.
//!
//! On glibc, training keeps freed memory in the process instead of returning it after every
//! step (`train/malloc.rs` says why and what it costs).
//!
//! Resuming: every checkpoint written by [`train`] carries a [`TrainingState`] (AdamW's
//! moments and step count, the schedule position, the batch reached inside the epoch, the loss
//! scale). Load it with [`Detector::load_checkpoint`] and pass
//! [`Resume::from_checkpoint`] as [`TrainConfig::resume`]: with the same data and config and
//! the stop condition that completes the plan ([`Resume::remaining`]), N steps, a checkpoint
//! and M resumed steps give the weights of N + M steps in one run (bit for bit on the CPU,
//! `tests/detector_train.rs`; `client train --resume` does this from the command line). LibTorch's generator is reseeded at
//! every start; the detector draws nothing from it while training, and the data side derives
//! every draw from `(seed, epoch)`, so nothing random is lost at a checkpoint.
//!
//! AdamW is ours (`train/adamw.rs`), not tch's, because tch keeps an optimizer's moments inside
//! LibTorch where they cannot be saved.

use std::error::Error;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use fedinspect_common::lr_cycle::LrSpan;
use fedinspect_common::ModelState;
use tch::TchError;

use super::loss::DEFAULT_BOX_WEIGHT;
use super::{Detector, DetectorError};
use crate::data::{Batch, Loader, Preprocess};

mod adamw;
mod checkpoint_write;
mod malloc;
mod resume;
mod run;

pub use adamw::{BETA1, BETA2, EPS};
pub use checkpoint_write::FinalWrite;
pub use resume::{AdamWState, LossScale, Plan, Resume, TrainingPosition, TrainingState};
use run::Run;

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

/// The data side's prefetching loader: shuffled, augmented epochs from `(seed, epoch)`.
impl BatchSource for Loader {
    fn batches_per_epoch(&self) -> usize {
        Loader::batches_per_epoch(self)
    }

    fn epoch(
        &mut self,
        epoch: u32,
        seed: u64,
    ) -> Result<Box<dyn Iterator<Item = Result<Batch, DataError>> + '_>, DataError> {
        let batches = self.train_epoch_with_seed(seed, u64::from(epoch));
        Ok(Box::new(batches.map(Ok)))
    }
}

/// When training stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    /// After this many epochs in total (a resumed run counts the checkpoint's epochs).
    Epochs(u32),
    /// After this much wall-clock time in this run; the cosine follows elapsed time, like the
    /// baseline (a resumed run's cosine spans its checkpoint's seconds plus this).
    WallClock(Duration),
    /// After this many optimizer steps in this run (a resumed run's cosine spans its
    /// checkpoint's steps plus these).
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
    /// Recorded in the checkpoint as [`CheckpointInfo::recipe`](super::CheckpointInfo::recipe).
    pub recipe: Option<serde_json::Value>,
    /// How long the final write keeps trying when the disk refuses it (epoch checkpoints that
    /// fail are logged and skipped).
    pub final_write: FinalWrite,
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
    /// Picks up a checkpointed run ([`Resume::from_checkpoint`]); `None` starts afresh.
    pub resume: Option<Resume>,
    /// Autocast (float16 with dynamic loss scaling) when the detector is on CUDA.
    pub mixed_precision: bool,
    pub fedprox: Option<FedProx>,
    pub checkpoint: Option<CheckpointPolicy>,
    /// The stretch of a longer cosine this run covers (a round of a learning-rate cycle,
    /// `fedinspect_common::lr_cycle`); `None`: the whole cosine.
    pub lr_span: Option<LrSpan>,
    /// AdamW moments to continue (the previous round's of the same cycle); the warmup counts
    /// their steps, so it does not run again. A resumed checkpoint's moments take precedence.
    pub moments: Option<AdamWState>,
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
            resume: None,
            mixed_precision: true,
            fedprox: None,
            checkpoint: None,
            lr_span: None,
            moments: None,
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
    /// AdamW's moments at the end, for the next round of a learning-rate cycle; `None` when
    /// they could not be copied off the device (logged).
    pub moments: Option<AdamWState>,
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
    #[error("cannot resume: {0}; resume with the model the checkpoint was written for")]
    Resume(String),
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
            problems.push(format!(
                "weight_decay is {}; use 0 or more",
                self.weight_decay
            ));
        }
        if !(self.box_weight.is_finite() && self.box_weight >= 0.0) {
            problems.push(format!("box_weight is {}; use 0 or more", self.box_weight));
        }
        let done = self.resume.as_ref().map_or(0, |r| r.epoch);
        match self.stop {
            Stop::Epochs(n) if n <= done => {
                problems.push(format!("stop after {n} epochs but {done} are already done"))
            }
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
    malloc::keep_freed_memory();
    tch::manual_seed(cfg.seed as i64);
    let mut run = Run::new(det, data.batches_per_epoch(), cfg)?;
    let first_epoch = cfg.resume.as_ref().map_or(0, |r| r.epoch);
    // Batches of the first epoch that the resumed run trained already.
    let mut skip = cfg
        .resume
        .as_ref()
        .and_then(|r| r.training.as_ref())
        .map_or(0, |t| t.position.batches_into_epoch);
    let mut epoch = first_epoch;
    let mut reason = StopReason::Finished;
    'epochs: while !run.budget_spent(epoch) {
        let batches = data.epoch(epoch, cfg.seed).map_err(TrainError::Data)?;
        let mut seen = 0u64;
        run.start_epoch(skip);
        for batch in batches {
            let batch = batch.map_err(TrainError::Data)?;
            seen += 1;
            if seen <= skip {
                continue;
            }
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
        skip = 0;
        epoch += 1;
        run.end_epoch();
        if let Some(policy) = &cfg.checkpoint {
            if (epoch - first_epoch) % policy.every_epochs == 0 {
                checkpoint_write::epoch_checkpoint(&run, det, policy, epoch)?;
            }
        }
    }
    if let Some(policy) = &cfg.checkpoint {
        checkpoint_write::final_checkpoint(&run, det, policy, epoch)?;
    }
    Ok(run.report(epoch, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_linearly_then_follows_the_cosine() {
        let lr = |step, progress| learning_rate(1.0, 10, step, progress);
        assert!((lr(0, 0.0) - 0.1).abs() < 1e-12);
        assert!((lr(4, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr(9, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr(50, 0.5) - 0.5).abs() < 1e-12);
        assert!(lr(100, 1.0).abs() < 1e-12);
        assert_eq!(learning_rate(2.0, 0, 0, 0.0), 2.0);
    }

    #[test]
    fn config_reports_every_problem() {
        let cfg = TrainConfig {
            lr: 0.0,
            weight_decay: -1.0,
            stop: Stop::Epochs(2),
            resume: Some(Resume {
                epoch: 3,
                training: None,
            }),
            fedprox: Some(FedProx {
                mu: f64::NAN,
                reference: ModelState::new(),
            }),
            ..TrainConfig::default()
        };
        match cfg.validate() {
            Err(TrainError::Config(p)) => assert_eq!(p.len(), 4, "{p:?}"),
            other => panic!("expected config errors, got {other:?}"),
        }
    }
}
