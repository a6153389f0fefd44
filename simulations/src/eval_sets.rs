//! The test sets every model of a run is scored on: the held-out global test split, the test
//! boards of groups no plant trains on (when there are any: DeepPCB's test-only boards), and
//! each plant's own test data (and a drifting plant's, with its new look, as
//! `<plant>@round-<r>`). All are DeepPCB-layout folders read by the client's loaders and
//! scored with the client's evaluation (map_33, the DeepPCB protocol, and map_50).
//!
//! The unseen boards and the plants' test boards are images of the global test split (the
//! plants' folders link to the source's groups). Such a set is not decoded nor run through
//! the detector again: it is scored from the global split's detections, matched by the file
//! of each image (and template: device and inode, through symbolic and hard links). This halves the detector's work per model
//! (1,000 images became 500 on DeepPCB) and the decoded images kept in memory. A set with any
//! image outside the global split (a drifted plant's re-rendered boards, a truncated global
//! split under `eval_limit`) is decoded and run through the detector on its own.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::ModelState;
use serde::Serialize;
use tch::Device;

use fedinspect_client::data::{Dataset, Item};

use crate::evaluation::{self, Detections, Scores, TestSet};
use crate::interrupt::Interrupt;
use crate::plant_data::PreparedData;

/// A model's mAP on one test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Map {
    pub map_33: f64,
    pub map_50: f64,
}

impl From<Scores> for Map {
    fn from(s: Scores) -> Self {
        Self {
            map_33: s.map_33,
            map_50: s.map_50,
        }
    }
}

/// One model scored on every test set; `plants` has no entry for a plant without test data.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelScores {
    pub global: Map,
    pub unseen: Option<Map>,
    pub plants: BTreeMap<String, Map>,
}

/// A test set other than the global one: scored from the global split's detections when all
/// its images are in it, else decoded and detected on its own.
enum Part {
    /// Its items and, per item id, the global split's id of the same image.
    InGlobal {
        data: Dataset,
        global_ids: BTreeMap<String, String>,
    },
    Own(TestSet),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::InGlobal { data, .. } => data.len(),
            Part::Own(t) => t.len(),
        }
    }
}

pub struct EvalSets {
    arch: ArchConfig,
    device: Device,
    global: TestSet,
    unseen: Option<Part>,
    plants: Vec<(String, Part)>,
    interrupt: Interrupt,
}

/// A file's identity whatever path reaches it (a symbolic or a hard link): device and inode.
type FileId = (u64, u64);

/// What identifies an item's image (and template) whatever folder lists it.
fn image_key(item: &Item) -> Option<(FileId, Option<FileId>)> {
    let id = |path: &Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let template = match &item.template {
        Some(t) => Some(id(t)?),
        None => None,
    };
    Some((id(&item.image)?, template))
}

/// The part of `root`'s test split: in the global split if every image is, else decoded.
fn part(
    root: &Path,
    size: u32,
    limit: usize,
    global: &TestSet,
    global_by_path: &BTreeMap<(FileId, Option<FileId>), String>,
) -> Result<Part> {
    let (data, _) = evaluation::list(root, limit)?;
    let same_classes = data.class_names == global.dataset().class_names;
    let global_ids: Option<BTreeMap<String, String>> = data
        .items
        .iter()
        .map(|item| {
            let id = global_by_path.get(&image_key(item)?)?;
            Some((item.id.clone(), id.clone()))
        })
        .collect();
    match global_ids {
        Some(global_ids) if same_classes => Ok(Part::InGlobal { data, global_ids }),
        _ => Ok(Part::Own(TestSet::load(root, size, limit)?)),
    }
}

impl EvalSets {
    /// Loads (and decodes once) every test set of `data`, at most `limit` images each (0: all).
    pub fn load(
        data: &PreparedData,
        arch: &ArchConfig,
        device: Device,
        limit: usize,
        interrupt: Interrupt,
    ) -> Result<Self> {
        let size = arch.input_size;
        let global = TestSet::load(&data.source, size, limit)?;
        // The files of the global split's items (image, template), to their ids.
        let global_by_path = global
            .dataset()
            .items
            .iter()
            .filter_map(|item| Some((image_key(item)?, item.id.clone())))
            .collect();
        let unseen = data
            .unseen_test
            .as_ref()
            .map(|root| part(root, size, limit, &global, &global_by_path))
            .transpose()
            .context("cannot load the test boards of unseen groups")?;
        let mut plants = Vec::new();
        for p in &data.plants {
            if p.test_images == 0 {
                println!(
                    "{} has no test images of its own (its share of the test split is empty): its own-data mAP is left out",
                    p.id
                );
                continue;
            }
            let set = part(&p.root, size, limit, &global, &global_by_path)
                .with_context(|| format!("cannot load {}'s test data", p.id))?;
            plants.push((p.id.clone(), set));
        }
        // A drifting plant's own test boards with its new look, scored as `<plant>@round-<r>`.
        for d in &data.drift {
            let set = part(&d.root, size, limit, &global, &global_by_path)
                .with_context(|| format!("cannot load {}'s drifted test data", d.plant_id))?;
            plants.push((format!("{}@round-{}", d.plant_id, d.from_round), set));
        }
        Ok(Self {
            arch: arch.clone(),
            device,
            global,
            unseen,
            plants,
            interrupt,
        })
    }

    pub fn global_len(&self) -> usize {
        self.global.len()
    }

    pub fn unseen_len(&self) -> Option<usize> {
        self.unseen.as_ref().map(Part::len)
    }

    /// `model` on the global, unseen and every plant's test set.
    pub fn score(&self, model: &ModelState) -> Result<ModelScores> {
        let found = self.detect_global(model)?;
        let global = self.global_scores(&found)?;
        let unseen = self
            .unseen
            .as_ref()
            .map(|t| self.on(t, &found, model))
            .transpose()?;
        let mut plants = BTreeMap::new();
        for (id, set) in &self.plants {
            plants.insert(id.clone(), self.on(set, &found, model)?);
        }
        Ok(ModelScores {
            global,
            unseen,
            plants,
        })
    }

    /// `model` on the global and unseen sets and on plant `plant`'s own test set only (a
    /// local-only model is a plant's own).
    pub fn score_for_plant(&self, model: &ModelState, plant: &str) -> Result<ModelScores> {
        let found = self.detect_global(model)?;
        let global = self.global_scores(&found)?;
        let unseen = self
            .unseen
            .as_ref()
            .map(|t| self.on(t, &found, model))
            .transpose()?;
        let mut plants = BTreeMap::new();
        if let Some((id, set)) = self.plants.iter().find(|(id, _)| id == plant) {
            plants.insert(id.clone(), self.on(set, &found, model)?);
        }
        Ok(ModelScores {
            global,
            unseen,
            plants,
        })
    }

    fn detect_global(&self, model: &ModelState) -> Result<Detections> {
        self.global
            .detect(&self.arch, model, self.device, &self.interrupt)
    }

    fn global_scores(&self, found: &Detections) -> Result<Map> {
        Ok(evaluation::score(self.global.dataset(), found, |item| Some(item.id.clone()))?.into())
    }

    /// `set` scored from the global split's detections `found`, or on its own.
    fn on(&self, set: &Part, found: &Detections, model: &ModelState) -> Result<Map> {
        let scores: Scores = match set {
            Part::InGlobal { data, global_ids } => {
                evaluation::score(data, found, |item| global_ids.get(&item.id).cloned())?
            }
            Part::Own(t) => t.evaluate(&self.arch, model, self.device, &self.interrupt)?,
        };
        Ok(scores.into())
    }

    /// How many of the test sets besides the global one are scored from its detections.
    pub fn sets_in_global(&self) -> usize {
        self.unseen
            .iter()
            .chain(self.plants.iter().map(|(_, p)| p))
            .filter(|p| matches!(p, Part::InGlobal { .. }))
            .count()
    }
}
