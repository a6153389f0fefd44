//! The test sets every model of a run is scored on: the held-out global test split, the test
//! boards of groups no plant trains on (when there are any: DeepPCB's test-only boards), and
//! each plant's own test data (and a drifting plant's, with its new look, as
//! `<plant>@round-<r>`). All are DeepPCB-layout folders read by the client's loaders and
//! scored by [`TestSet::evaluate`] (map_33, the DeepPCB protocol, and map_50).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::ModelState;
use serde::Serialize;
use tch::Device;

use crate::evaluation::{Scores, TestSet};
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

pub struct EvalSets {
    arch: ArchConfig,
    device: Device,
    global: TestSet,
    unseen: Option<TestSet>,
    plants: Vec<(String, TestSet)>,
    interrupt: Interrupt,
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
        let unseen = data
            .unseen_test
            .as_ref()
            .map(|root| TestSet::load(root, size, limit))
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
            let set = TestSet::load(&p.root, size, limit)
                .with_context(|| format!("cannot load {}'s test data", p.id))?;
            plants.push((p.id.clone(), set));
        }
        // A drifting plant's own test boards with its new look, scored as `<plant>@round-<r>`.
        for d in &data.drift {
            let set = TestSet::load(&d.root, size, limit)
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
        self.unseen.as_ref().map(TestSet::len)
    }

    /// `model` on the global, unseen and every plant's test set.
    pub fn score(&self, model: &ModelState) -> Result<ModelScores> {
        let global = self.on(&self.global, model)?;
        let unseen = self
            .unseen
            .as_ref()
            .map(|t| self.on(t, model))
            .transpose()?;
        let mut plants = BTreeMap::new();
        for (id, set) in &self.plants {
            plants.insert(id.clone(), self.on(set, model)?);
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
        let global = self.on(&self.global, model)?;
        let unseen = self
            .unseen
            .as_ref()
            .map(|t| self.on(t, model))
            .transpose()?;
        let mut plants = BTreeMap::new();
        if let Some((id, set)) = self.plants.iter().find(|(id, _)| id == plant) {
            plants.insert(id.clone(), self.on(set, model)?);
        }
        Ok(ModelScores {
            global,
            unseen,
            plants,
        })
    }

    fn on(&self, set: &TestSet, model: &ModelState) -> Result<Map> {
        Ok(set
            .evaluate(&self.arch, model, self.device, &self.interrupt)?
            .into())
    }
}
