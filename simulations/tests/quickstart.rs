//! The main job on tiny synthetic plants: `quickstart::run` starts the coordinator and three
//! plant clients as processes, prints a row per round with the mAP of the exported version,
//! and leaves the run's models and logs in its folder; every version it published is then
//! recomputed independently (canonical FedAvg of the stored, plant-signed deltas). A second
//! run in the same folder replaces the first and keeps the keys.

mod support;

use std::fs;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::quickstart::{self, QuickstartConfig};

#[test]
fn quickstart_runs_processes_reports_each_round_and_reruns_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = QuickstartConfig {
        out: out.clone(),
        rounds: 2,
        local_epochs: 1,
        batch_size: 2,
        codec: Codec::F16,
        threads: 1,
        plant_threads: 1,
        device: "cpu".into(),
        validation_fraction: 0.25,
        deadline_secs: 120,
        synthetic_size: support::TINY_SIZE,
        synthetic_train: 4,
        synthetic_test: 2,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        binaries: Some(support::binaries_dir()),
        ..QuickstartConfig::default()
    };
    let rows = quickstart::run(&cfg, Interrupt::none()).expect("the quickstart runs");
    assert_eq!(rows.len(), 2);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.round, i as u64 + 1);
        assert_eq!(r.version, Some(i as u64 + 2));
        assert_eq!(r.participants, 3);
        assert!(r.bytes_up > 0 && r.bytes_down > r.bytes_up, "{r:?}");
        assert!((0.0..=1.0).contains(&r.map_33.unwrap()), "{r:?}");
        assert!(r.seconds > 0.0 && r.train_seconds > 0.0, "{r:?}");
        // The plants report their time split (the slowest plant's part of each, each within
        // the round).
        for part in [r.download_seconds, r.encode_seconds] {
            assert!(part > 0.0 && part < r.seconds, "{r:?}");
        }
    }
    let v3 = ModelState::load_safetensors(&out.join("models/v0003.safetensors"))
        .unwrap()
        .0;
    assert_eq!(
        rows[1].model_hash.as_deref(),
        Some(v3.content_hash().to_hex().as_str())
    );
    for log in ["coordinator", "plant-1", "plant-2", "plant-3"] {
        let text = fs::read_to_string(out.join(format!("logs/{log}.log"))).unwrap();
        assert!(!text.is_empty(), "{log}.log is empty");
    }
    let table = fs::read_to_string(out.join("rounds.txt")).unwrap();
    assert!(table.contains("| 2 | 3 | 3 |"), "{table}");
    support::check_published_versions(&out, 2);

    // Again in the same folder: the run is replaced, the keys stay.
    let key = fs::read(out.join("pki/coordinator-signing.pub")).unwrap();
    let rows = quickstart::run(&QuickstartConfig { rounds: 1, ..cfg }, Interrupt::none())
        .expect("the second run");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        fs::read(out.join("pki/coordinator-signing.pub")).unwrap(),
        key
    );
    assert!(out.join("models/v0002.safetensors").exists());
    assert!(!out.join("models/v0003.safetensors").exists());
    support::check_published_versions(&out, 1);
}
