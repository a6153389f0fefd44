//! `simulate run` end to end on the tiny experiment (3 synthetic plants, 2 rounds, 64 px
//! boards, a detector of width 0.25): real coordinator and plant processes over mutual TLS,
//! both baselines, and every output file. The numbers are checked against the coordinator:
//! each round's version, model hash and signed metadata as the Admin service exported them,
//! the published versions recomputed as the canonical FedAvg of the stored updates, and the
//! bytes up as the sum of the stored updates' payloads.

mod support;

use std::fs;
use std::path::Path;

use serde_json::Value;

#[test]
fn the_tiny_experiment_writes_consistent_reports() {
    let dir = tempfile::tempdir().unwrap();
    let experiment = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tiny.toml");
    let out = dir.path().join("out");
    let runs = support::simulate_experiment(experiment, &out, "the tiny experiment");
    assert_eq!(runs.len(), 1);
    let m = &runs[0];
    let run_dir = out.join("runs").join(&m.label);

    for file in [
        "summary.csv",
        "report.md",
        "bytes_vs_map33.png",
        "bytes_vs_map33.svg",
    ] {
        assert!(
            out.join(file).is_file(),
            "{file} missing at the output root"
        );
    }
    for stem in [
        "map33_vs_round",
        "map50_vs_round",
        "per_plant_map33",
        "bytes_vs_map33",
    ] {
        let png = image::open(run_dir.join(format!("{stem}.png"))).expect("a readable PNG");
        assert_eq!((png.width(), png.height()), (720, 420), "{stem}.png");
        let svg = fs::read_to_string(run_dir.join(format!("{stem}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{stem}.svg"
        );
    }
    let report = fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(
        report.contains("map33_vs_round.png") && report.contains("[federation]"),
        "{report}"
    );

    // The file's learning-rate cycle reached the coordinator that tasks the plants.
    assert!(
        report.contains("lr_cycle_rounds = 2"),
        "the report's configuration names the cycle: {report}"
    );
    let coordinator_toml =
        fs::read_to_string(run_dir.join("site/coordinator/coordinator.toml")).unwrap();
    assert!(
        coordinator_toml.contains("lr_cycle_rounds = 2"),
        "{coordinator_toml}"
    );

    // The federation: two published rounds, as the coordinator recorded them.
    assert_eq!(m.plants.len(), 3);
    assert_eq!(m.federated.len(), 2);
    let site = run_dir.join("site");
    let updates = support::check_published_versions(&site, 2);
    for r in &m.federated {
        assert_eq!(r.version, Some(r.round + 1), "round {}", r.round);
        let admin: Value = serde_json::from_slice(
            &fs::read(site.join(format!("models/v{:04}.json", r.round + 1))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            r.model_hash.as_deref(),
            admin["content_hash"].as_str(),
            "round {}'s hash differs from the coordinator's",
            r.round
        );
        let stored: u64 = updates[&r.round].iter().map(|u| u.payload_bytes).sum();
        assert_eq!(r.bytes_up, stored, "round {}'s bytes up", r.round);
        assert_eq!(r.participants, 3);
        assert!(r.bytes_down > 0);
        let s = r.scores.as_ref().expect("a published round is scored");
        assert_eq!(s.plants.len(), 3, "every plant's own test set");
    }

    // Scale figures: every plant process's peak memory (Linux) and the round rate.
    assert!(m.rounds_per_hour > 0.0);
    if cfg!(target_os = "linux") {
        assert_eq!(m.memory.plants.len(), 3, "{:?}", m.memory);
        assert!(
            m.memory.plants.values().all(|&b| b > 10 << 20),
            "{:?}",
            m.memory
        );
        assert!(m.memory.coordinator.is_some());
        // Resident memory after each round: every round in the CSV, a chart, the report's table.
        let csv = fs::read_to_string(run_dir.join("memory_by_round.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 3, "{csv}");
        assert!(
            rows[1].starts_with("1,") && rows[2].starts_with("2,"),
            "{csv}"
        );
        assert!(rows[1..]
            .iter()
            .all(|r| r.split(',').all(|c| !c.is_empty())));
        let png = image::open(run_dir.join("memory_vs_round.png")).expect("a readable PNG");
        assert_eq!((png.width(), png.height()), (720, 420));
        assert!(report.contains("| round | 1 | 2 |") && report.contains("memory_vs_round.png"));
    }

    // Baselines with the same number of rounds, every mAP a probability.
    assert_eq!(m.centralised.len(), 2);
    assert_eq!(m.local_only.len(), 2);
    assert_eq!(m.local_only[1].own.len(), 3);
    let json: Value =
        serde_json::from_slice(&fs::read(run_dir.join("metrics.json")).unwrap()).unwrap();
    let mut maps = Vec::new();
    collect_maps(&json, &mut maps);
    assert!(maps.len() > 40, "{} mAP values", maps.len());
    assert!(maps.iter().all(|v| (0.0..=1.0).contains(v)), "{maps:?}");

    // The CSV files say what metrics.json says.
    let fed_csv = fs::read_to_string(run_dir.join("federation_rounds.csv")).unwrap();
    let rows: Vec<&str> = fed_csv.lines().collect();
    assert_eq!(rows.len(), 3, "{fed_csv}");
    let last: Vec<&str> = rows[2].split(',').collect();
    assert_eq!(last[1], "3");
    assert_eq!(Some(last[2]), m.federated[1].model_hash.as_deref());
    let total: u64 = m.federated.iter().map(|r| r.bytes_up).sum();
    assert_eq!(last[6], total.to_string());
    let final_map: f64 = last[9].parse().unwrap();
    assert!((final_map - m.final_federated().unwrap().map_33).abs() < 1e-6);
    let map_csv = fs::read_to_string(run_dir.join("map_by_round.csv")).unwrap();
    // 3 methods x rounds 0..=2 x (global + 3 plants).
    assert_eq!(map_csv.lines().count(), 1 + 3 * 3 * 4, "{map_csv}");
    let summary = fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 2, "{summary}");
    assert!(summary.lines().nth(1).unwrap().starts_with(&m.label));

    // tail_mean = 2: every method's mean of its models after rounds 1 and 2, in the CSV (one
    // row per method and test set: global + 3 plants) and the report.
    let tail_csv = fs::read_to_string(run_dir.join("tail_mean.csv")).unwrap();
    let rows: Vec<Vec<&str>> = tail_csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3 * 4, "{tail_csv}");
    for method in ["federated", "centralised", "local_only"] {
        let of: Vec<_> = rows.iter().filter(|r| r[0] == method).collect();
        assert_eq!(of.len(), 4, "{method}: {tail_csv}");
        assert!(
            of.iter().all(|r| r[1..4] == ["1", "2", "2"]),
            "{method}: {tail_csv}"
        );
    }
    let t = &m.tail_mean;
    let fed = t.federated.as_ref().expect("the federation's tail mean");
    let global: Vec<&str> = rows
        .iter()
        .find(|r| r[0] == "federated" && r[4] == "global")
        .unwrap()
        .clone();
    assert!((global[5].parse::<f64>().unwrap() - fed.scores.global.map_33).abs() < 1e-6);
    assert!(t.centralised.is_some() && t.local_only.as_ref().unwrap().scores.plants.len() == 3);
    assert!(report.contains("## Mean of the last 2 models"), "{report}");
    let ratio_line = if t.centralised.as_ref().unwrap().scores.global.map_33 > 0.0 {
        "of the centralised mean's map_33"
    } else {
        "The centralised mean scores map_33 0: no ratio."
    };
    assert!(report.contains(ratio_line), "{report}");
}

#[test]
fn the_centralised_baseline_runs_alone_from_the_coordinators_initial_model() {
    let dir = tempfile::tempdir().unwrap();
    let tiny =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tiny.toml"))
            .unwrap();
    let text = tiny
        .replace("[federation]\n", "[federation]\nenabled = false\n")
        .replace("local_only = true", "local_only = false");
    assert_ne!(text, tiny);
    let experiment = dir.path().join("centralised_only.toml");
    fs::write(&experiment, text).unwrap();
    let out = dir.path().join("out");
    let runs = support::simulate_experiment(experiment, &out, "the baseline-only experiment");
    let m = &runs[0];
    let run_dir = out.join("runs").join(&m.label);

    assert!(m.federated.is_empty(), "{:?}", m.federated);
    assert!(m.local_only.is_empty());
    assert_eq!(
        m.centralised.len(),
        2,
        "rounds x local_epochs still set the budget"
    );
    // The initial model came from the coordinator: version 1 exported, nothing after it.
    let mut exported: Vec<String> = fs::read_dir(run_dir.join("site/models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    exported.sort();
    assert_eq!(exported, ["v0001.json", "v0001.safetensors"]);
    // The coordinator held: it never opened a round, so no plant started training.
    let log = fs::read_to_string(run_dir.join("site/logs/coordinator.log")).unwrap();
    assert!(
        log.contains("round.hold = true") && !log.contains("round open round="),
        "{log}"
    );

    let report = fs::read_to_string(run_dir.join("report.md")).unwrap();
    assert!(report.contains("| centralised |"), "{report}");
    assert!(
        !report.lines().any(|l| l.starts_with("| federated |")),
        "no federated row among the final models: {report}"
    );
    assert!(!report.contains("of the centralised map_33"), "{report}");
    assert!(
        report.contains("The federation did not run") && !report.contains("rounds per hour"),
        "{report}"
    );
    assert_eq!(m.rounds_per_hour, 0.0);
    let svg = fs::read_to_string(run_dir.join("map33_vs_round.svg")).unwrap();
    assert!(
        svg.contains("centralised") && !svg.contains(">federated<"),
        "{svg}"
    );
    let fed_csv = fs::read_to_string(run_dir.join("federation_rounds.csv")).unwrap();
    assert_eq!(fed_csv.lines().count(), 1, "header only: {fed_csv}");
    // Centralised rounds 0..=2 x (global + 3 plants).
    let map_csv = fs::read_to_string(run_dir.join("map_by_round.csv")).unwrap();
    assert_eq!(map_csv.lines().count(), 1 + 3 * 4, "{map_csv}");
}

#[test]
fn eval_every_scores_every_nth_round_and_the_last_and_keeps_every_rounds_row() {
    let dir = tempfile::tempdir().unwrap();
    let tiny =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tiny.toml"))
            .unwrap();
    let text = tiny
        .replace("tail_mean = 2 ", "tail_mean = 1 ")
        .replace("[data]\n", "[data]\neval_every = 2\n")
        .replace("rounds = 2\n", "rounds = 3\n")
        .replace("lr_cycle_rounds = 2 ", "lr_cycle_rounds = 0 ");
    assert_eq!(text.matches("eval_every = 2").count(), 1, "{text}");
    assert_eq!(text.matches("tail_mean = 1 ").count(), 1, "{text}");
    assert!(text.contains("rounds = 3\n") && text.contains("lr_cycle_rounds = 0 "));
    let experiment = dir.path().join("every_second.toml");
    fs::write(&experiment, text).unwrap();
    let out = dir.path().join("out");
    let runs = support::simulate_experiment(experiment, &out, "the eval_every experiment");
    let m = &runs[0];
    let run_dir = out.join("runs").join(&m.label);

    // Every round published and recorded; only rounds 2 and 3 (the last) scored.
    let fed: Vec<(u64, Option<u64>, bool, bool)> = m
        .federated
        .iter()
        .map(|r| {
            (
                r.round,
                r.version,
                r.model_hash.is_some(),
                r.scores.is_some(),
            )
        })
        .collect();
    assert_eq!(
        fed,
        [
            (1, Some(2), true, false),
            (2, Some(3), true, true),
            (3, Some(4), true, true)
        ]
    );
    let centralised: Vec<u64> = m.centralised.iter().map(|r| r.round).collect();
    let local_only: Vec<u64> = m.local_only.iter().map(|r| r.round).collect();
    assert_eq!(
        (centralised.as_slice(), local_only.as_slice()),
        (&[2, 3][..], &[2, 3][..])
    );
    assert!(
        m.local_only.iter().all(|r| r.own.len() == 3),
        "{:?}",
        m.local_only
    );

    // tail_mean = 1: each method's "mean" is its last model alone, bit for bit, so it
    // scores exactly as that model did on every test set.
    let t = &m.tail_mean;
    let last = |x: &Option<fedinspect_simulations::run_metrics::TailMean>| {
        let x = x.as_ref().expect("a tail mean");
        assert_eq!((x.first_round, x.last_round, x.models), (3, 3, 1));
        x.scores.clone()
    };
    assert_eq!(last(&t.federated), *m.federated[2].scores.as_ref().unwrap());
    assert_eq!(last(&t.centralised), m.centralised[1].scores);
    let local = last(&t.local_only);
    assert_eq!(
        (local.global, local.unseen, &local.plants),
        (
            m.local_only[1].mean_global,
            m.local_only[1].mean_unseen,
            &m.local_only[1].own
        )
    );

    let fed_csv = fs::read_to_string(run_dir.join("federation_rounds.csv")).unwrap();
    let round_1: Vec<&str> = fed_csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!((round_1[0], round_1[1]), ("1", "2"), "{fed_csv}");
    assert_eq!(
        (round_1[9], round_1[10]),
        ("", ""),
        "no map for an unscored round: {fed_csv}"
    );
    let map_csv = fs::read_to_string(run_dir.join("map_by_round.csv")).unwrap();
    // 3 methods x rounds {0, 2, 3} x (global + 3 plants).
    assert_eq!(map_csv.lines().count(), 1 + 3 * 3 * 4, "{map_csv}");
    assert!(
        !map_csv.lines().any(|l| l.split(',').nth(1) == Some("1")),
        "{map_csv}"
    );
}

/// Every number under a `map_33` or `map_50` key.
fn collect_maps(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                if k == "map_33" || k == "map_50" {
                    out.extend(x.as_f64());
                } else {
                    collect_maps(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_maps(x, out)),
        _ => {}
    }
}
