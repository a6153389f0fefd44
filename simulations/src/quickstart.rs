//! The quickstart federation: three plants, each holding its own data, train the real detector
//! locally, send encoded deltas, and the coordinator logic averages them into signed, versioned
//! global models that are evaluated on the held-out test split after every round.
//!
//! This runs in one process: plants and coordinator exchange the exact bytes they would send
//! (the encoded delta stream, the safetensors model), but not over gRPC; the networked
//! coordinator and client replace the in-process hand-over as issues 4 and 5 land. Everything
//! else is the product's code: data loaders, detector, training, codecs, FedAvg, signing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::data::{
    validate, Augment, Channels, Dataset, Loader, LoaderOptions, OnInvalid, Preprocess,
    ValidateOptions,
};
use fedinspect_client::detector::train::{self, Stop, TrainConfig};
use fedinspect_client::detector::{auto_device, DecodeParams, Detector};
use fedinspect_client::eval::{self, EvalReport};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate, StreamingFedAvg};
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::signing::{SignedManifest, SigningKey};
use fedinspect_common::{fsutil, ModelState};
use serde::Serialize;

use crate::synthetic;

/// DeepPCB board groups used as the three plants when real data is given: distinct boards,
/// 200, 198 and 111 training pairs.
pub const DEEPPCB_PLANTS: [&str; 3] = ["group00041", "group13000", "group92000"];

/// What the quickstart does; every field has a default that runs in about ten minutes on two
/// CPU cores.
#[derive(Clone, Debug)]
pub struct QuickstartConfig {
    /// DeepPCB `PCBData` folder; `None` uses the embedded synthetic plants.
    pub data: Option<PathBuf>,
    /// Where models, keys, logs and the report go.
    pub out: PathBuf,
    pub rounds: u32,
    /// Optimizer steps per plant per round (the round's "local epochs", in steps).
    pub local_steps: u64,
    pub batch_size: usize,
    pub codec: Codec,
    pub seed: u64,
    /// Cap on test images evaluated per round (0 = all).
    pub eval_limit: usize,
    pub threads: i32,
    /// The embedded synthetic plants: image side and boards per plant (train, test).
    pub synthetic_size: u32,
    pub synthetic_train: usize,
    pub synthetic_test: usize,
    /// Detector width multiplier (1.0 = the default architecture).
    pub width: f64,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        Self {
            data: None,
            out: PathBuf::from(".fedinspect/quickstart"),
            rounds: 4,
            local_steps: 60,
            batch_size: 8,
            codec: Codec::q8(),
            seed: 1,
            eval_limit: 0,
            threads: 2,
            synthetic_size: 320,
            synthetic_train: 96,
            synthetic_test: 24,
            width: 1.0,
        }
    }
}

/// One row of the per-round table.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRow {
    pub round: u32,
    pub version: u64,
    pub participants: usize,
    pub map_33: f64,
    pub map_50: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub seconds: f64,
    pub train_seconds: f64,
    pub encode_seconds: f64,
    pub aggregate_seconds: f64,
    pub publish_seconds: f64,
    pub eval_seconds: f64,
    pub model_hash: String,
}

/// The signed record of one global model version (written next to its safetensors file).
#[derive(Clone, Debug, Serialize)]
struct VersionManifest {
    version: u64,
    parent: Option<u64>,
    round: u32,
    content_hash: String,
    file: String,
    contributors: Vec<Contribution>,
    metrics: BTreeMap<String, f64>,
    created_unix_ms: u128,
}

#[derive(Clone, Debug, Serialize)]
struct Contribution {
    plant: String,
    num_samples: u64,
    delta_sha256: String,
    codec: String,
    bytes: u64,
}

/// A plant: its name, training data and the loader serving it.
struct Plant {
    name: String,
    loader: Loader,
    samples: u64,
}

/// Runs the quickstart and returns the per-round rows; prints progress and the table.
pub fn run(cfg: &QuickstartConfig) -> Result<Vec<RoundRow>> {
    tch::set_num_threads(cfg.threads);
    fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let out = fs::canonicalize(&cfg.out)?;
    let models_dir = out.join("models");
    let updates_dir = out.join("updates");
    // A rerun replaces the previous run's models, updates and report; keys and data are reused.
    for dir in [&models_dir, &updates_dir] {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
    }

    let pki_dir = out.join("pki");
    let layout = if pki_dir.join("ca.pem").exists() {
        println!("reusing the development PKI in {}", pki_dir.display());
        PkiLayout::new(&pki_dir)
    } else {
        let opts = InitOptions {
            plants: vec!["plant-1".into(), "plant-2".into(), "plant-3".into()],
            ..InitOptions::default()
        };
        let layout = pki::init(&pki_dir, &opts).context("creating the development PKI")?;
        println!("created a development PKI in {}", pki_dir.display());
        layout
    };
    let signing_key = SigningKey::load(&layout.coordinator_signing_key())?;

    let (plants, test, class_names, input_size) = prepare_data(cfg, &out)?;
    let device = auto_device();
    let arch = ArchConfig {
        in_channels: 2,
        num_classes: class_names.len() as u32,
        input_size,
        width: cfg.width,
        ..ArchConfig::default()
    };
    let preprocess = Preprocess {
        input_size,
        channels: Channels::GrayTemplate,
        clahe: None,
    };
    let test_loader = Loader::new(
        limit(test, cfg.eval_limit),
        preprocess.clone(),
        Augment::none(input_size),
        LoaderOptions {
            batch_size: 4,
            cache: true,
            ..LoaderOptions::default()
        },
    )?;
    println!(
        "device {device:?}; {} plants: {}; test split: {} images; codec {}",
        plants.len(),
        plants
            .iter()
            .map(|p| format!("{} ({} images)", p.name, p.samples))
            .collect::<Vec<_>>()
            .join(", "),
        test_loader.dataset().len(),
        cfg.codec
    );

    let init = Detector::seeded(arch.clone(), class_names.clone(), device, cfg.seed)?;
    let mut global = init.state()?;
    let mut version = 1u64;
    publish(
        &models_dir,
        &signing_key,
        &global,
        version,
        None,
        0,
        vec![],
        BTreeMap::new(),
    )?;
    let mut rows = Vec::new();
    for round in 1..=cfg.rounds {
        let started = Instant::now();
        let base_bytes = global.to_safetensors_bytes(&BTreeMap::new())?.len() as u64;
        let base_layout = Layout::of(&global);
        let mut streaming = StreamingFedAvg::begin(&global);
        let mut received: Vec<(String, u64, ModelState)> = Vec::new();
        let mut contributions = Vec::new();
        let (mut bytes_up, mut bytes_down) = (0u64, 0u64);
        let (mut train_s, mut encode_s) = (0.0, 0.0);
        for (i, plant) in plants.iter().enumerate() {
            // Plant side: the base model arrives, training runs, the delta leaves encoded.
            bytes_down += base_bytes;
            let mut det = Detector::from_state(arch.clone(), class_names.clone(), &global, device)?;
            let t = Instant::now();
            let train_cfg = TrainConfig {
                stop: Stop::Steps(cfg.local_steps),
                seed: cfg.seed ^ ((round as u64) << 16) ^ i as u64,
                warmup_steps: if round == 1 { 20 } else { 0 },
                ..TrainConfig::default()
            };
            let label = format!("round {round}/{} {}", cfg.rounds, plant.name);
            train::train(
                &mut det,
                // The loader is its own BatchSource; a clone shares its image cache.
                &mut plant.loader.clone(),
                &train_cfg,
                &mut |p| {
                    if p.step % 10 == 0 || Some(p.step) == p.total_steps {
                        eprint!(
                            "\r  {label}: step {}/{} loss {:.3} {:.1} img/s   ",
                            p.step,
                            p.total_steps.unwrap_or(cfg.local_steps),
                            p.loss,
                            p.images_per_sec
                        );
                    }
                    ControlFlow::Continue(())
                },
            )?;
            eprintln!();
            train_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let local = det.state()?;
            let delta = delta::compute_delta(&local, &global)?;
            let mut wire = Vec::new();
            delta::encode(&delta, cfg.codec, &mut wire)?;
            encode_s += t.elapsed().as_secs_f64();
            bytes_up += wire.len() as u64;
            // What a coordinator keeps of an update: the payload, content-addressed.
            fsutil::write_bytes_atomic(
                &updates_dir.join(format!("round-{round:03}-{}.delta", plant.name)),
                &wire,
            )?;

            // Coordinator side: decode against the base into the streaming accumulator, keep
            // the decoded delta for the canonical computation.
            let decoded = delta::decode_to_model(wire.as_slice(), &base_layout, Some(cfg.codec))?;
            streaming.add(&plant.name, &decoded, plant.samples)?;
            contributions.push(Contribution {
                plant: plant.name.clone(),
                num_samples: plant.samples,
                delta_sha256: sha256_hex(&wire),
                codec: cfg.codec.to_string(),
                bytes: wire.len() as u64,
            });
            received.push((plant.name.clone(), plant.samples, decoded));
        }
        let t = Instant::now();
        let updates: Vec<PlantUpdate<'_>> = received
            .iter()
            .map(|(name, n, d)| PlantUpdate::new(name.clone(), *n, d))
            .collect();
        let next = aggregate_canonical(&global, &updates)?;
        let preview = streaming.finish(&global)?;
        let aggregate_s = t.elapsed().as_secs_f64();
        let max_diff = max_abs_diff(&preview, &next);

        let t = Instant::now();
        let mut det = Detector::from_state(arch.clone(), class_names.clone(), &next, device)?;
        let eval = evaluate(&mut det, &test_loader)?;
        let eval_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        version += 1;
        let mut metrics = BTreeMap::new();
        metrics.insert("map_33".to_string(), eval.map_33);
        metrics.insert("map_50".to_string(), eval.map_50);
        metrics.insert("map_50_95".to_string(), eval.map_50_95);
        let hash = publish(
            &models_dir,
            &signing_key,
            &next,
            version,
            Some(version - 1),
            round,
            contributions,
            metrics,
        )?;
        let publish_s = t.elapsed().as_secs_f64();
        global = next;
        let row = RoundRow {
            round,
            version,
            participants: plants.len(),
            map_33: eval.map_33,
            map_50: eval.map_50,
            bytes_up,
            bytes_down,
            seconds: started.elapsed().as_secs_f64(),
            train_seconds: train_s,
            encode_seconds: encode_s,
            aggregate_seconds: aggregate_s,
            publish_seconds: publish_s,
            eval_seconds: eval_s,
            model_hash: hash,
        };
        println!(
            "round {round}: version {version} published, map_33 {:.3} map_50 {:.3} \
             (streaming preview within {max_diff:.1e} of the canonical model)",
            eval.map_33, eval.map_50
        );
        rows.push(row);
    }
    let table = render_table(&rows);
    println!("\n{table}");
    fsutil::write_bytes_atomic(&out.join("rounds.json"), &serde_json::to_vec_pretty(&rows)?)?;
    fsutil::write_bytes_atomic(&out.join("rounds.txt"), table.as_bytes())?;
    println!(
        "models, signed manifests and the round table are in {}\n  models/v*.safetensors (open with Python's safetensors), models/v*.manifest.json, rounds.json, pki/",
        out.display()
    );
    Ok(rows)
}

type PreparedData = (Vec<Plant>, Dataset, Vec<String>, u32);

fn prepare_data(cfg: &QuickstartConfig, out: &Path) -> Result<PreparedData> {
    let (root, groups, input_size, crop): (PathBuf, Vec<String>, u32, u32) = match &cfg.data {
        Some(root) => {
            if !root.join("trainval.txt").exists() {
                bail!(
                    "{} is not a DeepPCB PCBData folder (no trainval.txt); pass the folder that holds trainval.txt and test.txt",
                    root.display()
                );
            }
            (
                root.clone(),
                DEEPPCB_PLANTS.iter().map(|s| s.to_string()).collect(),
                640,
                320,
            )
        }
        None => {
            let root = out.join("data").join("synthetic");
            if !root.join("test.txt").exists() {
                println!(
                    "no data path given: generating the embedded synthetic plants in {} \
                     (run with --data /path/to/deeppcb/PCBData for real PCB data)",
                    root.display()
                );
                synthetic::write_default_dataset(
                    &root,
                    3,
                    cfg.synthetic_train,
                    cfg.synthetic_test,
                    cfg.synthetic_size,
                    1.0,
                    cfg.seed,
                )?;
            }
            let size = cfg.synthetic_size;
            // Train on crops of about 3/5 of the board, like 320 crops of 640 DeepPCB images.
            let crop = ((size * 3 / 5) / 32 * 32).max(32).min(size);
            (
                root,
                (0..3).map(|p| format!("group{:05}", 90000 + p)).collect(),
                size,
                crop,
            )
        }
    };
    let opts = DeepPcbOptions { template: true };
    let check = ValidateOptions {
        channels: Channels::GrayTemplate,
        decode: false,
        on_invalid: OnInvalid::Skip,
    };
    let train = validate(deeppcb::load(&root, Split::TrainVal, &opts)?, &check)?;
    let test = validate(deeppcb::load(&root, Split::Test, &opts)?, &check)?;
    for (what, v) in [("train", &train), ("test", &test)] {
        if !v.report.is_clean() {
            println!("{what} split: {}", v.report);
        }
    }
    let class_names = train.dataset.class_names.clone();
    let preprocess = Preprocess {
        input_size,
        channels: Channels::GrayTemplate,
        clahe: None,
    };
    let augment = Augment {
        crop_size: crop,
        ..Augment::default()
    };
    let by_group = train.dataset.split_by_group();
    let mut plants = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let data = by_group
            .get(g)
            .cloned()
            .with_context(|| format!("board group {g} is not in the training split"))?;
        let samples = data.len() as u64;
        let loader = Loader::new(
            data,
            preprocess.clone(),
            augment.clone(),
            LoaderOptions {
                batch_size: cfg.batch_size,
                seed: cfg.seed + i as u64,
                ..LoaderOptions::default()
            },
        )?;
        plants.push(Plant {
            name: format!("plant-{}-{}", i + 1, g.trim_start_matches("group")),
            loader,
            samples,
        });
    }
    Ok((plants, test.dataset, class_names, input_size))
}

fn limit(mut data: Dataset, n: usize) -> Dataset {
    if n > 0 && data.items.len() > n {
        data.items.truncate(n);
    }
    data
}

fn evaluate(det: &mut Detector, loader: &Loader) -> Result<EvalReport> {
    let params = DecodeParams::default();
    let started = Instant::now();
    let mut by_id = Vec::new();
    for batch in loader.eval_batches() {
        let dets = det.detect(&batch, &params)?;
        by_id.extend(batch.ids.iter().cloned().zip(dets));
    }
    let seconds = started.elapsed().as_secs_f64();
    let data = loader.dataset();
    let dets = eval::align_detections(data, by_id);
    Ok(eval::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        0.3,
        seconds,
    )?)
}

#[allow(clippy::too_many_arguments)]
fn publish(
    dir: &Path,
    key: &SigningKey,
    model: &ModelState,
    version: u64,
    parent: Option<u64>,
    round: u32,
    contributors: Vec<Contribution>,
    metrics: BTreeMap<String, f64>,
) -> Result<String> {
    let hash = model.content_hash().to_hex();
    let file = format!("v{version:04}.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("version".to_string(), version.to_string());
    meta.insert("round".to_string(), round.to_string());
    meta.insert("content_hash".to_string(), hash.clone());
    model.save_safetensors(&dir.join(&file), &meta)?;
    let manifest = VersionManifest {
        version,
        parent,
        round,
        content_hash: hash.clone(),
        file,
        contributors,
        metrics,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    };
    let signed = SignedManifest::sign(&manifest, key)?;
    fsutil::write_bytes_atomic(
        &dir.join(format!("v{version:04}.manifest.json")),
        &serde_json::to_vec_pretty(&signed)?,
    )?;
    Ok(hash)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn max_abs_diff(a: &ModelState, b: &ModelState) -> f32 {
    a.iter()
        .zip(b.iter())
        .flat_map(|((_, x), (_, y))| x.data().iter().zip(y.data()).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// The per-round table, as printed.
pub fn render_table(rows: &[RoundRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| round | version | participants | map_33 | map_50 | bytes up | bytes down | seconds | train s | encode s | aggregate s | publish s | eval s |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.3} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} |",
            r.round,
            r.version,
            r.participants,
            r.map_33,
            r.map_50,
            human_bytes(r.bytes_up),
            human_bytes(r.bytes_down),
            r.seconds,
            r.train_seconds,
            r.encode_seconds,
            r.aggregate_seconds,
            r.publish_seconds,
            r.eval_seconds
        );
    }
    s
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}
