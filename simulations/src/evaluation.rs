//! The held-out test split and the evaluation of a global model on it with the client's own
//! detector and evaluation code (map_33: the DeepPCB protocol, IoU > 0.33; map_50). The split
//! is a DeepPCB-layout folder's `test.txt` or a COCO folder's `test.json` ([`coco_layout`]),
//! each read by the client's own loader.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::data::{
    validate, Augment, Channels, Dataset, Item, Loader, LoaderOptions, OnInvalid, Preprocess,
    ValidateOptions,
};
use fedinspect_client::detector::{DecodeParams, Detector};
use fedinspect_client::eval;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::detection::Detection;
use fedinspect_common::ModelState;
use serde::Serialize;
use tch::Device;

use crate::coco_layout;
use crate::interrupt::Interrupt;

/// Score threshold of the precision/recall figures of the report (mAP uses every score).
const SCORE_THRESHOLD: f64 = 0.3;

/// The test split of a DeepPCB-layout or COCO folder, decoded once and kept for every
/// evaluation.
pub struct TestSet {
    loader: Loader,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Scores {
    pub map_33: f64,
    pub map_50: f64,
    pub map_50_95: f64,
    pub seconds: f64,
}

/// A model's detections on a test set, by item id, and the seconds the detector took.
pub struct Detections {
    pub by_id: BTreeMap<String, Vec<Detection>>,
    pub seconds: f64,
}

impl TestSet {
    /// The `test.txt` (or COCO `test.json`) items of `root` at `input_size`; at most `limit`
    /// images (0: all).
    pub fn load(root: &Path, input_size: u32, limit: usize) -> Result<Self> {
        let (data, channels) = list(root, limit)?;
        let loader = Loader::new(
            data,
            Preprocess {
                input_size,
                channels,
                clahe: None,
            },
            Augment::none(input_size),
            LoaderOptions {
                batch_size: 4,
                cache: true,
                ..LoaderOptions::default()
            },
        )?;
        Ok(Self { loader })
    }

    pub fn dataset(&self) -> &Dataset {
        self.loader.dataset()
    }

    pub fn len(&self) -> usize {
        self.loader.dataset().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates `model` (built as `arch`) on the split; stops early if interrupted.
    pub fn evaluate(
        &self,
        arch: &ArchConfig,
        model: &ModelState,
        device: Device,
        interrupt: &Interrupt,
    ) -> Result<Scores> {
        let found = self.detect(arch, model, device, interrupt)?;
        score(self.dataset(), &found, |item| Some(item.id.clone()))
    }

    /// `model`'s detections on every image of the split.
    pub fn detect(
        &self,
        arch: &ArchConfig,
        model: &ModelState,
        device: Device,
        interrupt: &Interrupt,
    ) -> Result<Detections> {
        let data = self.loader.dataset();
        let det = Detector::from_state(arch.clone(), data.class_names.clone(), model, device)
            .context("the model does not fit the detector")?;
        let started = Instant::now();
        let mut by_id = BTreeMap::new();
        for batch in self.loader.eval_batches() {
            interrupt.check()?;
            let dets = det.detect(&batch, &DecodeParams::default())?;
            by_id.extend(batch.ids.iter().cloned().zip(dets));
        }
        Ok(Detections {
            by_id,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The scores of `data` from detections made on it or on a set that holds its images:
/// `id_in(item)` is the id under which `found` holds the item's detections (none: no
/// detections). Boxes are in the original image's pixels, so they do not depend on the set.
pub fn score(
    data: &Dataset,
    found: &Detections,
    id_in: impl Fn(&Item) -> Option<String>,
) -> Result<Scores> {
    let dets: Vec<Vec<Detection>> = data
        .items
        .iter()
        .map(|item| {
            id_in(item)
                .and_then(|id| found.by_id.get(&id).cloned())
                .unwrap_or_default()
        })
        .collect();
    let report = eval::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        SCORE_THRESHOLD,
        found.seconds,
    )?;
    Ok(Scores {
        map_33: report.map_33,
        map_50: report.map_50,
        map_50_95: report.map_50_95,
        seconds: found.seconds,
    })
}

/// The test items of `root` (DeepPCB layout or COCO), checked but not decoded, at most
/// `limit` (0: all), and the channels they are read with.
pub fn list(root: &Path, limit: usize) -> Result<(Dataset, Channels)> {
    let (loaded, channels) = if coco_layout::is_coco_folder(root) {
        let loaded = coco_layout::load(root, coco_layout::TEST_JSON, "test")
            .with_context(|| format!("cannot read the COCO test set of {}", root.display()))?;
        (loaded, coco_layout::CHANNELS)
    } else {
        let opts = DeepPcbOptions { template: true };
        let loaded = deeppcb::load(root, Split::Test, &opts)
            .with_context(|| format!("cannot read the test split of {}", root.display()))?;
        (loaded, Channels::GrayTemplate)
    };
    let checked = validate(
        loaded,
        &ValidateOptions {
            channels,
            decode: false,
            on_invalid: OnInvalid::Skip,
        },
    )?;
    if !checked.report.is_clean() {
        println!("test split: {}", checked.report);
    }
    let mut data = checked.dataset;
    if limit > 0 && data.items.len() > limit {
        data.items.truncate(limit);
    }
    Ok((data, channels))
}
