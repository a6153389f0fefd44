//! Drift over rounds end to end: plant 2's lighting changes from round 2 (`[[data.drift]]`).
//! Against the same experiment without the drift, round 1 publishes the very same model (the
//! drift is not in force yet, and runs are repeatable bit for bit) and round 2 another one (the
//! plant trained on its new images); the drifted plant's own test boards with the new look are
//! scored as `plant-02@round-2`, and its agent logged the switch.

mod support;

use std::fs;
use std::path::Path;

use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::run_metrics::RunMetrics;
use fedinspect_simulations::simulate_run::{self, RunOptions};

fn experiment(drift: &str) -> String {
    format!(
        r#"
name = "drift"
seed = 3
[data]
plants = 3
train_per_plant = 4
test_per_plant = 1
image_size = 64
{drift}
[model]
input_size = 64
crop_size = 64
width = 0.25
fpn_width = 16
head_width = 16
[federation]
plants_in_process = true
rounds = 2
learning_rate = 5e-3
batch_size = 2
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

fn run(dir: &Path, name: &str, text: &str) -> (RunMetrics, std::path::PathBuf) {
    let file = dir.join(format!("{name}.toml"));
    fs::write(&file, text).unwrap();
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
    .unwrap_or_else(|e| panic!("run {name}: {e:#}"));
    let m = runs.remove(0);
    let run_dir = out.join("runs").join(&m.label);
    (m, run_dir)
}

#[test]
fn a_plant_whose_lighting_changes_trains_on_its_new_images_from_that_round() {
    let dir = tempfile::tempdir().unwrap();
    let (steady, _) = run(dir.path(), "steady", &experiment(""));
    let (drifting, run_dir) = run(
        dir.path(),
        "drifting",
        &experiment("[[data.drift]]\nplant = 2\nfrom_round = 2\ngain = 0.5\noffset = -10.0\n"),
    );
    let hash = |m: &RunMetrics, round: usize| m.federated[round].model_hash.clone().unwrap();
    assert_eq!(
        hash(&steady, 0),
        hash(&drifting, 0),
        "round 1 must not see the drift"
    );
    assert_ne!(
        hash(&steady, 1),
        hash(&drifting, 1),
        "round 2 must see plant 2's new images"
    );
    support::check_published_versions(&run_dir.join("site"), 2);

    for r in &drifting.federated {
        let plants = &r.scores.as_ref().unwrap().plants;
        assert!(
            plants.contains_key("plant-02@round-2") && plants.contains_key("plant-02"),
            "round {}: {:?}",
            r.round,
            plants.keys()
        );
    }
    let log = fs::read_to_string(run_dir.join("site/logs/plants-in-process.log")).unwrap();
    assert_eq!(
        log.matches("drift: the plant's data changes").count(),
        1,
        "one switch, by plant-02:\n{log}"
    );
    // The drifted boards are the same boards with the new look: same labels, other pixels.
    let data = run_dir.join("plant-data");
    let before = fs::read_to_string(data.join("plant-02/trainval.txt")).unwrap();
    let after = fs::read_to_string(data.join("plant-02@round-2/trainval.txt")).unwrap();
    assert_eq!(before, after);
    let first = before
        .split_whitespace()
        .next()
        .unwrap()
        .replace(".jpg", "_test.jpg");
    let (a, b) = (
        image::open(data.join("plant-02").join(&first))
            .unwrap()
            .to_luma8(),
        image::open(data.join("plant-02@round-2").join(&first))
            .unwrap()
            .to_luma8(),
    );
    let mean =
        |i: &image::GrayImage| i.pixels().map(|p| f64::from(p.0[0])).sum::<f64>() / i.len() as f64;
    assert!(
        mean(&b) < mean(&a) * 0.8,
        "darker: {} vs {}",
        mean(&b),
        mean(&a)
    );
}
