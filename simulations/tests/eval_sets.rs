//! Scoring every test set from the global split's detections: a plant's own test boards (its
//! folder links to the source's groups) get the same map_33 and map_50 as when that folder is
//! decoded and run through the detector on its own, for a model trained enough to find
//! defects; a global split cut short by `eval_limit` no longer holds the plants' images, and
//! their sets are then scored on their own.

use std::collections::BTreeMap;

use fedinspect_client::detector::Detector;
use fedinspect_simulations::baselines::BaselineTrainer;
use fedinspect_simulations::eval_sets::EvalSets;
use fedinspect_simulations::evaluation::TestSet;
use fedinspect_simulations::experiment::Experiment;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::plant_data;

const EXPERIMENT: &str = r#"
name = "eval_sets"
seed = 5
[data]
plants = 3
train_per_plant = 6
test_per_plant = 3
image_size = 64
[model]
input_size = 64
crop_size = 64
width = 0.25
fpn_width = 16
head_width = 16
[federation]
local_epochs = 4
learning_rate = 5e-3
batch_size = 2
warmup_steps = 2
[compute]
device = "cpu"
"#;

#[test]
fn plant_sets_scored_from_the_global_detections_equal_their_own_scoring() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let e = Experiment::parse(EXPERIMENT, "eval_sets", None).unwrap();
    let s = e.sweep.expand(&e.base).remove(0).settings;
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let data = plant_data::prepare(&s, &dir.path().join("data"), &run_dir).unwrap();
    let arch = data.arch(s.model.input_size, s.model.width);
    let names = data.class_names.clone();
    let initial = Detector::seeded(arch.clone(), names, tch::Device::Cpu, 5)
        .unwrap()
        .state()
        .unwrap();
    // A model that finds defects: a few rounds of centralised training on every plant's data.
    let mut trainer = BaselineTrainer::new(
        &data.source,
        &s,
        &arch,
        tch::Device::Cpu,
        5,
        initial,
        Interrupt::none(),
    )
    .unwrap();
    for _ in 0..3 {
        trainer.round().unwrap();
    }
    let model = trainer.round().unwrap().clone();

    let sets = EvalSets::load(&data, &arch, tch::Device::Cpu, 0, Interrupt::none()).unwrap();
    assert_eq!(
        sets.sets_in_global(),
        data.plants.len() + usize::from(data.unseen_test.is_some()),
        "every plant's test boards are images of the global split"
    );
    let scores = sets.score(&model).unwrap();
    let mut own = BTreeMap::new();
    for p in &data.plants {
        let alone = TestSet::load(&p.root, s.model.input_size, 0)
            .unwrap()
            .evaluate(&arch, &model, tch::Device::Cpu, &Interrupt::none())
            .unwrap();
        own.insert(p.id.clone(), (alone.map_33, alone.map_50));
    }
    let shared: BTreeMap<_, _> = scores
        .plants
        .iter()
        .map(|(id, m)| (id.clone(), (m.map_33, m.map_50)))
        .collect();
    println!(
        "global {:?}; per plant, from the global detections {shared:?}, alone {own:?}",
        scores.global
    );
    assert!(
        scores.global.map_33 > 0.0,
        "the model must find defects for the comparison to mean anything: {:?}",
        scores.global
    );
    for (id, (m33, m50)) in &own {
        let (s33, s50) = shared[id];
        assert!(
            (s33 - m33).abs() < 1e-9 && (s50 - m50).abs() < 1e-9,
            "{id}: from the global detections {s33}/{s50}, alone {m33}/{m50}"
        );
    }

    // A global split cut to 2 images holds none of some plants' boards: scored on their own.
    let cut = EvalSets::load(&data, &arch, tch::Device::Cpu, 2, Interrupt::none()).unwrap();
    assert_eq!(cut.global_len(), 2);
    assert!(
        cut.sets_in_global() < data.plants.len(),
        "{} of {} plant sets found in a 2-image global split",
        cut.sets_in_global(),
        data.plants.len()
    );
    let cut_scores = cut.score(&model).unwrap();
    assert_eq!(cut_scores.plants.len(), data.plants.len());
}
