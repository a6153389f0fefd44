//! The plant's local side of a round, blocking code for a thread of its own: the plant's data
//! ([`PlantData`], loaded and validated once, with a held-out validation split chosen by a
//! hash of each item id), and one round's job ([`run`]): build the detector from the base,
//! train, compute the delta, add the error-feedback residual, encode it with the round's codec
//! and keep what the codec lost as the next residual.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::{self, Codec, DeltaError};
use fedinspect_common::ModelState;
use tch::Device;

use crate::config::{DataConfig, DataSource, ModelConfig, TrainingConfig};
use crate::data::coco::{self, CocoOptions};
use crate::data::deeppcb::{self, DeepPcbOptions, Split};
use crate::data::loader::LoaderError;
use crate::data::{
    validate, Augment, Channels, Dataset, Loader, LoaderOptions, Preprocess, ValidateOptions,
};
use crate::detector::train::{
    self, AdamWState, Stop, StopReason, TrainConfig, TrainError, TrainReport,
};
use crate::detector::{DecodeParams, Detector, DetectorError};
use crate::eval::{self, EvalError};

/// Score threshold of the before/after evaluation (as the quickstart's).
const EVAL_SCORE_THRESHOLD: f64 = 0.3;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot load the plant's data: {0}")]
    Data(String),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("the base model does not fit this plant's detector: {0}")]
    Detector(#[from] DetectorError),
    #[error("training failed: {0}")]
    Train(#[from] TrainError),
    #[error("the update cannot be encoded: {0}")]
    Delta(#[from] DeltaError),
    #[error("local evaluation failed: {0}")]
    Eval(#[from] EvalError),
}

/// The plant's training data, and loaders over it by batch size.
pub struct PlantData {
    pub class_names: Vec<String>,
    pub train: Dataset,
    /// Held out of training to measure mAP before and after each round.
    pub holdout: Option<Dataset>,
    pub preprocess: Preprocess,
    augment: Augment,
    seed: u64,
    loader: Mutex<Option<(usize, Loader)>>,
    holdout_loader: Option<Loader>,
}

/// One round's work.
pub struct Job {
    pub arch: ArchConfig,
    pub class_names: Vec<String>,
    pub device: Device,
    pub base: ModelState,
    /// What earlier rounds' codecs lost; added to this round's delta.
    pub residual: Option<ModelState>,
    pub loader: Loader,
    pub holdout: Option<Loader>,
    pub train: TrainConfig,
    pub codec: Codec,
    /// Set to stop at the next step boundary (shutdown); the job then reports `Cancelled`.
    pub cancel: Arc<AtomicBool>,
    /// Training stops at the first step boundary after this instant (the round's deadline less
    /// the upload margin) and the update is sent as trained so far.
    pub stop_at: Option<Instant>,
}

/// A trained, encoded update.
pub struct Trained {
    pub payload: Vec<u8>,
    /// SHA-256 of `payload`, from the encoding pass.
    pub payload_sha256: [u8; 32],
    /// The residual once this payload is delivered.
    pub residual: ModelState,
    pub metrics: BTreeMap<String, f64>,
    pub report: TrainReport,
    /// Activation ranges of the trained model on this plant's images (INT8 calibration);
    /// empty when they could not be measured.
    pub calibration: fedinspect_common::onnx::ActivationRanges,
}

pub enum Outcome {
    Trained(Box<Trained>),
    Cancelled,
}

impl PlantData {
    /// Loads and validates the configured dataset and splits off the validation items.
    pub fn load(
        cfg: &DataConfig,
        model: &ModelConfig,
        training: &TrainingConfig,
    ) -> Result<Self, LocalError> {
        let data = |e: String| LocalError::Data(e);
        let loaded = match &cfg.source {
            DataSource::DeepPcb { root, .. } => deeppcb::load(
                root,
                Split::TrainVal,
                &DeepPcbOptions {
                    template: cfg.channels == Channels::GrayTemplate,
                },
            )
            .map_err(|e| data(e.to_string()))?,
            DataSource::Coco { json, images } => coco::load(
                json,
                &CocoOptions {
                    image_root: images.clone(),
                    group: None,
                },
            )
            .map_err(|e| data(e.to_string()))?,
        };
        let checked = validate(
            loaded,
            &ValidateOptions {
                channels: cfg.channels,
                decode: false,
                on_invalid: cfg.on_invalid,
            },
        )
        .map_err(|e| data(e.to_string()))?;
        if !checked.report.is_clean() {
            tracing::warn!(report = %checked.report, "the dataset has problems");
        }
        let mut dataset = checked.dataset;
        if let DataSource::DeepPcb { groups, .. } = &cfg.source {
            if !groups.is_empty() {
                let wanted: Vec<&str> = groups.iter().map(String::as_str).collect();
                let available = dataset.groups();
                dataset = dataset.with_groups(&wanted);
                if dataset.is_empty() {
                    return Err(data(format!(
                        "no training item is in the groups {groups:?}; trainval.txt has {available:?}"
                    )));
                }
            }
        }
        let (train, holdout) = split_holdout(dataset, cfg.validation_fraction);
        let preprocess = Preprocess {
            input_size: model.input_size,
            channels: cfg.channels,
            clahe: None,
        };
        let holdout_loader = holdout
            .as_ref()
            .map(|h| {
                Loader::new(
                    h.clone(),
                    preprocess.clone(),
                    Augment::none(model.input_size),
                    LoaderOptions {
                        batch_size: 4,
                        ..LoaderOptions::default()
                    },
                )
            })
            .transpose()?;
        Ok(Self {
            class_names: train.class_names.clone(),
            train,
            holdout,
            preprocess,
            augment: Augment {
                crop_size: training.crop_size,
                ..Augment::default()
            },
            seed: training.seed,
            loader: Mutex::new(None),
            holdout_loader,
        })
    }

    /// Training images.
    pub fn num_samples(&self) -> u64 {
        self.train.len() as u64
    }

    /// Training images showing at least one defect of each class, by class name.
    pub fn samples_per_class(&self) -> BTreeMap<String, u64> {
        let mut counts: BTreeMap<String, u64> =
            self.class_names.iter().map(|c| (c.clone(), 0)).collect();
        for item in &self.train.items {
            let mut classes: Vec<u32> = item.annotations.iter().map(|a| a.class).collect();
            classes.sort_unstable();
            classes.dedup();
            for c in classes {
                if let Some(name) = self.class_names.get(c as usize) {
                    *counts.entry(name.clone()).or_default() += 1;
                }
            }
        }
        counts
    }

    /// A training loader with batches of `batch_size` (at most the training set), reused
    /// while the batch size stays the same so decoded images stay cached.
    pub fn train_loader(&self, batch_size: usize) -> Result<Loader, LocalError> {
        let batch_size = batch_size.clamp(1, self.train.len().max(1));
        let mut slot = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((size, loader)) = slot.as_ref() {
            if *size == batch_size {
                return Ok(loader.clone());
            }
        }
        let loader = Loader::new(
            self.train.clone(),
            self.preprocess.clone(),
            self.augment.clone(),
            LoaderOptions {
                batch_size,
                seed: self.seed,
                ..LoaderOptions::default()
            },
        )?;
        *slot = Some((batch_size, loader.clone()));
        Ok(loader)
    }

    pub fn holdout_loader(&self) -> Option<Loader> {
        self.holdout_loader.clone()
    }
}

/// Runs one round's job: see the module docs.
pub fn run(job: Job) -> Result<Outcome, LocalError> {
    let mut det = Detector::from_state(
        job.arch.clone(),
        job.class_names.clone(),
        &job.base,
        job.device,
    )?;
    let mut metrics = BTreeMap::new();
    let mut eval_seconds = 0.0;
    if let Some(h) = &job.holdout {
        let started = Instant::now();
        metrics.insert("local_map50_before".to_string(), map50(&det, h)?);
        eval_seconds += started.elapsed().as_secs_f64();
    }
    let cancel = job.cancel.clone();
    let stop_at = job.stop_at;
    let mut deadline_hit = false;
    let report = train::train(&mut det, &mut job.loader.clone(), &job.train, &mut |p| {
        if p.step % 10 == 0 || Some(p.step) == p.total_steps {
            tracing::debug!(step = p.step, loss = p.loss, "training");
        }
        if cancel.load(Ordering::Relaxed) {
            return ControlFlow::Break(());
        }
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            deadline_hit = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    if report.reason == StopReason::Cancelled && !deadline_hit {
        return Ok(Outcome::Cancelled);
    }
    if deadline_hit {
        tracing::warn!(
            steps = report.steps,
            "training stopped early to deliver the update before the round's deadline"
        );
    }
    if let Some(h) = &job.holdout {
        let started = Instant::now();
        metrics.insert("local_map50_after".to_string(), map50(&det, h)?);
        eval_seconds += started.elapsed().as_secs_f64();
    }
    metrics.insert("eval_seconds".to_string(), eval_seconds);
    metrics.insert("train_loss".to_string(), report.last_loss);
    metrics.insert("train_seconds".to_string(), report.seconds);
    metrics.insert("train_steps".to_string(), report.steps as f64);
    metrics.insert("train_images".to_string(), report.images as f64);
    metrics.retain(|_, v| v.is_finite());

    let local = det.state()?;
    let calibrating = Instant::now();
    let calibration = super::calibration::measure(
        &det,
        &local,
        &job.loader,
        super::calibration::CALIBRATION_BATCHES,
    )
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot measure calibration ranges; none are sent this round");
        Default::default()
    });
    metrics.insert(
        "calibration_seconds".to_string(),
        calibrating.elapsed().as_secs_f64(),
    );
    let encoding = Instant::now();
    let mut to_send = delta::compute_delta(&local, &job.base)?;
    if let Some(residual) = &job.residual {
        to_send = delta::apply_delta(&to_send, residual)?;
    }
    let received = delta::roundtrip(job.codec, &to_send)?;
    let residual = delta::compute_delta(&to_send, &received)?;
    let mut payload = Vec::new();
    let (_, payload_sha256) = delta::encode_with_sha256(&to_send, job.codec, &mut payload)?;
    metrics.insert(
        "encode_seconds".to_string(),
        encoding.elapsed().as_secs_f64(),
    );
    Ok(Outcome::Trained(Box::new(Trained {
        payload,
        payload_sha256,
        residual,
        metrics,
        report,
        calibration,
    })))
}

/// The training config of a round: the plan's epochs and learning rate, FedProx towards the
/// base when the plan asks for it, and the warmup whenever AdamW's moments start afresh: with
/// zero moments its first steps move every weight by about the learning rate whatever its
/// gradient (the warmup is capped at a third of the round). A round that continues a
/// learning-rate cycle (`plan.lr_span`) covers its stretch of the cycle's cosine and continues
/// `moments`, the moments this plant's previous round ended with, when it has them.
pub fn train_config(
    cfg: &TrainingConfig,
    plan: &crate::agent::types::TrainPlan,
    round: u64,
    base: &ModelState,
    moments: Option<AdamWState>,
) -> TrainConfig {
    TrainConfig {
        lr_span: plan.lr_span,
        moments: moments.filter(|_| plan.lr_span.is_some_and(|s| s.continues())),
        lr: plan.learning_rate,
        warmup_steps: cfg.warmup_steps,
        stop: Stop::Epochs(plan.local_epochs),
        seed: cfg.seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        mixed_precision: cfg.mixed_precision,
        fedprox: (plan.fedprox_mu > 0.0).then(|| train::FedProx {
            mu: plan.fedprox_mu,
            reference: base.clone(),
        }),
        ..TrainConfig::default()
    }
}

/// mAP at IoU 0.5 of `det` on the held-out items.
fn map50(det: &Detector, holdout: &Loader) -> Result<f64, LocalError> {
    let started = Instant::now();
    let mut by_id = Vec::new();
    for batch in holdout.eval_batches() {
        let dets = det.detect(&batch, &DecodeParams::default())?;
        by_id.extend(batch.ids.iter().cloned().zip(dets));
    }
    let data = holdout.dataset();
    let dets = eval::align_detections(data, by_id);
    let report = eval::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        EVAL_SCORE_THRESHOLD,
        started.elapsed().as_secs_f64(),
    )?;
    Ok(report.map_50)
}

/// Splits off the items whose id hashes below `fraction`: the same items on every start,
/// whatever the order of the split file. Keeps at least one training item.
fn split_holdout(data: Dataset, fraction: f64) -> (Dataset, Option<Dataset>) {
    if fraction <= 0.0 {
        return (data, None);
    }
    let (held, train): (Vec<_>, Vec<_>) = data
        .items
        .into_iter()
        .partition(|item| id_fraction(&item.id) < fraction);
    let make = |items| Dataset {
        class_names: data.class_names.clone(),
        items,
    };
    match (held.is_empty(), train.is_empty()) {
        (false, false) => (make(train), Some(make(held))),
        _ => {
            let mut all = train;
            all.extend(held);
            (make(all), None)
        }
    }
}

/// A stable number in [0, 1) from an item id.
fn id_fraction(id: &str) -> f64 {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}
