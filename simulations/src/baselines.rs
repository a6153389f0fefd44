//! The two baselines of a run, trained with the very code a plant runs in a round
//! (`client::agent::local`: its data loading, its round training recipe from the round plan,
//! the warmup whenever its AdamW moments start afresh, the learning-rate cycle and the moments
//! carried through it when `lr_cycle_rounds` is set) and the same compute budget as the federation: round r
//! of a baseline is one round's local epochs over its data, starting from its round r - 1
//! model. Centralised training uses the union of the plants' training data; local-only
//! training is each plant alone on its own data, never averaged. A folder is DeepPCB layout or
//! a COCO folder ([`coco_layout`]), read as the plant's `plant.toml` reads it.

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{Context, Result};
use fedinspect_client::agent::local::{train_config, PlantData};
use fedinspect_client::agent::types::TrainPlan;
use fedinspect_client::config::{
    DataConfig, DataSource, DeviceChoice, ModelConfig, TrainingConfig,
};
use fedinspect_client::data::{Channels, OnInvalid};
use fedinspect_client::detector::train::{train, AdamWState};
use fedinspect_client::detector::Detector;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::lr_cycle::LrSpan;
use fedinspect_common::ModelState;
use tch::Device;

use crate::coco_layout;
use crate::experiment::Settings;
use crate::interrupt::Interrupt;

/// A model trained round by round on one folder's training data, as one plant would.
pub struct BaselineTrainer {
    arch: ArchConfig,
    device: Device,
    data: PlantData,
    plan: TrainPlan,
    training: TrainingConfig,
    model: ModelState,
    rounds_done: u64,
    /// Rounds sharing one learning-rate cosine, as the coordinator tells the plants.
    lr_cycle_rounds: u64,
    /// AdamW's moments after the last round, continued within a cycle as a plant does.
    moments: Option<AdamWState>,
    interrupt: Interrupt,
}

impl BaselineTrainer {
    /// A trainer on the `trainval.txt` of `root` (every group; a COCO folder's `train.json`),
    /// starting from `initial`, with the round plan of `s` and training seed `seed`.
    pub fn new(
        root: &Path,
        s: &Settings,
        arch: &ArchConfig,
        device: Device,
        seed: u64,
        initial: ModelState,
        interrupt: Interrupt,
    ) -> Result<Self> {
        let model_cfg = ModelConfig {
            input_size: arch.input_size,
            width: arch.width,
            depth: arch.depth,
            attention: arch.attention,
            fpn_width: arch.fpn_width,
            head_width: arch.head_width,
        };
        let training = TrainingConfig {
            device: DeviceChoice::Auto,
            threads: None,
            batch_size: None,
            crop_size: s.model.crop_size,
            warmup_steps: s.federation.warmup_steps,
            seed,
            mixed_precision: true,
        };
        let (source, channels) = if coco_layout::is_coco_folder(root) {
            (coco_layout::train_source(root), coco_layout::CHANNELS)
        } else {
            let source = DataSource::DeepPcb {
                root: root.to_path_buf(),
                groups: Vec::new(),
            };
            (source, Channels::GrayTemplate)
        };
        let data_cfg = DataConfig {
            source,
            channels,
            on_invalid: OnInvalid::Skip,
            validation_fraction: 0.0,
        };
        let data = PlantData::load(&data_cfg, &model_cfg, &training)
            .with_context(|| format!("cannot load the training data of {}", root.display()))?;
        let f = &s.federation;
        Ok(Self {
            arch: arch.clone(),
            device,
            data,
            plan: TrainPlan {
                local_epochs: f.local_epochs,
                learning_rate: f.learning_rate,
                // A baseline has no global model to stay close to.
                fedprox_mu: 0.0,
                codec: s.codec(),
                batch_size: f.batch_size,
                lr_span: None,
            },
            training,
            model: initial,
            rounds_done: 0,
            lr_cycle_rounds: f.lr_cycle_rounds,
            moments: None,
            interrupt,
        })
    }

    pub fn num_samples(&self) -> u64 {
        self.data.num_samples()
    }

    /// Trains one more round's worth and returns the model after it.
    pub fn round(&mut self) -> Result<&ModelState> {
        let round = self.rounds_done + 1;
        let plan = TrainPlan {
            lr_span: LrSpan::for_round(round, self.lr_cycle_rounds),
            ..self.plan.clone()
        };
        let cfg = train_config(
            &self.training,
            &plan,
            round,
            &self.model,
            self.moments.take(),
        );
        let mut det = Detector::from_state(
            self.arch.clone(),
            self.data.class_names.clone(),
            &self.model,
            self.device,
        )?;
        let mut loader = self.data.train_loader(self.plan.batch_size as usize)?;
        let interrupt = &self.interrupt;
        let report = train(&mut det, &mut loader, &cfg, &mut |_| {
            if interrupt.is_set() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        self.interrupt.check()?;
        self.moments = report.moments.filter(|_| plan.moments_continue());
        self.model = det.state()?;
        self.rounds_done = round;
        Ok(&self.model)
    }
}
