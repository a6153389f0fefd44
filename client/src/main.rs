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
use fedinspect_client::data::{
    validate, Augment, Channels, Dataset, Item, Loader, LoaderOptions, OnInvalid, Preprocess,
    ValidateOptions,
};
use fedinspect_client::detector::{
    train, CheckpointInfo, CheckpointPolicy, DecodeParams, Detector, Stop, TrainConfig,
};
use fedinspect_client::eval::{self, export, EvalReport};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::detection::Detection;
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
    Eval {
        /// The DeepPCB PCBData folder (holding test.txt).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        checkpoint: PathBuf,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
        /// Evaluate only the first N test images (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Detect defects in images; writes detections.json and annotated PNGs to --out.
    Detect {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Boxes scoring below this are not drawn (all are written to the JSON).
        #[arg(long, default_value_t = SCORE_THRESHOLD as f32)]
        min_score: f32,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Images; with a two-channel model, DeepPCB `*_test.jpg` files next to their
        /// `*_temp.jpg` templates.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Measure training images/s and inference latency of the detector on this machine.
    Bench(BenchArgs),
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
    /// Only these board groups (e.g. group00041); default all.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    #[arg(long)]
    out: PathBuf,
    /// Train for this many minutes of wall-clock time.
    #[arg(long, conflicts_with = "epochs")]
    minutes: Option<f64>,
    /// Train for this many epochs (default 1 unless --minutes or --steps alone is given).
    #[arg(long)]
    epochs: Option<u32>,
    /// Stop after this many optimizer steps at the latest.
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long, default_value_t = 640)]
    input_size: u32,
    #[arg(long, default_value_t = 320)]
    crop: u32,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Channel width multiplier of the detector.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// LibTorch CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::Train(args) => train_cmd(args),
        Command::Eval {
            data,
            checkpoint,
            json,
            limit,
            device,
        } => eval_cmd(&data, &checkpoint, json, limit, &device),
        Command::Detect {
            checkpoint,
            out,
            min_score,
            device,
            images,
        } => detect_cmd(&checkpoint, &out, min_score, &device, &images),
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
    let model = ModelConfig {
        input_size: a.input_size,
        width: a.width,
        ..ModelConfig::default()
    };
    let training = TrainingConfig {
        device: DeviceChoice::Auto,
        threads: None,
        batch_size: Some(a.batch_size),
        crop_size: a.crop,
        warmup_steps: 100,
        seed: a.seed,
        mixed_precision: true,
    };
    let data = DataConfig {
        source: DataSource::DeepPcb {
            root: a.data.clone(),
            groups: a.groups.clone(),
        },
        channels: Channels::GrayTemplate,
        on_invalid: OnInvalid::Skip,
        validation_fraction: 0.0,
    };
    let plant = PlantData::load(&data, &model, &training)?;
    let arch = model.arch(data.channels, plant.class_names.len());
    let mut det = Detector::seeded(arch, plant.class_names.clone(), device, a.seed)?;
    let stop = match (a.minutes, a.epochs, a.steps) {
        (Some(m), _, _) => Stop::WallClock(Duration::from_secs_f64(m * 60.0)),
        (None, Some(e), _) => Stop::Epochs(e),
        (None, None, Some(s)) => Stop::Steps(s),
        (None, None, None) => Stop::Epochs(1),
    };
    let cfg = TrainConfig {
        lr: a.lr,
        stop,
        seed: a.seed,
        checkpoint: Some(CheckpointPolicy {
            path: a.out.clone(),
            every_epochs: 1,
            preprocess: Some(plant.preprocess.clone()),
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
        &mut plant.train_loader(a.batch_size)?,
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

/// The checkpoint's detector and the preprocessing to feed it.
fn load_checkpoint(path: &Path, device: Device) -> Result<(Detector, Preprocess)> {
    let (det, info): (Detector, CheckpointInfo) = Detector::load_checkpoint(path, device)?;
    let preprocess = match info.preprocess {
        Some(p) => p,
        None => Preprocess {
            input_size: det.arch().input_size,
            channels: Channels::from_count(det.arch().in_channels as usize)
                .context("the checkpoint's model takes an unsupported number of channels")?,
            clahe: None,
        },
    };
    Ok((det, preprocess))
}

fn eval_cmd(data: &Path, checkpoint: &Path, json: bool, limit: usize, dev: &str) -> Result<()> {
    let (det, preprocess) = load_checkpoint(checkpoint, device(dev)?)?;
    let loaded = deeppcb::load(
        data,
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
    if limit > 0 {
        dataset.items.truncate(limit);
    }
    let (report, _) = evaluate(&det, dataset, preprocess)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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

/// Detections for every item of `dataset`, in item order, and their evaluation.
fn evaluate(
    det: &Detector,
    dataset: Dataset,
    preprocess: Preprocess,
) -> Result<(EvalReport, Vec<Vec<Detection>>)> {
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
    for s in loader.skipped() {
        eprintln!("skipped {}: {}", s.id, s.reason);
    }
    let data = loader.dataset();
    let dets = eval::align_detections(data, by_id);
    let report = eval::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        SCORE_THRESHOLD,
        seconds,
    )?;
    Ok((report, dets))
}

fn detect_cmd(
    checkpoint: &Path,
    out: &Path,
    min_score: f32,
    dev: &str,
    images: &[PathBuf],
) -> Result<()> {
    let (det, preprocess) = load_checkpoint(checkpoint, device(dev)?)?;
    let mut items = Vec::new();
    let mut ids = BTreeMap::new();
    for image in images {
        let id = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", image.display()))?;
        if ids.insert(id.clone(), image.clone()).is_some() {
            bail!("two images are named {id}; pass files with distinct names");
        }
        let template = match preprocess.channels {
            Channels::GrayTemplate => Some(template_of(image)?),
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
    let (_, dets) = evaluate(&det, dataset, preprocess)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let file = export::detections_file(&order, &dets, &class_names)?;
    export::write_detections_json(&out.join("detections.json"), &file)?;
    for (id, d) in order.iter().zip(&dets) {
        let png = out.join(format!("{id}.png"));
        export::save_annotated(&ids[id], &[], d, &class_names, min_score, &png)?;
    }
    println!(
        "{} images: {} detections (score >= {min_score}); wrote {}",
        order.len(),
        dets.iter()
            .flatten()
            .filter(|d| d.score >= min_score)
            .count(),
        out.display()
    );
    Ok(())
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
