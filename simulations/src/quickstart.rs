//! The quickstart (README command one): a federation of three plants on this machine as real
//! processes. It writes a development PKI and the config files ([`Site`]), starts
//! `coordinator serve` and one `client run` per plant over mutual TLS on loopback
//! ([`Federation`]), each plant training on its own DeepPCB board group (or an embedded
//! synthetic plant), waits for every round's published version, exports it through the Admin
//! service, checks its signature, evaluates it on the test split and prints the per-round
//! table. At the end (or on failure, or Ctrl-C) the processes are stopped.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::detector::auto_device;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::Codec;
use fedinspect_common::fsutil;
use fedinspect_common::signing::VerifyingKey;

use crate::evaluation::TestSet;
use crate::evaluator::Evaluator;
use crate::federation::{Federation, REGISTER_WAIT, STOP_GRACE};
use crate::interrupt::Interrupt;
use crate::processes::{describe, Binaries};
use crate::progress::{round_watcher, Clock};
use crate::report::{render_table, RoundRow, FOOTNOTES};
use crate::site::{PlantSpec, RoundSpec, Site, SiteSpec};
use crate::synthetic;
use crate::versions::export_version;

/// DeepPCB board groups used as the three plants when real data is given: distinct boards,
/// 200, 198 and 111 training pairs.
pub const DEEPPCB_PLANTS: [&str; 3] = ["group00041", "group13000", "group92000"];
/// What the quickstart does; the defaults run in about ten minutes on two CPU cores.
#[derive(Clone, Debug)]
pub struct QuickstartConfig {
    /// DeepPCB `PCBData` folder; `None` uses the embedded synthetic plants.
    pub data: Option<PathBuf>,
    /// Where keys, configs, the coordinator's data, models and logs go.
    pub out: PathBuf,
    pub rounds: u32,
    /// Epochs over its own data each plant trains per round (the round plan).
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub codec: Codec,
    pub seed: u64,
    /// Cap on test images evaluated per round (0 = all).
    pub eval_limit: usize,
    /// LibTorch threads of the final evaluation (earlier ones use one thread, beside the
    /// plants' training).
    pub threads: i32,
    /// LibTorch threads of each plant process.
    pub plant_threads: u32,
    /// `training.device` of the plants: auto, cpu or cuda.
    pub device: String,
    /// Share of each plant's data held out for its local before/after mAP.
    pub validation_fraction: f64,
    /// The round deadline; a round with fewer than 2 updates by then fails.
    pub deadline_secs: u64,
    /// The embedded synthetic plants: image side and boards per plant (train, test).
    pub synthetic_size: u32,
    pub synthetic_train: usize,
    pub synthetic_test: usize,
    /// Detector width multiplier (1.0 = the default architecture) and head sizes.
    pub width: f64,
    pub fpn_width: u32,
    pub head_width: u32,
    /// Folder of the `coordinator` and `client` binaries; `None`: beside this program.
    pub binaries: Option<PathBuf>,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        let arch = ArchConfig::default();
        Self {
            data: None,
            out: PathBuf::from(".fedinspect/quickstart"),
            rounds: 4,
            local_epochs: 3,
            batch_size: 8,
            learning_rate: 2e-3,
            codec: Codec::q8(),
            seed: 1,
            eval_limit: 0,
            threads: 2,
            plant_threads: 1,
            device: "auto".into(),
            validation_fraction: 0.1,
            deadline_secs: 600,
            synthetic_size: 320,
            synthetic_train: 96,
            synthetic_test: 24,
            width: arch.width,
            fpn_width: arch.fpn_width,
            head_width: arch.head_width,
            binaries: None,
        }
    }
}

/// Where the plants' data is and how it is fed to the detector.
struct DataPlan {
    root: PathBuf,
    groups: Vec<String>,
    input_size: u32,
    crop: u32,
}

/// Runs the quickstart; returns the per-round rows after printing them.
pub fn run(cfg: &QuickstartConfig, interrupt: Interrupt) -> Result<Vec<RoundRow>> {
    let bins = match &cfg.binaries {
        Some(dir) => Binaries::in_dir(dir)?,
        None => Binaries::beside_current_exe()?,
    };
    fs::create_dir_all(&cfg.out).with_context(|| format!("cannot create {}", cfg.out.display()))?;
    let out = fs::canonicalize(&cfg.out)?;
    for report in ["rounds.txt", "rounds.json"] {
        if out.join(report).exists() {
            fs::remove_file(out.join(report))?;
        }
    }
    let data = prepare_data(cfg, &out)?;
    let reused_pki = out.join("pki/ca.pem").exists();
    let site = Site::create(site_spec(cfg, &out, &data))?;
    println!(
        "{} the development PKI in {}",
        if reused_pki { "reusing" } else { "created" },
        site.pki.root().display()
    );
    let arch = site.spec.arch.clone();
    let pinned = VerifyingKey::load(&site.pki.coordinator_verifying_key())?;
    let test = TestSet::load(&data.root, data.input_size, cfg.eval_limit)?;
    let device = auto_device();
    println!(
        "starting the coordinator and {} plants on {} (mutual TLS); one log per process in {}",
        site.spec.plants.len(),
        site.address,
        site.logs().display()
    );
    let models_dir = site.models();
    let plant_count = site.spec.plants.len();
    let mut fed = Federation::start(site, bins, interrupt.clone())?;
    let plants = fed.wait_for("the plants to register", REGISTER_WAIT, |f| {
        let p = f.plants()?;
        Ok((p.len() >= plant_count).then_some(p))
    })?;
    for (p, spec) in plants.iter().zip(&fed.site().spec.plants) {
        println!(
            "  {}: {} training images of {}",
            p.plant_id,
            p.num_samples,
            spec.groups.join(", ")
        );
    }
    println!(
        "{} rounds of {} local epoch(s), codec {}; test split: {} images on {device:?}",
        cfg.rounds,
        cfg.local_epochs,
        cfg.codec,
        test.len()
    );
    export_version(&mut fed, 1, &models_dir, &pinned)?;

    // Each version is evaluated while the plants train the next round.
    let clock = Clock::start();
    let mut evaluator = Evaluator::start(test, arch, device, cfg.threads, interrupt)?;
    let round_wait = Duration::from_secs(cfg.deadline_secs + 120);
    for round in 1..=u64::from(cfg.rounds) {
        let detail = fed.wait_for_round(round, round_wait, &mut round_watcher(round, &clock))?;
        let model = if detail.round.state == "published" {
            let version = detail.round.published_version;
            println!("round {round}: version {version} published; evaluating it on the test split");
            Some(export_version(&mut fed, version, &models_dir, &pinned)?)
        } else {
            println!("round {round} failed: {}", detail.round.failure);
            None
        };
        evaluator.send(detail, model)?;
    }
    for (name, status) in fed.stop(STOP_GRACE) {
        if !status.success() {
            println!("warning: {name} ended with {}", describe(status));
        }
    }
    let run_dir = fed.site().root().to_path_buf();
    drop(fed);
    let rows = evaluator.finish()?;
    let table = render_table(&rows);
    println!("\n{table}\n{FOOTNOTES}");
    fsutil::write_bytes_atomic(
        &run_dir.join("rounds.json"),
        &serde_json::to_vec_pretty(&rows)?,
    )?;
    fsutil::write_bytes_atomic(
        &run_dir.join("rounds.txt"),
        format!("{table}\n{FOOTNOTES}\n").as_bytes(),
    )?;
    println!(
        "\nthe run is in {}:\n  models/vNNNN.safetensors (exported versions; open with Python's safetensors) and vNNNN.json (signed metadata)\n  coordinator/data (the coordinator's sled database and blobs), plants/<id>/state, logs/, rounds.txt, rounds.json, pki/",
        run_dir.display()
    );
    Ok(rows)
}

fn site_spec(cfg: &QuickstartConfig, out: &Path, data: &DataPlan) -> SiteSpec {
    let arch = ArchConfig {
        fpn_width: cfg.fpn_width,
        head_width: cfg.head_width,
        ..SiteSpec::deeppcb_arch(data.input_size, cfg.width)
    };
    let plants = data
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| PlantSpec {
            id: format!("plant-{}", i + 1),
            data_root: data.root.clone(),
            groups: vec![g.clone()],
            validation_fraction: cfg.validation_fraction,
            seed: cfg.seed + i as u64,
        })
        .collect::<Vec<_>>();
    let n = plants.len() as u32;
    SiteSpec {
        root: out.to_path_buf(),
        plants,
        arch,
        crop_size: data.crop,
        round: RoundSpec {
            rounds: u64::from(cfg.rounds),
            hold: false,
            // All plants take part; a round whose plant fails still publishes with two.
            min_participants: n.min(2),
            target_participants: n,
            deadline_secs: cfg.deadline_secs,
            local_epochs: cfg.local_epochs,
            learning_rate: cfg.learning_rate,
            fedprox_mu: 0.0,
            batch_size: cfg.batch_size,
            lr_cycle_rounds: 0,
            codec: cfg.codec,
        },
        device: cfg.device.clone(),
        plant_threads: cfg.plant_threads,
        warmup_steps: 20,
        seed: cfg.seed,
        coordinator_extra: Vec::new(),
    }
}

fn prepare_data(cfg: &QuickstartConfig, out: &Path) -> Result<DataPlan> {
    let plan = match &cfg.data {
        Some(root) => {
            if !root.join("trainval.txt").is_file() || !root.join("test.txt").is_file() {
                bail!(
                    "{} is not a DeepPCB PCBData folder (no trainval.txt and test.txt); pass the folder that holds them",
                    root.display()
                );
            }
            DataPlan {
                root: fs::canonicalize(root)?,
                groups: DEEPPCB_PLANTS.iter().map(|s| s.to_string()).collect(),
                input_size: 640,
                crop: 320,
            }
        }
        None => {
            let size = cfg.synthetic_size;
            let root = out.join("data").join(format!(
                "synthetic-{size}px-{}train-{}test-seed{}",
                cfg.synthetic_train, cfg.synthetic_test, cfg.seed
            ));
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
                    size,
                    1.0,
                    cfg.seed,
                )?;
            }
            DataPlan {
                root,
                groups: (0..3).map(|p| format!("group{:05}", 90000 + p)).collect(),
                input_size: size,
                // Crops of about 3/5 of the board, like 320 crops of 640 DeepPCB images.
                crop: ((size * 3 / 5) / 32 * 32).clamp(32, size),
            }
        }
    };
    check_groups(&plan)?;
    Ok(plan)
}

/// Fails, listing what there is, unless every plant's group is in the training split.
fn check_groups(plan: &DataPlan) -> Result<()> {
    let train = deeppcb::load(
        &plan.root,
        Split::TrainVal,
        &DeepPcbOptions { template: true },
    )
    .with_context(|| format!("cannot read the training split of {}", plan.root.display()))?;
    let available = train.dataset.groups();
    for g in &plan.groups {
        if !available.contains(g) {
            bail!(
                "board group {g} is not in {}/trainval.txt, which has {available:?}",
                plan.root.display()
            );
        }
    }
    Ok(())
}
