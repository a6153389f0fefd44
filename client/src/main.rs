//! `client`: the plant's binary. `run` is the federation agent, a fixed sequence: logging,
//! config, build, spawn, wait for a signal (or the agent's failure), drain with a deadline.
//! `train`, `eval` and `detect` work on local files without a coordinator.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use fedinspect_client::agent::local::PlantData;
use fedinspect_client::agent::Agent;
use fedinspect_client::bench;
use fedinspect_client::config::{
    Config, DataConfig, DataSource, DeviceChoice, ModelConfig, TrainingConfig,
};
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::data::loader::Skipped;
use fedinspect_client::data::{
    validate, Augment, Channels, Dataset, Item, Loader, LoaderOptions, OnInvalid, Preprocess,
    ValidateOptions,
};
use fedinspect_client::detector::{
    train, CheckpointInfo, CheckpointPolicy, DecodeParams, Detector, FinalWrite, Resume, Stop,
    TrainConfig,
};
use fedinspect_client::eval::{self, export, EvalReport};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::detection::Detection;
use image::{ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};
use tch::Device;

/// How long a stopping agent may take to reach a step boundary and let go.
const DRAIN: Duration = Duration::from_secs(120);
/// Score threshold of precision/recall in `eval` and of drawn boxes in `detect`.
const SCORE_THRESHOLD: f64 = 0.3;

/// The fedinspect plant client: local training and evaluation, and the federation agent.
#[derive(Debug, Parser)]
#[command(name = "client", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the federation: train on every round's task until stopped (Ctrl-C, SIGTERM).
    Run {
        /// The plant.toml (see client/plant.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Train a detector on local DeepPCB data and write a checkpoint.
    Train(TrainArgs),
    /// Evaluate a checkpoint on the DeepPCB test split.
    Eval(EvalArgs),
    /// Detect defects in images; writes detections.json and annotated PNGs to --out.
    Detect(DetectArgs),
    /// Measure training images/s and inference latency of the detector on this machine.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// The DeepPCB PCBData folder (holding test.txt).
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    checkpoint: PathBuf,
    /// Print the report as one JSON object on one line (and nothing else on stdout).
    #[arg(long)]
    json: bool,
    /// Evaluate only the first N test images (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Only the test images of these board groups (e.g. the four never in trainval.txt:
    /// group12000,group12100,group12300,group90100); default all.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// LibTorch CPU threads (0: LibTorch's default, all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Network input side, a multiple of 32 [default: the checkpoint's].
    #[arg(long)]
    input_size: Option<u32>,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Debug, Args)]
struct DetectArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Boxes scoring below this are not drawn (all are written to the JSON).
    #[arg(long, default_value_t = SCORE_THRESHOLD as f32)]
    min_score: f32,
    /// Network input side, a multiple of 32 [default: the checkpoint's].
    #[arg(long)]
    input_size: Option<u32>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images; with a two-channel model, DeepPCB `*_test.jpg` files next to their
    /// `*_temp.jpg` templates.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[arg(long, default_value = "auto")]
    device: String,
    /// LibTorch CPU threads (0: LibTorch's default, all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Channel width multiplier of the detector.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    #[arg(long, default_value_t = 8)]
    train_batch: usize,
    #[arg(long, default_value_t = 320)]
    train_crop: usize,
    /// Timed training steps (0: inference only).
    #[arg(long, default_value_t = 20)]
    train_steps: u64,
    /// Train in float32 on CUDA too (default: autocast float16 there).
    #[arg(long)]
    no_mixed_precision: bool,
    #[arg(long, default_value_t = 640)]
    infer_size: usize,
    /// Inference batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    infer_batches: Vec<usize>,
    /// Timed inference calls per batch size.
    #[arg(long, default_value_t = 50)]
    infer_iters: usize,
    /// Also print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TrainArgs {
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

fn main() -> Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::Train(args) => train_cmd(args),
        Command::Eval(args) => eval_cmd(&args),
        Command::Detect(args) => detect_cmd(&args),
        Command::Bench(args) => bench_cmd(args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let agent = Agent::build(config).context("cannot start the plant agent")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut task = tokio::spawn(agent.run(stopped));
        let result = tokio::select! {
            () = shutdown_signal() => {
                tracing::info!("stopping at the next step boundary");
                let _ = stop.send(true);
                match tokio::time::timeout(DRAIN, &mut task).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        task.abort();
                        bail!("the agent did not stop within {DRAIN:?}; a pending update is sent on the next start");
                    }
                }
            }
            joined = &mut task => joined,
        };
        result.context("the agent task failed")??;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => bail!("--device cuda but LibTorch sees no CUDA device; use auto or cpu"),
        other => bail!("--device {other}: use auto, cpu or cuda"),
    })
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.threads > 0 {
        tch::set_num_threads(i32::try_from(a.threads)?);
    }
    let opts = bench::BenchOptions {
        arch: ArchConfig {
            width: a.width,
            ..ArchConfig::default()
        },
        device: device(&a.device)?,
        train_batch: a.train_batch,
        train_crop: a.train_crop,
        train_steps: a.train_steps,
        mixed_precision: !a.no_mixed_precision,
        infer_size: a.infer_size,
        infer_batches: a.infer_batches,
        infer_iters: a.infer_iters,
        ..bench::BenchOptions::default()
    };
    if opts.device.is_cuda() {
        println!(
            "device: CUDA ({} GPU(s) visible)",
            tch::Cuda::device_count()
        );
    } else {
        println!("device: CPU, {} LibTorch threads", tch::get_num_threads());
    }
    let report = bench::run(&opts, &mut |line| println!("{line}"))?;
    println!(
        "detector: {} parameters, {:.3} GMAC per {}x{} crop",
        report.params, report.gmac_per_crop, opts.train_crop, opts.train_crop
    );
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn train_cmd(a: TrainArgs) -> Result<()> {
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

/// A clear error for a data path that is not a folder, before any loader reads it.
fn require_data_folder(data: &Path) -> Result<()> {
    if !data.is_dir() {
        bail!(
            "--data {}: no such folder; point it at the DeepPCB PCBData folder that holds trainval.txt and test.txt",
            data.display()
        );
    }
    Ok(())
}

/// The checkpoint's detector (weights only: inference needs no optimizer state) and the
/// preprocessing to feed it, at `input_size` when given.
fn load_for_inference(
    path: &Path,
    device: Device,
    input_size: Option<u32>,
) -> Result<(Detector, Preprocess)> {
    let (det, info): (Detector, CheckpointInfo) =
        Detector::load_checkpoint_weights(path, device)
            .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    let mut preprocess = match info.preprocess {
        Some(p) => p,
        None => Preprocess {
            input_size: det.arch().input_size,
            channels: Channels::from_count(det.arch().in_channels as usize)
                .context("the checkpoint's model takes an unsupported number of channels")?,
            clahe: None,
        },
    };
    if let Some(size) = input_size {
        preprocess.input_size = size;
    }
    Ok((det, preprocess))
}

fn eval_cmd(a: &EvalArgs) -> Result<()> {
    require_data_folder(&a.data)?;
    if a.threads > 0 {
        tch::set_num_threads(i32::try_from(a.threads)?);
    }
    let (det, preprocess) = load_for_inference(&a.checkpoint, device(&a.device)?, a.input_size)?;
    let loaded = deeppcb::load(
        &a.data,
        Split::Test,
        &DeepPcbOptions {
            template: preprocess.channels == Channels::GrayTemplate,
        },
    )?;
    let checked = validate(
        loaded,
        &ValidateOptions {
            channels: preprocess.channels,
            decode: false,
            on_invalid: OnInvalid::Skip,
        },
    )?;
    let mut dataset = checked.dataset;
    if !a.groups.is_empty() {
        let available = dataset.groups();
        let unknown: Vec<&String> = a.groups.iter().filter(|g| !available.contains(g)).collect();
        if !unknown.is_empty() {
            bail!("--groups {unknown:?}: not groups of the test split; test.txt has {available:?}");
        }
        let wanted: Vec<&str> = a.groups.iter().map(String::as_str).collect();
        dataset = dataset.with_groups(&wanted);
    }
    if a.limit > 0 {
        dataset.items.truncate(a.limit);
    }
    let (report, _, skipped) = evaluate(&det, dataset, preprocess)?;
    for s in &skipped {
        eprintln!("skipped {}: {}", s.id, s.reason);
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} images in {:.1} s: mAP@0.5 {:.4}, mAP@[.5:.95] {:.4}, DeepPCB mAP@0.33 {:.4}, P/R/F1@0.33 {:.3}/{:.3}/{:.3} (score >= {})",
            report.images,
            report.seconds,
            report.map_50,
            report.map_50_95,
            report.map_33,
            report.precision_33,
            report.recall_33,
            report.f1_33,
            report.score_threshold
        );
        for (class, ap) in &report.per_class {
            println!("  {class:<16} AP@0.5 {ap:.4}");
        }
    }
    Ok(())
}

/// Detections for every item of `dataset`, in item order, their evaluation, and the items that
/// could not be read (their detection lists are empty).
fn evaluate(
    det: &Detector,
    dataset: Dataset,
    preprocess: Preprocess,
) -> Result<(EvalReport, Vec<Vec<Detection>>, Vec<Skipped>)> {
    let input = preprocess.input_size;
    let loader = Loader::new(
        dataset,
        preprocess,
        Augment::none(input),
        LoaderOptions {
            batch_size: 4,
            ..LoaderOptions::default()
        },
    )?;
    let started = Instant::now();
    let mut by_id = Vec::new();
    for batch in loader.eval_batches() {
        let dets = det.detect(&batch, &DecodeParams::default())?;
        by_id.extend(batch.ids.iter().cloned().zip(dets));
    }
    let seconds = started.elapsed().as_secs_f64();
    let data = loader.dataset();
    let dets = eval::align_detections(data, by_id);
    let report = eval::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        SCORE_THRESHOLD,
        seconds,
    )?;
    Ok((report, dets, loader.skipped()))
}

fn detect_cmd(a: &DetectArgs) -> Result<()> {
    let (det, preprocess) = load_for_inference(&a.checkpoint, device(&a.device)?, a.input_size)?;
    let mut items = Vec::new();
    let mut ids = BTreeMap::new();
    for image in &a.images {
        let id = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", image.display()))?;
        if ids.insert(id.clone(), image.clone()).is_some() {
            bail!("two images are named {id}; pass files with distinct names");
        }
        check_channels(image, preprocess.channels)?;
        let template = match preprocess.channels {
            Channels::GrayTemplate => {
                let template = template_of(image)?;
                check_channels(&template, preprocess.channels)?;
                Some(template)
            }
            Channels::Gray | Channels::Rgb => None,
        };
        items.push(Item {
            id,
            group: String::new(),
            image: image.clone(),
            template,
            annotations: Vec::new(),
        });
    }
    let class_names = det.class_names().to_vec();
    let dataset = Dataset {
        class_names: class_names.clone(),
        items,
    };
    let order: Vec<String> = dataset.items.iter().map(|i| i.id.clone()).collect();
    let (_, dets, skipped) = evaluate(&det, dataset, preprocess)?;
    let unread: BTreeMap<&str, &str> = skipped
        .iter()
        .map(|s| (s.id.as_str(), s.reason.as_str()))
        .collect();
    let (order, dets): (Vec<String>, Vec<Vec<Detection>>) = order
        .into_iter()
        .zip(dets)
        .filter(|(id, _)| !unread.contains_key(id.as_str()))
        .unzip();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let file = export::detections_file(&order, &dets, &class_names)?;
    export::write_detections_json(&a.out.join("detections.json"), &file)?;
    for (id, d) in order.iter().zip(&dets) {
        let png = a.out.join(format!("{id}.png"));
        export::save_annotated(&ids[id], &[], d, &class_names, a.min_score, &png)?;
    }
    println!(
        "{} images: {} detections (score >= {}); wrote {}",
        order.len(),
        dets.iter()
            .flatten()
            .filter(|d| d.score >= a.min_score)
            .count(),
        a.min_score,
        a.out.display()
    );
    if !unread.is_empty() {
        let list: Vec<String> = unread
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        bail!(
            "{} of {} images could not be read and are missing from {}: {}",
            unread.len(),
            ids.len(),
            a.out.display(),
            list.join("; ")
        );
    }
    Ok(())
}

/// Refuses a file whose stored colour channels are not what the model reads (a colour photo
/// for a grey model, or a grey image for an RGB one), instead of converting it silently.
fn check_channels(path: &Path, channels: Channels) -> Result<()> {
    let decoder = ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .into_decoder()
        .with_context(|| {
            format!(
                "{} is not an image this build decodes; pass 8-bit jpg or png files",
                path.display()
            )
        })?;
    let color = decoder.color_type();
    let (got, wanted) = (color.channel_count(), channels.count());
    match (color.has_color(), channels) {
        (true, Channels::Gray | Channels::GrayTemplate) => bail!(
            "{}: {got}-channel colour image, but the model reads grayscale images ({wanted} input channels{}); pass grayscale images like the ones it was trained on, or use a model trained on RGB",
            path.display(),
            if channels == Channels::GrayTemplate { ": image + template" } else { "" }
        ),
        (false, Channels::Rgb) => bail!(
            "{}: {got}-channel grayscale image, but the model reads 3-channel RGB images; pass colour images like the ones it was trained on, or use a grayscale model",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// DeepPCB's template of `x_test.jpg`: `x_temp.jpg` in the same folder.
fn template_of(image: &Path) -> Result<PathBuf> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(prefix) = name
        .rsplit_once("_test.")
        .map(|(p, ext)| format!("{p}_temp.{ext}"))
    else {
        bail!(
            "{}: the model compares each image with its defect-free template; pass DeepPCB *_test.jpg files next to their *_temp.jpg",
            image.display()
        );
    };
    let template = image.with_file_name(prefix);
    if !template.is_file() {
        bail!(
            "{}: its template {} does not exist",
            image.display(),
            template.display()
        );
    }
    Ok(template)
}
