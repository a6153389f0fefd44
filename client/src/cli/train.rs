//! `client train`: trains a detector on local DeepPCB data into a checkpoint that carries its
//! recipe and optimizer state, so `--resume` continues a stopped run exactly.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{device, require_data_folder};
use crate::agent::local::PlantData;
use crate::config::{DataConfig, DataSource, DeviceChoice, ModelConfig, TrainingConfig};
use crate::data::{Channels, OnInvalid};
use crate::detector::{
    train, CheckpointInfo, CheckpointPolicy, Detector, FinalWrite, Resume, Stop, TrainConfig,
};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The DeepPCB PCBData folder (holding trainval.txt).
    #[arg(long)]
    data: PathBuf,
    /// Only these board groups (e.g. group00041); default all, or the resumed run's.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// The checkpoint to write, after every epoch and at the end (it may be the --resume file).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run that wrote this checkpoint: its weights, AdamW moments, learning-rate
    /// schedule, epoch and batch position, and its recipe (batch size, crop, lr, seed, groups)
    /// unless flags override it. Without --minutes, --epochs or --steps it completes the run's
    /// plan.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Train for this many minutes of wall-clock time.
    #[arg(long, conflicts_with = "epochs")]
    minutes: Option<f64>,
    /// Train until this many epochs in total (default 1 unless --minutes or --steps alone is
    /// given).
    #[arg(long)]
    epochs: Option<u32>,
    /// Stop after this many optimizer steps at the latest. Alone (no --epochs or --minutes,
    /// no resumed plan) it is the run's plan: the learning rate decays to zero at that step.
    #[arg(long)]
    steps: Option<u64>,
    /// Network input side, a multiple of 32 [default: 640; on --resume the checkpoint's].
    #[arg(long)]
    input_size: Option<u32>,
    /// Side of the random training crops, a multiple of 32 [default: 320, at most the input
    /// size].
    #[arg(long)]
    crop: Option<u32>,
    /// [default: 8]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Peak learning rate [default: 0.002].
    #[arg(long)]
    lr: Option<f64>,
    /// Channel width multiplier of the detector [default: 1.0; on --resume the checkpoint's].
    #[arg(long)]
    width: Option<f64>,
    /// Seeds the initial weights, the shuffle and the augmentation [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// LibTorch CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    #[arg(long, default_value = "auto")]
    device: String,
}

/// The `train` flags that shape a run besides the model, recorded in its checkpoints so that
/// `--resume` repeats them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Recipe {
    batch_size: usize,
    crop: u32,
    lr: f64,
    seed: u64,
    groups: Vec<String>,
}

impl Recipe {
    /// Each flag given, else the resumed run's value, else the default; a flag that changes
    /// the resumed run's value is reported, since the continuation then differs from an
    /// uninterrupted run.
    fn resolve(a: &TrainArgs, recorded: Option<&Recipe>, input_size: u32) -> Recipe {
        fn pick<T: Clone + PartialEq + std::fmt::Debug>(
            flag: &str,
            given: Option<T>,
            recorded: Option<T>,
            default: T,
        ) -> T {
            match (given, recorded) {
                (Some(g), Some(r)) if g != r => {
                    eprintln!("note: {flag} {g:?} differs from the resumed run's {r:?}; training continues, but not as the uninterrupted run would have");
                    g
                }
                (Some(g), _) => g,
                (None, Some(r)) => r,
                (None, None) => default,
            }
        }
        let groups = (!a.groups.is_empty()).then(|| a.groups.clone());
        Recipe {
            batch_size: pick(
                "--batch-size",
                a.batch_size,
                recorded.map(|r| r.batch_size),
                8,
            ),
            crop: pick(
                "--crop",
                a.crop,
                recorded.map(|r| r.crop),
                320.min(input_size),
            ),
            lr: pick("--lr", a.lr, recorded.map(|r| r.lr), 2e-3),
            seed: pick("--seed", a.seed, recorded.map(|r| r.seed), 0),
            groups: pick(
                "--groups",
                groups,
                recorded.map(|r| r.groups.clone()),
                Vec::new(),
            ),
        }
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    if a.threads > 0 {
        tch::set_num_threads(i32::try_from(a.threads)?);
    }
    let device = device(&a.device)?;
    require_data_folder(&a.data)?;
    let resumed = match &a.resume {
        Some(path) => Some(
            Detector::load_checkpoint(path, device)
                .with_context(|| format!("cannot resume from {}", path.display()))?,
        ),
        None => None,
    };
    let recorded: Option<Recipe> = resumed
        .as_ref()
        .and_then(|(_, info)| info.recipe.clone())
        .map(serde_json::from_value)
        .transpose()
        .context("the checkpoint's recipe (fedinspect.recipe) is not one `client train` wrote")?;
    let (input_size, width) = model_shape(&a, resumed.as_ref().map(|(det, _)| det))?;
    let recipe = Recipe::resolve(&a, recorded.as_ref(), input_size);
    let model = ModelConfig {
        input_size,
        width,
        ..ModelConfig::default()
    };
    let training = TrainingConfig {
        device: DeviceChoice::Auto,
        threads: None,
        batch_size: Some(recipe.batch_size),
        crop_size: recipe.crop,
        warmup_steps: 100,
        seed: recipe.seed,
        mixed_precision: true,
    };
    let data = DataConfig {
        source: DataSource::DeepPcb {
            root: a.data.clone(),
            groups: recipe.groups.clone(),
        },
        channels: Channels::GrayTemplate,
        on_invalid: OnInvalid::Skip,
        validation_fraction: 0.0,
    };
    let plant = PlantData::load(&data, &model, &training)?;
    let (mut det, resume) = match resumed {
        Some((det, info)) => {
            check_resumable(&det, &plant.class_names)?;
            announce_resume(a.resume.as_deref().unwrap_or(Path::new("")), &info);
            (det, Some(Resume::from_checkpoint(&info)))
        }
        None => {
            let arch = model.arch(data.channels, plant.class_names.len());
            let det = Detector::seeded(arch, plant.class_names.clone(), device, recipe.seed)?;
            (det, None)
        }
    };
    let stop = stop_condition(&a, resume.as_ref())?;
    let cfg = TrainConfig {
        lr: recipe.lr,
        stop,
        seed: recipe.seed,
        resume,
        checkpoint: Some(CheckpointPolicy {
            path: a.out.clone(),
            every_epochs: 1,
            preprocess: Some(plant.preprocess.clone()),
            recipe: Some(serde_json::to_value(&recipe)?),
            final_write: FinalWrite::default(),
        }),
        ..TrainConfig::default()
    };
    println!(
        "training on {} images ({device:?}), checkpoint {}",
        plant.num_samples(),
        a.out.display()
    );
    let max_steps = a.steps.unwrap_or(u64::MAX);
    let report = train(
        &mut det,
        &mut plant.train_loader(recipe.batch_size)?,
        &cfg,
        &mut |p| {
            if p.step % 20 == 0 || Some(p.step) == p.total_steps {
                eprintln!(
                    "epoch {} step {} loss {:.4} lr {:.2e} {:.1} img/s",
                    p.epoch, p.step, p.loss, p.lr, p.images_per_sec
                );
            }
            if p.step >= max_steps {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )?;
    println!(
        "done: {} steps, {} epochs, {:.1} s, last loss {:.4}; wrote {}",
        report.steps,
        report.epochs_completed,
        report.seconds,
        report.last_loss,
        a.out.display()
    );
    Ok(())
}

/// Input size and width: a resumed run's, which flags may repeat but not change; else the
/// flags' or the defaults.
fn model_shape(a: &TrainArgs, resumed: Option<&Detector>) -> Result<(u32, f64)> {
    let Some(det) = resumed else {
        return Ok((a.input_size.unwrap_or(640), a.width.unwrap_or(1.0)));
    };
    let arch = det.arch();
    if a.input_size.is_some_and(|s| s != arch.input_size)
        || a.width.is_some_and(|w| w != arch.width)
    {
        bail!(
            "--input-size/--width differ from the resumed model's ({}, {}); a resumed run keeps its architecture, so drop them or train a new model",
            arch.input_size,
            arch.width
        );
    }
    Ok((arch.input_size, arch.width))
}

/// When training stops: --minutes or --epochs as given; else a resumed run's remaining plan
/// (which --steps then only caps, so the learning rate keeps the run's schedule); else
/// --steps as the whole plan, or one epoch.
fn stop_condition(a: &TrainArgs, resume: Option<&Resume>) -> Result<Stop> {
    if let Some(m) = a.minutes {
        return Ok(Stop::WallClock(Duration::from_secs_f64(m * 60.0)));
    }
    if let Some(e) = a.epochs {
        return Ok(Stop::Epochs(e));
    }
    if let Some(r) = resume {
        if let Some(stop) = r.remaining() {
            return Ok(stop);
        }
        if a.steps.is_none() {
            bail!(
                "the resumed run has no plan left to complete (it finished, or its checkpoint predates recorded plans); pass --epochs (more than {}), --steps or --minutes to train further",
                r.epoch
            );
        }
    }
    Ok(a.steps.map_or(Stop::Epochs(1), Stop::Steps))
}

/// Says where a resumed run picks up, or that its optimizer starts afresh.
fn announce_resume(path: &Path, info: &CheckpointInfo) {
    let path = path.display();
    match &info.training {
        Some(t) => println!(
            "resuming {path}: {} epochs and {} batches done, step {} of the schedule, AdamW step {}",
            info.epoch, t.position.batches_into_epoch, t.position.steps_done, t.optimizer.step
        ),
        None => eprintln!(
            "note: {path} has no optimizer state (it predates checkpoints that carry it, or was saved outside training): the weights and the epoch count ({}) resume, but AdamW's moments restart from zero and the learning-rate warmup runs again",
            info.epoch
        ),
    }
}

/// A resumed model must read what this command feeds it (DeepPCB image + template) and know
/// the data's classes, in order.
fn check_resumable(det: &Detector, class_names: &[String]) -> Result<()> {
    let channels = det.arch().in_channels;
    if channels != Channels::GrayTemplate.count() as u32 {
        bail!("the resumed model reads {channels} channels; `client train` feeds DeepPCB image + template (2 channels)");
    }
    if det.class_names() != class_names {
        bail!(
            "the resumed model's classes {:?} differ from the data's {:?}; resume on the data it was trained on",
            det.class_names(),
            class_names
        );
    }
    Ok(())
}
