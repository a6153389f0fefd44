//! Bit-for-bit repeatability on CPU: the same experiment run twice with the same seed
//! publishes models with identical content hashes round by round, and another seed publishes
//! other models. The plants are in-process virtual plants (real agents over mutual TLS gRPC
//! to a real coordinator process), two of them training at once, so thread scheduling,
//! upload order and the plants' sampling all get a chance to differ between the runs.
//! Each run's published versions are also recomputed from the coordinator's stored updates
//! (canonical FedAvg), which checks that in-process plants upload what a plant process would.

mod support;

use std::fs;
use std::path::Path;

use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::run_metrics::RunMetrics;
use fedinspect_simulations::simulate_run::{self, RunOptions};

const ROUNDS: u64 = 2;

fn experiment(seed: u64) -> String {
    format!(
        r#"
name = "repeat"
seed = {seed}
[data]
plants = 3
train_per_plant = 4
test_per_plant = 1
image_size = 64
eval_limit = 2
[model]
input_size = 64
crop_size = 64
width = 0.25
fpn_width = 16
head_width = 16
[federation]
plants_in_process = true
rounds = {ROUNDS}
learning_rate = 5e-3
batch_size = 2
codec = "q8"
deadline_secs = 300
warmup_steps = 2
[baselines]
centralised = false
local_only = false
[compute]
device = "cpu"
plant_threads = 1
threads = 1
concurrent_trainings = 2
"#
    )
}

fn run(dir: &Path, name: &str, seed: u64) -> (RunMetrics, Vec<String>) {
    let file = dir.join(format!("{name}.toml"));
    fs::write(&file, experiment(seed)).unwrap();
    let out = dir.join(name);
    let mut runs = simulate_run::run(
        &RunOptions {
            experiment: file,
            data: None,
            out: Some(out.clone()),
            binaries: Some(support::binaries_dir()),
        },
        Interrupt::none(),
    )
    .unwrap_or_else(|e| panic!("run {name} (seed {seed}): {e:#}"));
    let m = runs.remove(0);
    let site = out.join("runs").join(&m.label).join("site");
    support::check_published_versions(&site, ROUNDS);
    let hashes: Vec<String> = m
        .federated
        .iter()
        .map(|r| {
            r.model_hash
                .clone()
                .unwrap_or_else(|| panic!("run {name}: round {} not published", r.round))
        })
        .collect();
    assert_eq!(hashes.len() as u64, ROUNDS, "run {name}");
    (m, hashes)
}

#[test]
fn the_same_seed_publishes_the_same_models_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (first, a) = run(dir.path(), "first", 7);
    let (_, b) = run(dir.path(), "again", 7);
    let (_, c) = run(dir.path(), "other-seed", 8);
    for (round, (x, y)) in a.iter().zip(&b).enumerate() {
        println!("round {}: seed 7 {x} / {y}", round + 1);
        assert_eq!(x, y, "round {}: seed 7 published two models", round + 1);
    }
    for (round, (x, z)) in a.iter().zip(&c).enumerate() {
        println!("round {}: seed 8 {z}", round + 1);
        assert_ne!(
            x,
            z,
            "round {}: seeds 7 and 8 published the same model",
            round + 1
        );
    }
    let memory = &first.memory;
    assert!(memory.in_process.is_some(), "{memory:?}");
    assert!(memory.plants.is_empty(), "no plant process ran: {memory:?}");
    assert_eq!(memory.by_round.len() as u64, ROUNDS, "{memory:?}");
}
