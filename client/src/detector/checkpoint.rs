//! Detector checkpoints: one safetensors file (written atomically) holding every variable and,
//! in its string metadata, what is needed to rebuild the detector: the architecture config
//! (JSON), the class names (JSON), the preprocessing (JSON, optional), the epoch and metrics.
//! Optimizer state is not saved: a resumed run restarts AdamW's moments (and its warmup).

use std::collections::BTreeMap;
use std::path::Path;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::ModelState;
use tch::Device;

use super::{Detector, DetectorError};
use crate::data::Preprocess;

/// Metadata keys of a checkpoint file.
pub const META_FORMAT: &str = "fedinspect.format";
pub const META_ARCH: &str = "fedinspect.arch";
pub const META_CLASSES: &str = "fedinspect.class_names";
pub const META_PREPROCESS: &str = "fedinspect.preprocess";
pub const META_EPOCH: &str = "fedinspect.epoch";
pub const META_METRICS: &str = "fedinspect.metrics";
/// Value of [`META_FORMAT`]; bump it when the layout changes incompatibly.
pub const FORMAT: &str = "fedinspect-detector-checkpoint-v1";

/// What a checkpoint records besides the weights and the architecture.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointInfo {
    /// Epochs completed when it was written.
    pub epoch: u32,
    /// Free-form metrics, e.g. the last loss or an evaluation report.
    pub metrics: serde_json::Value,
    /// The preprocessing the model was trained with, when known.
    pub preprocess: Option<Preprocess>,
}

impl Detector {
    /// Writes every variable plus the metadata to `path`, atomically.
    pub fn save_checkpoint(&self, path: &Path, info: &CheckpointInfo) -> Result<(), DetectorError> {
        let json = |v: Result<String, serde_json::Error>| {
            v.map_err(|e| DetectorError::Checkpoint {
                path: path.display().to_string(),
                reason: e.to_string(),
            })
        };
        let mut meta = BTreeMap::new();
        meta.insert(META_FORMAT.to_string(), FORMAT.to_string());
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
        self.state()?.save_safetensors(path, &meta)?;
        Ok(())
    }

    /// Rebuilds the detector a checkpoint describes, on `device`, with its weights.
    pub fn load_checkpoint(
        path: &Path,
        device: Device,
    ) -> Result<(Detector, CheckpointInfo), DetectorError> {
        let (state, meta) = ModelState::load_safetensors(path)?;
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
        if format != FORMAT {
            return Err(bad(format!(
                "format '{format}', this build reads '{FORMAT}'; convert or retrain it"
            )));
        }
        let arch: ArchConfig =
            serde_json::from_str(get(META_ARCH)?).map_err(|e| bad(format!("architecture: {e}")))?;
        let classes: Vec<String> = serde_json::from_str(get(META_CLASSES)?)
            .map_err(|e| bad(format!("class names: {e}")))?;
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
        let detector = Detector::from_state(arch, classes, &state, device)?;
        Ok((
            detector,
            CheckpointInfo {
                epoch,
                metrics,
                preprocess,
            },
        ))
    }
}
