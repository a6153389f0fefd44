//! Detector checkpoints: one safetensors file (written atomically) holding every variable and,
//! in its string metadata, what is needed to rebuild the detector: the architecture config
//! (JSON), the class names (JSON), the preprocessing (JSON, optional), the epoch and metrics.
//!
//! Checkpoints written by training (format v2) also carry what resuming needs: AdamW's moments
//! as extra float32 tensors under the reserved prefix `optim.` (`optim.exp_avg.<variable>` and
//! `optim.exp_avg_sq.<variable>` for every trainable variable), and two JSON metadata entries,
//! [`META_TRAINING`] (the schedule position, see [`TrainingPosition`]) and [`META_OPTIMIZER`]
//! (algorithm, step count, hyperparameters). The model's own tensors keep their names, so the
//! file minus the `optim.` tensors is a plain model state. A checkpoint without training state
//! is written as v1, the layout that predates it; both formats load.

use std::collections::BTreeMap;
use std::path::Path;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::ModelState;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::train::{AdamWState, TrainingPosition, TrainingState, BETA1, BETA2, EPS};
use super::{Detector, DetectorError};
use crate::data::Preprocess;

/// Metadata keys of a checkpoint file.
pub const META_FORMAT: &str = "fedinspect.format";
pub const META_ARCH: &str = "fedinspect.arch";
pub const META_CLASSES: &str = "fedinspect.class_names";
pub const META_PREPROCESS: &str = "fedinspect.preprocess";
pub const META_EPOCH: &str = "fedinspect.epoch";
pub const META_METRICS: &str = "fedinspect.metrics";
/// Optional: the caller's recipe as JSON ([`CheckpointInfo::recipe`]).
pub const META_RECIPE: &str = "fedinspect.recipe";
/// v2 only: the [`TrainingPosition`] as JSON.
pub const META_TRAINING: &str = "fedinspect.training";
/// v2 only: `{"algorithm": "adamw", "step": .., "beta1": .., "beta2": .., "eps": ..}`.
pub const META_OPTIMIZER: &str = "fedinspect.optimizer";
/// Tensor name prefixes of the optimizer state; no model variable starts with
/// [`OPTIM_PREFIX`].
pub const OPTIM_PREFIX: &str = "optim.";
pub const OPTIM_EXP_AVG: &str = "optim.exp_avg.";
pub const OPTIM_EXP_AVG_SQ: &str = "optim.exp_avg_sq.";
/// Value of [`META_FORMAT`] for weights and metadata only.
pub const FORMAT_V1: &str = "fedinspect-detector-checkpoint-v1";
/// Value of [`META_FORMAT`] when the file also carries training state.
pub const FORMAT: &str = "fedinspect-detector-checkpoint-v2";

/// What a checkpoint records besides the weights and the architecture.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointInfo {
    /// Epochs completed when it was written.
    pub epoch: u32,
    /// Free-form metrics, e.g. the last loss or an evaluation report.
    pub metrics: serde_json::Value,
    /// The preprocessing the model was trained with, when known.
    pub preprocess: Option<Preprocess>,
    /// How the caller set training up beyond [`TrainConfig`](super::TrainConfig) (e.g. the
    /// CLI's batch size, crop and seed), so that a resumed run can repeat it.
    pub recipe: Option<serde_json::Value>,
    /// What resuming needs; `None` in checkpoints saved outside training and in v1 files.
    pub training: Option<TrainingState>,
}

/// The optimizer entry of the metadata.
#[derive(Debug, Serialize, Deserialize)]
struct OptimizerMeta {
    algorithm: String,
    step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Detector {
    /// Writes every variable plus the metadata (and the training state, when `info` has one)
    /// to `path`, atomically.
    pub fn save_checkpoint(&self, path: &Path, info: &CheckpointInfo) -> Result<(), DetectorError> {
        let bad = |reason: String| DetectorError::Checkpoint {
            path: path.display().to_string(),
            reason,
        };
        let json = |v: Result<String, serde_json::Error>| v.map_err(|e| bad(e.to_string()));
        let mut state = self.state()?;
        let mut meta = BTreeMap::new();
        meta.insert(
            META_ARCH.to_string(),
            json(serde_json::to_string(self.arch()))?,
        );
        meta.insert(
            META_CLASSES.to_string(),
            json(serde_json::to_string(self.class_names()))?,
        );
        if let Some(pre) = &info.preprocess {
            meta.insert(
                META_PREPROCESS.to_string(),
                json(serde_json::to_string(pre))?,
            );
        }
        meta.insert(META_EPOCH.to_string(), info.epoch.to_string());
        meta.insert(
            META_METRICS.to_string(),
            json(serde_json::to_string(&info.metrics))?,
        );
        if let Some(recipe) = &info.recipe {
            meta.insert(
                META_RECIPE.to_string(),
                json(serde_json::to_string(recipe))?,
            );
        }
        let format = match &info.training {
            None => FORMAT_V1,
            Some(training) => {
                if let Some(name) = state.names().find(|n| n.starts_with(OPTIM_PREFIX)) {
                    return Err(bad(format!(
                        "model variable '{name}' uses the prefix reserved for optimizer state"
                    )));
                }
                let opt = &training.optimizer;
                let problems = opt.problems(&self.trainable_shapes(), &file_name);
                if !problems.is_empty() {
                    return Err(bad(problems.join("; ")));
                }
                for (prefix, moments) in [
                    (OPTIM_EXP_AVG, &opt.exp_avg),
                    (OPTIM_EXP_AVG_SQ, &opt.exp_avg_sq),
                ] {
                    for (name, t) in moments.iter() {
                        state.insert(format!("{prefix}{name}"), t.clone())?;
                    }
                }
                meta.insert(
                    META_TRAINING.to_string(),
                    json(serde_json::to_string(&training.position))?,
                );
                let optimizer = OptimizerMeta {
                    algorithm: "adamw".into(),
                    step: opt.step,
                    beta1: BETA1,
                    beta2: BETA2,
                    eps: EPS,
                };
                meta.insert(
                    META_OPTIMIZER.to_string(),
                    json(serde_json::to_string(&optimizer))?,
                );
                FORMAT
            }
        };
        meta.insert(META_FORMAT.to_string(), format.to_string());
        state.save_safetensors(path, &meta)?;
        Ok(())
    }

    /// Rebuilds the detector a checkpoint describes, on `device`, with its weights, and reads
    /// its training state (checked against the model: every moment present, shapes equal).
    pub fn load_checkpoint(
        path: &Path,
        device: Device,
    ) -> Result<(Detector, CheckpointInfo), DetectorError> {
        load(path, device, true)
    }

    /// [`Detector::load_checkpoint`] for inference: the training state is neither read nor
    /// checked (`training` is `None`), so damaged optimizer state does not stand in the way of
    /// intact weights.
    pub fn load_checkpoint_weights(
        path: &Path,
        device: Device,
    ) -> Result<(Detector, CheckpointInfo), DetectorError> {
        load(path, device, false)
    }

    /// Name and shape of every trainable variable, in name order.
    fn trainable_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.trainable_variables()
            .into_iter()
            .map(|(n, v)| (n, v.size()))
            .collect()
    }
}

fn load(
    path: &Path,
    device: Device,
    with_training: bool,
) -> Result<(Detector, CheckpointInfo), DetectorError> {
    let (mut state, meta) = ModelState::load_safetensors(path)?;
    let bad = |reason: String| DetectorError::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let get = |key: &str| {
        meta.get(key).ok_or_else(|| {
            bad(format!(
                "metadata lacks '{key}'; not a fedinspect checkpoint"
            ))
        })
    };
    let format = get(META_FORMAT)?;
    if format != FORMAT && format != FORMAT_V1 {
        return Err(bad(format!(
            "format '{format}', this build reads '{FORMAT_V1}' and '{FORMAT}'; convert or retrain it"
        )));
    }
    let arch: ArchConfig =
        serde_json::from_str(get(META_ARCH)?).map_err(|e| bad(format!("architecture: {e}")))?;
    let classes: Vec<String> =
        serde_json::from_str(get(META_CLASSES)?).map_err(|e| bad(format!("class names: {e}")))?;
    let preprocess = meta
        .get(META_PREPROCESS)
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| bad(format!("preprocess: {e}")))?;
    let epoch = get(META_EPOCH)?
        .parse()
        .map_err(|e| bad(format!("epoch: {e}")))?;
    let metrics =
        serde_json::from_str(get(META_METRICS)?).map_err(|e| bad(format!("metrics: {e}")))?;
    let recipe = meta
        .get(META_RECIPE)
        .map(|s| serde_json::from_str(s))
        .transpose()
        .map_err(|e| bad(format!("recipe: {e}")))?;
    let moments = split_optimizer_tensors(&mut state)?;
    let detector = Detector::from_state(arch, classes, &state, device)?;
    let training = if !with_training {
        None
    } else if format == FORMAT {
        Some(read_training(&detector, &meta, moments).map_err(bad)?)
    } else if let Some(name) = moments.names().next() {
        return Err(bad(format!(
            "format '{FORMAT_V1}' but it holds optimizer tensor '{OPTIM_PREFIX}{name}'; the file was modified after it was written, use another checkpoint"
        )));
    } else {
        None
    };
    Ok((
        detector,
        CheckpointInfo {
            epoch,
            metrics,
            preprocess,
            recipe,
            training,
        },
    ))
}

/// The name a moment has in the file, e.g. `optim.exp_avg.head.hm.bias`.
fn file_name(moment: &str, variable: &str) -> String {
    format!("optimizer tensor '{OPTIM_PREFIX}{moment}.{variable}'")
}

/// Moves the `optim.` tensors out of `state` into a state of their own, prefix removed.
fn split_optimizer_tensors(state: &mut ModelState) -> Result<ModelState, DetectorError> {
    let mut model = ModelState::new();
    let mut optim = ModelState::new();
    for (name, t) in std::mem::take(state).iter() {
        match name.strip_prefix(OPTIM_PREFIX) {
            Some(rest) => optim.insert(rest, t.clone())?,
            None => model.insert(name, t.clone())?,
        }
    }
    *state = model;
    Ok(optim)
}

/// The v2 training state: the position and optimizer metadata, and the moments (`optim`
/// tensors without their prefix), checked against `det`'s trainable variables.
fn read_training(
    det: &Detector,
    meta: &BTreeMap<String, String>,
    optim: ModelState,
) -> Result<TrainingState, String> {
    let get = |key: &str| {
        meta.get(key).ok_or_else(|| {
            format!("format '{FORMAT}' but the metadata lacks '{key}'; the file was modified after it was written, use another checkpoint")
        })
    };
    let position: TrainingPosition = serde_json::from_str(get(META_TRAINING)?)
        .map_err(|e| format!("training position ({META_TRAINING}): {e}"))?;
    if !(position.seconds_done.is_finite() && position.seconds_done >= 0.0) {
        return Err(format!(
            "training position: seconds_done is {}",
            position.seconds_done
        ));
    }
    if let Some(s) = position.loss_scale {
        if !(s.scale.is_finite() && s.scale > 0.0) {
            return Err(format!("training position: loss scale is {}", s.scale));
        }
    }
    let optimizer: OptimizerMeta = serde_json::from_str(get(META_OPTIMIZER)?)
        .map_err(|e| format!("optimizer ({META_OPTIMIZER}): {e}"))?;
    if optimizer.algorithm != "adamw" {
        return Err(format!(
            "optimizer '{}', this build resumes 'adamw' only",
            optimizer.algorithm
        ));
    }
    let mut exp_avg = ModelState::new();
    let mut exp_avg_sq = ModelState::new();
    for (name, t) in optim.iter() {
        let (moments, variable) = if let Some(v) = name.strip_prefix("exp_avg.") {
            (&mut exp_avg, v)
        } else if let Some(v) = name.strip_prefix("exp_avg_sq.") {
            (&mut exp_avg_sq, v)
        } else {
            return Err(format!(
                "unknown optimizer tensor '{OPTIM_PREFIX}{name}'; AdamW state has {OPTIM_EXP_AVG}* and {OPTIM_EXP_AVG_SQ}* only"
            ));
        };
        moments
            .insert(variable, t.clone())
            .map_err(|e| e.to_string())?;
    }
    let state = AdamWState {
        step: optimizer.step,
        exp_avg,
        exp_avg_sq,
    };
    let problems = state.problems(&det.trainable_shapes(), &file_name);
    if !problems.is_empty() {
        return Err(format!(
            "{}; the optimizer state is damaged: resume from another checkpoint (`client eval` and `client detect` still read its weights)",
            problems.join("; ")
        ));
    }
    Ok(TrainingState {
        position,
        optimizer: state,
    })
}
