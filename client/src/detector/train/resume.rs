//! What a checkpoint carries so that training resumes exactly where it stopped (AdamW's
//! moments and step count, the schedule position, the batch reached inside the epoch, the plan
//! the cosine was laid out for, the loss scale), and [`Resume`], how a run is told to pick up
//! from a checkpoint. Plain host-side data: `checkpoint.rs` stores it, `run.rs` uses it.

use fedinspect_common::ModelState;
use serde::{Deserialize, Serialize};

use super::Stop;
use crate::detector::CheckpointInfo;

/// AdamW's state in host memory, keyed by trainable variable name.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// Updates applied since the moments started; bias correction and the warmup count them.
    pub step: u64,
    /// First moments (running mean of the gradients).
    pub exp_avg: ModelState,
    /// Second moments (running mean of the squared gradients).
    pub exp_avg_sq: ModelState,
}

impl AdamWState {
    /// What keeps these moments from fitting `trainable` (name and shape of every trainable
    /// variable): each moment missing, unexpected or of another shape, named by
    /// `label(moment, variable)` where `moment` is `exp_avg` or `exp_avg_sq`.
    pub fn problems(
        &self,
        trainable: &[(String, Vec<i64>)],
        label: &dyn Fn(&str, &str) -> String,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for (moment, tensors) in [("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
            for (name, want) in trainable {
                match tensors.get(name) {
                    None => problems.push(format!("{} is missing", label(moment, name))),
                    Some(t) => {
                        let got: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
                        if &got != want {
                            problems.push(format!(
                                "{} has shape {got:?}, its variable {want:?}",
                                label(moment, name)
                            ));
                        }
                    }
                }
            }
            for name in tensors.names() {
                if !trainable.iter().any(|(n, _)| n == name) {
                    problems.push(format!(
                        "{} belongs to no trainable variable of the model",
                        label(moment, name)
                    ));
                }
            }
        }
        problems
    }
}

/// How far the run that wrote a checkpoint had come.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPosition {
    /// Optimizer steps since training began, over every resumed run (mixed-precision steps
    /// skipped for overflow included): the position in the cosine.
    pub steps_done: u64,
    /// Training wall-clock seconds over every run: the position of a wall-clock cosine.
    pub seconds_done: f64,
    /// Batches of epoch [`CheckpointInfo::epoch`] (0-based) already trained; a resumed run
    /// skips them, so a run stopped mid-epoch continues with the next batch.
    pub batches_into_epoch: u64,
    /// What the learning-rate cosine was laid out for.
    pub plan: Plan,
    /// Dynamic loss scaling (mixed precision on CUDA); `None` when training ran without it.
    pub loss_scale: Option<LossScale>,
}

/// The end a run's cosine decays towards, in totals over every run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    Epochs(u32),
    Steps(u64),
    Seconds(f64),
}

/// The float16 loss scale and the overflow-free steps since it last changed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: u32,
}

/// Everything training needs to continue a run; written into every checkpoint by `train`.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingState {
    pub position: TrainingPosition,
    pub optimizer: AdamWState,
}

/// Where a run picks up ([`super::TrainConfig::resume`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Resume {
    /// Epochs completed: this run's first epoch is numbered `epoch`.
    pub epoch: u32,
    /// The interrupted run's state. `None` for a checkpoint without it (written before
    /// checkpoints carried optimizer state, or saved outside training): the weights and the
    /// epoch resume, the cosine continues from `epoch` whole epochs, and AdamW's moments and
    /// the warmup restart from zero.
    pub training: Option<TrainingState>,
}

impl Resume {
    /// Picks up where the checkpoint described by `info` left off.
    pub fn from_checkpoint(info: &CheckpointInfo) -> Self {
        Self {
            epoch: info.epoch,
            training: info.training.clone(),
        }
    }

    /// The stop condition that completes the interrupted run's plan; `None` when the plan is
    /// already complete or unknown (a checkpoint without training state).
    pub fn remaining(&self) -> Option<Stop> {
        let pos = &self.training.as_ref()?.position;
        match pos.plan {
            Plan::Epochs(n) => (self.epoch < n).then_some(Stop::Epochs(n)),
            Plan::Steps(total) => {
                (pos.steps_done < total).then(|| Stop::Steps(total - pos.steps_done))
            }
            Plan::Seconds(total) => (pos.seconds_done < total).then(|| {
                Stop::WallClock(std::time::Duration::from_secs_f64(total - pos.seconds_done))
            }),
        }
    }
}
