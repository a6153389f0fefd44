//! The poisoning study of issue 8: 7 synthetic plants, 1 of them malicious, trained in-process
//! with the plant's own training code, aggregated with the federation's own strategies, and
//! scored on the held-out split (map_33, the DeepPCB protocol).
//!
//! Attacks (the malicious plant trains honestly, then): none; its delta boosted ×10; its
//! delta sign-flipped; its sample count claimed ×10. Defences: none (FedAvg); a norm bound
//! (the coordinator's `limits.delta_norm_bound` with `norm_action = "clip"`, applied with the
//! coordinator's own `clip_scale`/`apply_scale`); the coordinate-wise median; the trimmed mean
//! (trim fraction 0.15: one plant of 7 at each end). The row "none" of each defence is its
//! cost when nobody attacks. Prints one table; unknown arguments list the knobs.
//!
//! The norm bound is tuned by an oracle: each round it is 1.5 × the median L2 norm of that
//! round's honest deltas, the best an operator could set. Median and trimmed mean give one
//! vote per plant, so a sample-count lie provably leaves them bit for bit unchanged
//! (`fedavg::robust_tests`); those two cells are taken from the no-attack run, not rerun.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use fedinspect_client::agent::local::{train_config, PlantData};
use fedinspect_client::agent::types::TrainPlan;
use fedinspect_client::config::{
    DataConfig, DataSource, DeviceChoice, ModelConfig, TrainingConfig,
};
use fedinspect_client::data::deeppcb::CLASS_NAMES;
use fedinspect_client::data::{Channels, OnInvalid};
use fedinspect_client::detector::train::train;
use fedinspect_client::detector::Detector;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::{compute_delta, Codec};
use fedinspect_common::fedavg::{CoordinateMedian, FedAvg, PlantUpdate, Strategy, TrimmedMean};
use fedinspect_common::ModelState;
use fedinspect_coordinator::aggregation::{apply_scale, clip_scale};
use fedinspect_simulations::evaluation::TestSet;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::site::SiteSpec;
use fedinspect_simulations::synthetic;
use tch::Device;

const PLANTS: u32 = 7;
/// plant-7 is the malicious one.
const MALICIOUS: usize = 6;
const BOOST: f32 = 10.0;
const LIE: u64 = 10;
const TRIM: f64 = 0.15;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Attack {
    None,
    Boost,
    SignFlip,
    SampleLie,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Defence {
    FedAvg,
    NormBound,
    Median,
    TrimmedMean,
}

struct Knobs {
    out: PathBuf,
    rounds: u64,
    size: u32,
    train: usize,
    test: usize,
    seed: u64,
    epochs: u32,
    lr: f64,
    width: f64,
}

fn knobs() -> Result<Knobs> {
    let mut k = Knobs {
        out: std::env::temp_dir().join("fedinspect-poisoning-study"),
        rounds: 3,
        size: 64,
        train: 10,
        test: 6,
        seed: 7,
        epochs: 1,
        lr: 2e-3,
        width: 0.25,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => k.out = PathBuf::from(value()?),
            "--rounds" => k.rounds = value()?.parse()?,
            "--size" => k.size = value()?.parse()?,
            "--train" => k.train = value()?.parse()?,
            "--test" => k.test = value()?.parse()?,
            "--seed" => k.seed = value()?.parse()?,
            "--epochs" => k.epochs = value()?.parse()?,
            "--lr" => k.lr = value()?.parse()?,
            "--width" => k.width = value()?.parse()?,
            _ => bail!(
                "unknown argument '{a}'; use --out DIR --rounds N --size PX --train N --test N --seed N --epochs N --lr X --width X"
            ),
        }
    }
    Ok(k)
}

/// One plant: its training data and what it trains with.
struct Plant {
    id: String,
    data: PlantData,
    training: TrainingConfig,
}

fn main() -> Result<()> {
    let k = knobs()?;
    let started = Instant::now();
    tch::set_num_threads(1);
    let root = k.out.join(format!(
        "data-{}px-{}train-{}test-seed{}",
        k.size, k.train, k.test, k.seed
    ));
    if !root.join("test.txt").exists() {
        synthetic::write_default_dataset(&root, PLANTS, k.train, k.test, k.size, 1.0, k.seed)?;
    }
    let arch = ArchConfig {
        fpn_width: 16,
        head_width: 16,
        ..SiteSpec::deeppcb_arch(k.size, k.width)
    };
    let names: Vec<String> = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
    let initial = Detector::seeded(arch.clone(), names, Device::Cpu, k.seed)?.state()?;
    let plants = (0..PLANTS)
        .map(|p| load_plant(&root, &arch, p, k.seed))
        .collect::<Result<Vec<_>>>()?;
    let test = TestSet::load(&root, k.size, 0)?;
    println!(
        "{PLANTS} plants x {} training boards of {}px, {} test boards, {} rounds of {} epoch(s) \
         at lr {}, width {}; plant-7 malicious",
        k.train,
        k.size,
        test.len(),
        k.rounds,
        k.epochs,
        k.lr,
        k.width
    );
    let plan = TrainPlan {
        local_epochs: k.epochs,
        learning_rate: k.lr,
        fedprox_mu: 0.0,
        codec: Codec::F32,
        batch_size: 4,
        lr_span: None,
    };
    let attacks = [
        Attack::None,
        Attack::Boost,
        Attack::SignFlip,
        Attack::SampleLie,
    ];
    let defences = [
        Defence::FedAvg,
        Defence::NormBound,
        Defence::Median,
        Defence::TrimmedMean,
    ];
    let mut table = vec![vec![None; defences.len()]; attacks.len()];
    for (a, attack) in attacks.iter().enumerate() {
        for (d, defence) in defences.iter().enumerate() {
            let robust = matches!(defence, Defence::Median | Defence::TrimmedMean);
            if *attack == Attack::SampleLie && robust {
                table[a][d] = table[0][d].clone();
                continue;
            }
            let t = Instant::now();
            // A model that training, aggregation or evaluation finds non-finite has diverged:
            // that is the attack's outcome, recorded as such, not a failure of the study.
            let outcome = run(&plants, &arch, &plan, &initial, *attack, *defence, k.rounds)
                .and_then(|m| test.evaluate(&arch, &m, Device::Cpu, &Interrupt::none()));
            let cell = match outcome {
                Ok(s) => format!("{:.4}", s.map_33),
                Err(e) => {
                    println!("    diverged: {e:#}");
                    "diverged".to_string()
                }
            };
            println!(
                "  attack {attack:?}, defence {defence:?}: map_33 {cell} ({:.0} s)",
                t.elapsed().as_secs_f64()
            );
            table[a][d] = Some(cell);
        }
    }
    let initial_score = test.evaluate(&arch, &initial, Device::Cpu, &Interrupt::none())?;
    println!(
        "\nglobal map_33 after {} rounds (initial model: {:.4})\n",
        k.rounds, initial_score.map_33
    );
    println!("| attack (plant-7) | FedAvg | norm bound (clip) | median | trimmed mean (0.15) |");
    println!("|---|---|---|---|---|");
    let labels = [
        "none".to_string(),
        format!("boosted x{BOOST}"),
        "sign flip".to_string(),
        format!("sample count x{LIE}"),
    ];
    for (label, row) in labels.iter().zip(&table) {
        let cells: Vec<String> = row
            .iter()
            .map(|c| c.clone().unwrap_or_else(|| "-".into()))
            .collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
    let none = &table[0];
    let cost: Vec<String> = none
        .iter()
        .map(|c| {
            let score = |c: &Option<String>| c.as_deref().and_then(|v| v.parse::<f64>().ok());
            match (score(c), score(&none[0])) {
                (Some(v), Some(f)) => format!("{:+.4}", v - f),
                _ => "-".into(),
            }
        })
        .collect();
    println!("| cost with no attack (vs FedAvg) | {} |", cost.join(" | "));
    println!("\n{:.0} s in all", started.elapsed().as_secs_f64());
    Ok(())
}

fn load_plant(root: &Path, arch: &ArchConfig, p: u32, seed: u64) -> Result<Plant> {
    let model = ModelConfig {
        input_size: arch.input_size,
        width: arch.width,
        depth: arch.depth,
        attention: arch.attention,
        fpn_width: arch.fpn_width,
        head_width: arch.head_width,
    };
    let training = TrainingConfig {
        device: DeviceChoice::Cpu,
        threads: Some(1),
        batch_size: None,
        crop_size: arch.input_size,
        warmup_steps: 5,
        seed: seed + u64::from(p),
        mixed_precision: false,
    };
    let data = DataConfig {
        source: DataSource::DeepPcb {
            root: root.to_path_buf(),
            groups: vec![format!("group{:05}", 90000 + p)],
        },
        channels: Channels::GrayTemplate,
        on_invalid: OnInvalid::Skip,
        validation_fraction: 0.0,
    };
    let data = PlantData::load(&data, &model, &training)
        .with_context(|| format!("cannot load plant {p}'s data"))?;
    Ok(Plant {
        id: format!("plant-{}", p + 1),
        data,
        training,
    })
}

/// One federation of `rounds` rounds under `attack` with `defence`; the final global model.
fn run(
    plants: &[Plant],
    arch: &ArchConfig,
    plan: &TrainPlan,
    initial: &ModelState,
    attack: Attack,
    defence: Defence,
    rounds: u64,
) -> Result<ModelState> {
    let trimmed = TrimmedMean::new(TRIM)?;
    let strategy: &dyn Strategy = match defence {
        Defence::FedAvg | Defence::NormBound => &FedAvg,
        Defence::Median => &CoordinateMedian,
        Defence::TrimmedMean => &trimmed,
    };
    let mut global = initial.clone();
    for round in 1..=rounds {
        let mut deltas = Vec::with_capacity(plants.len());
        let mut counts = Vec::with_capacity(plants.len());
        for (i, p) in plants.iter().enumerate() {
            let cfg = train_config(&p.training, plan, round, &global, None);
            let mut det = Detector::from_state(
                arch.clone(),
                p.data.class_names.clone(),
                &global,
                Device::Cpu,
            )?;
            let mut loader = p.data.train_loader(plan.batch_size as usize)?;
            train(&mut det, &mut loader, &cfg, &mut |_| {
                ControlFlow::Continue(())
            })?;
            let mut delta = compute_delta(&det.state()?, &global)?;
            let mut n = p.data.num_samples();
            if i == MALICIOUS {
                match attack {
                    Attack::None => {}
                    Attack::Boost => apply_scale(&mut delta, BOOST),
                    Attack::SignFlip => apply_scale(&mut delta, -1.0),
                    Attack::SampleLie => n *= LIE,
                }
            }
            deltas.push(delta);
            counts.push(n);
        }
        if defence == Defence::NormBound {
            let mut honest: Vec<f64> = deltas
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != MALICIOUS)
                .map(|(_, d)| l2(d))
                .collect();
            honest.sort_by(f64::total_cmp);
            let bound = 1.5 * honest[honest.len() / 2];
            for d in &mut deltas {
                if let Some(scale) = clip_scale(l2(d), bound) {
                    apply_scale(d, scale);
                }
            }
        }
        let updates: Vec<PlantUpdate> = plants
            .iter()
            .zip(&deltas)
            .zip(&counts)
            .map(|((p, d), n)| PlantUpdate::new(p.id.clone(), *n, d))
            .collect();
        global = strategy.aggregate(&global, &updates)?;
    }
    Ok(global)
}

fn l2(d: &ModelState) -> f64 {
    d.iter()
        .flat_map(|(_, t)| t.data().iter())
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}
