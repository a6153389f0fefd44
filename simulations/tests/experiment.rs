//! The experiment file of `simulate run`: defaults, sweeps (cartesian product, labels),
//! refusals of unknown keys and impossible or unsupported values, and the shipped examples
//! under simulations/experiments/ parse.

use std::path::Path;

use fedinspect_simulations::experiment::{Experiment, ParseFailure, Source, SplitKind};

fn parse(text: &str) -> Result<Experiment, ParseFailure> {
    Experiment::parse(text, "exp", None)
}

fn problems(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_empty_file_gets_the_documented_defaults() {
    let e = parse("").unwrap();
    let s = &e.base;
    assert_eq!(s.name, "exp");
    assert_eq!(s.seed, 1);
    assert_eq!(s.data.source, Source::Synthetic);
    assert_eq!(s.data.split, SplitKind::Group);
    assert_eq!((s.data.plants, s.data.alpha), (3, 1.0));
    assert_eq!((s.data.train_per_plant, s.data.test_per_plant), (64, 16));
    assert_eq!((s.model.input_size, s.model.crop_size), (128, 64));
    assert_eq!((s.data.eval_every, s.data.tail_mean), (1, 0));
    let f = &s.federation;
    assert_eq!((f.rounds, f.local_epochs, f.batch_size), (4, 1, 8));
    assert_eq!(
        (f.codec.as_str(), f.fedprox_mu, f.participation),
        ("q8", 0.0, 1.0)
    );
    assert_eq!(f.strategy, "fedavg");
    assert!(f.enabled && s.baselines.centralised && s.baselines.local_only);
    assert_eq!(e.sweep.len(), 1);
    let runs = e.sweep.expand(&e.base);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].label, "run-01");
    assert_eq!(runs[0].settings, e.base);
}

#[test]
fn deeppcb_defaults_to_its_seven_board_groups_at_640() {
    let e = Experiment::parse("", "d", Some(Path::new("/data/PCBData"))).unwrap();
    let s = &e.base;
    assert_eq!(s.data.source, Source::Deeppcb);
    assert_eq!(s.data.path.as_deref(), Some(Path::new("/data/PCBData")));
    assert_eq!(s.data.plants, 7);
    assert_eq!((s.model.input_size, s.model.crop_size), (640, 320));
}

#[test]
fn a_sweep_is_the_cartesian_product_with_labels_naming_the_values() {
    let e = parse(
        "[federation]\nrounds = 3\n[sweep]\nalpha = [0.1, 10.0]\ncodec = [\"f32\", \"q8\"]\nfedprox_mu = [0.0, 0.01]\n",
    )
    .unwrap();
    let runs = e.sweep.expand(&e.base);
    assert_eq!(runs.len(), 8);
    assert_eq!(runs[0].label, "run-01_alpha-0.1_codec-f32_fedprox_mu-0");
    assert_eq!(runs[7].label, "run-08_alpha-10_codec-q8_fedprox_mu-0.01");
    let combos: Vec<(f64, &str, f64)> = runs
        .iter()
        .map(|r| {
            let s = &r.settings;
            (
                s.data.alpha,
                s.federation.codec.as_str(),
                s.federation.fedprox_mu,
            )
        })
        .collect();
    assert_eq!(combos[0], (0.1, "f32", 0.0));
    assert_eq!(combos[1], (0.1, "f32", 0.01));
    assert_eq!(combos[2], (0.1, "q8", 0.0));
    assert_eq!(combos[5], (10.0, "f32", 0.01));
    for r in &runs {
        assert_eq!(r.settings.federation.rounds, 3, "unswept values stay");
    }
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let m = problems("[federation]\nrounds = 2\nlocal_epoch = 3\n");
    assert!(m.contains("local_epoch"), "{m}");
    let m = problems("[sweep]\nlearning_rates = [0.1]\n");
    assert!(m.contains("learning_rates"), "{m}");
    let m = problems("[plants]\ncount = 3\n");
    assert!(m.contains("plants"), "{m}");
}

#[test]
fn impossible_values_are_refused_all_at_once() {
    let m = problems(
        "[data]\nplants = 1\nalpha = 0\nimage_size = 100\n[federation]\nrounds = 0\nparticipation = 1.5\ncodec = \"q4\"\n",
    );
    for what in [
        "data.plants",
        "data.alpha",
        "data.image_size",
        "federation.rounds",
        "federation.participation",
        "federation.codec",
    ] {
        assert!(m.contains(what), "{what} not named in:\n{m}");
    }
}

#[test]
fn the_baselines_can_run_alone_but_not_nothing_at_all() {
    let e = parse("[federation]\nenabled = false\nrounds = 30\n[baselines]\nlocal_only = false\n")
        .unwrap();
    let s = &e.base;
    assert!(!s.federation.enabled && s.baselines.centralised && !s.baselines.local_only);
    assert_eq!(
        s.federation.rounds, 30,
        "the baselines' budget is still rounds x epochs"
    );
    let m = problems(
        "[federation]\nenabled = false\n[baselines]\ncentralised = false\nlocal_only = false\n",
    );
    assert!(m.contains("nothing to run"), "{m}");
}

#[test]
fn sweep_values_are_checked_per_run_and_pointless_sweeps_refused() {
    let m = problems("[sweep]\nplants = [3, 1]\n");
    assert!(
        m.contains("sweep run run-02_plants-1") && m.contains("data.plants"),
        "{m}"
    );
    let m = problems("[sweep]\nalpha = []\n");
    assert!(m.contains("sweep.alpha: the list is empty"), "{m}");
    let m = problems("[sweep]\nseed = [1, 1]\n");
    assert!(m.contains("listed twice"), "{m}");
    let m = Experiment::parse("[sweep]\nalpha = [0.1, 1.0]\n", "d", Some(Path::new("/p")))
        .unwrap_err()
        .to_string();
    assert!(m.contains("DeepPCB split = \"group\" ignores it"), "{m}");
    let m = problems("[data]\nsource = \"deeppcb\"\n");
    assert!(m.contains("--data"), "{m}");
    let m = Experiment::parse("[data]\nplants = 8\n", "d", Some(Path::new("/p")))
        .unwrap_err()
        .to_string();
    assert!(m.contains("DeepPCB, which has 7"), "{m}");
}

#[test]
fn knobs_the_coordinator_lacks_are_refused_naming_the_missing_support() {
    // Defaults need no support; other values need the coordinator's config to have the key.
    parse("[federation]\nparticipation = 1.0\nstrategy = \"fedavg\"\n").unwrap();
    for (text, key) in [
        (
            "[data]\nplants = 4\n[federation]\nparticipation = 0.5\n",
            "sample_fraction",
        ),
        (
            "[federation]\nstrategy = \"no-such-strategy\"\n",
            "strategy",
        ),
    ] {
        match parse(text) {
            // A coordinator that has the key may still refuse the value: it must say so.
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains(key), "{m}");
            }
            Ok(_) => assert!(
                text.contains("participation"),
                "the coordinator accepted strategy \"no-such-strategy\""
            ),
        }
    }
}

#[test]
fn the_shipped_examples_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // The DeepPCB example needs a data path; any path parses (it is read at run time).
            let e = Experiment::load(&path, Some(Path::new("/nonexistent/PCBData")))
                .or_else(|_| Experiment::load(&path, None))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!e.sweep.expand(&e.base).is_empty());
            seen += 1;
        }
    }
    assert!(
        seen >= 3,
        "expected tiny, synthetic_alpha and deeppcb_7plants in {}",
        dir.display()
    );
}

#[test]
fn eval_every_scores_every_nth_round_and_always_the_last() {
    let every_round = parse("").unwrap().base;
    assert_eq!(every_round.data.eval_every, 1);
    assert!((1..=4).all(|r| every_round.data.scores_round(r, 4)));

    let s = parse("[data]\neval_every = 5\n[federation]\nrounds = 12\n")
        .unwrap()
        .base;
    let scored: Vec<u64> = (1..=12).filter(|&r| s.data.scores_round(r, 12)).collect();
    assert_eq!(scored, [5, 10, 12]);
    // The federation's result is scored even when the rounds after it failed.
    let rounds: Vec<(u64, bool)> = (1..=12).map(|r| (r, r <= 9 && r != 5)).collect();
    assert_eq!(s.data.federated_rounds_scored(&rounds), [9]);
    let rounds: Vec<(u64, bool)> = (1..=12).map(|r| (r, r != 11)).collect();
    assert_eq!(s.data.federated_rounds_scored(&rounds), [5, 10, 12]);

    let refused = problems("[data]\neval_every = 0\n");
    assert!(
        refused.contains("data.eval_every: 0")
            && refused.contains("the last round is always scored"),
        "{refused}"
    );
}
