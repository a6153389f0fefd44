//! What the tests of federations of real processes share: the `coordinator` and `client`
//! binaries of this build, a tiny site (synthetic plants of 64x64 boards, a detector of width
//! 0.25), and the independent check of a finished run: every published version is recomputed
//! with the canonical FedAvg from the updates the coordinator stored, each verified against
//! its plant's signature, and its lineage and coordinator signature are checked.

#![allow(dead_code)] // each test binary uses part of this module

#[path = "../../../coordinator/tests/support/relay.rs"]
pub mod relay;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use fedinspect_client::agent::types::codec_family;
use fedinspect_client::config::PUBLIC_KEY_FILE;
use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate};
use fedinspect_common::manifests::{self, UpdateManifest, UPDATE_KIND};
use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::ModelState;
use fedinspect_coordinator::records::{RoundState, UpdateRecord};
use fedinspect_coordinator::storage::{BlobStore, Store};
use fedinspect_simulations::processes::Binaries;
use fedinspect_simulations::site::{PlantSpec, RoundSpec, SiteSpec};
use fedinspect_simulations::synthetic;

/// `simulate run EXPERIMENT --out OUT` in this process with this build's binaries; panics
/// with the error (`what` says which experiment) when the run fails.
pub fn simulate_experiment(
    experiment: PathBuf,
    out: &Path,
    what: &str,
) -> Vec<fedinspect_simulations::run_metrics::RunMetrics> {
    use fedinspect_simulations::interrupt::Interrupt;
    use fedinspect_simulations::simulate_run::{self, RunOptions};
    simulate_run::run(
        &RunOptions {
            experiment,
            data: None,
            out: Some(out.to_path_buf()),
            binaries: Some(binaries_dir()),
        },
        Interrupt::none(),
    )
    .unwrap_or_else(|e| panic!("{what} fails: {e:#}"))
}

/// Side of the tiny synthetic boards.
pub const TINY_SIZE: u32 = 64;

/// The folder of the binaries cargo built for these tests (`target/debug`), each checked to
/// be newer than every source file cargo lists for it in its dep-info file (`<binary>.d`).
pub fn binaries_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/debug/deps/<test> -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .to_path_buf();
    let bins = Binaries::in_dir(&dir).unwrap_or_else(|e| {
        panic!("{e} (`scripts/test.sh` builds them with every test; `cargo test -p fedinspect-simulations` alone does not)")
    });
    for bin in [&bins.coordinator, &bins.client] {
        let built = modified(bin).expect("a binary has a modification time");
        let dep_info = bin.with_extension("d");
        let Ok(text) = std::fs::read_to_string(&dep_info) else {
            println!(
                "not checking that {} is up to date: cargo wrote no {}",
                bin.display(),
                dep_info.display()
            );
            continue;
        };
        for source in dep_info_sources(&text) {
            if modified(&source).is_some_and(|t| t > built) {
                panic!(
                    "{} is older than its source {}: build the binaries again with `scripts/cargo build -p fedinspect-coordinator -p fedinspect-client` (scripts/test.sh does)",
                    bin.display(),
                    source.display()
                );
            }
        }
    }
    dir
}

/// The files a Makefile-style dep-info file (`target: a b\ c`) names as prerequisites.
fn dep_info_sources(text: &str) -> Vec<PathBuf> {
    let first = text.lines().next().unwrap_or_default();
    let Some((_, deps)) = first.split_once(": ") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            ' ' => {
                if !current.is_empty() {
                    out.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(PathBuf::from(current));
    }
    out
}

pub fn binaries() -> Binaries {
    Binaries::in_dir(&binaries_dir()).unwrap()
}

/// Three synthetic plants of `train` (and 2 test) 64x64 boards each, in DeepPCB layout.
pub fn write_tiny_data(root: &Path, train: usize) -> PathBuf {
    synthetic::write_default_dataset(root, 3, train, 2, TINY_SIZE, 1.0, 7).unwrap()
}

/// A site of three plants on `data` with a tiny detector, `rounds` rounds of one local epoch.
pub fn tiny_site(root: &Path, data: &Path, rounds: u64, codec: Codec) -> SiteSpec {
    let plants = (0..3u64)
        .map(|p| PlantSpec {
            id: format!("plant-{}", p + 1),
            data_root: data.to_path_buf(),
            groups: vec![format!("group{:05}", 90000 + p)],
            validation_fraction: 0.0,
            seed: p,
        })
        .collect();
    SiteSpec {
        root: root.to_path_buf(),
        plants,
        arch: fedinspect_common::arch::ArchConfig {
            fpn_width: 16,
            head_width: 16,
            ..SiteSpec::deeppcb_arch(TINY_SIZE, 0.25)
        },
        crop_size: TINY_SIZE,
        round: RoundSpec {
            rounds,
            hold: false,
            min_participants: 2,
            target_participants: 3,
            deadline_secs: 120,
            local_epochs: 1,
            learning_rate: 5e-3,
            fedprox_mu: 0.0,
            batch_size: 2,
            lr_cycle_rounds: 0,
            codec,
        },
        device: "cpu".into(),
        plant_threads: 1,
        warmup_steps: 2,
        seed: 3,
        coordinator_extra: Vec::new(),
    }
}

/// Checks rounds `1..=rounds` of the finished run in `root` (coordinator stopped), with the
/// site layout: each published its version `round + 1` on version `round`, signed by the
/// coordinator; the exported `models/vNNNN.safetensors` is that version; each update was
/// signed by its plant; and the version is, bit for bit, the canonical FedAvg of the stored
/// deltas weighted by their sample counts. Returns each round's updates.
pub fn check_published_versions(root: &Path, rounds: u64) -> BTreeMap<u64, Vec<UpdateRecord>> {
    let data = root.join("coordinator/data");
    let store = Store::open(&data.join("db")).unwrap();
    let blobs = BlobStore::open(&data.join("blobs")).unwrap();
    let pinned = VerifyingKey::load(&root.join("pki/coordinator-signing.pub")).unwrap();
    let exported = |v: u64| {
        ModelState::load_safetensors(&root.join(format!("models/v{v:04}.safetensors")))
            .unwrap()
            .0
    };
    let mut out = BTreeMap::new();
    for r in 1..=rounds {
        let round = store.round(r).unwrap().expect("the round exists");
        assert_eq!(round.state, RoundState::Published, "round {r}: {round:?}");
        let (base_version, version) = (r, r + 1);
        assert_eq!(round.base_version, base_version, "round {r}'s base");
        assert_eq!(
            round.published_version,
            Some(version),
            "round {r}'s version"
        );
        let record = store.model(version).unwrap().unwrap();
        assert_eq!(
            (record.parent, record.round),
            (base_version, r),
            "lineage of v{version}"
        );
        manifests::verify_model(&pinned, version, &record.content_hash.0, &record.signature)
            .unwrap_or_else(|e| panic!("v{version}'s signature: {e}"));
        let base = exported(base_version);
        let published = exported(version);
        assert_eq!(
            published.content_hash(),
            record.content_hash.0,
            "export of v{version}"
        );

        let updates = store.updates_of_round(r).unwrap();
        assert_eq!(updates.len() as u32, round.participants, "round {r}");
        let layout = Layout::of(&base);
        let deltas: Vec<ModelState> = updates
            .iter()
            .map(|u| {
                check_plant_signature(root, u, &base);
                let bytes = blobs.read(&u.delta_sha256).unwrap();
                delta::decode_to_model(bytes.as_slice(), &layout, Some(u.codec)).unwrap()
            })
            .collect();
        let inputs: Vec<PlantUpdate<'_>> = updates
            .iter()
            .zip(&deltas)
            .map(|(u, d)| PlantUpdate::new(u.plant_id.as_str(), u.num_samples, d))
            .collect();
        let expected = aggregate_canonical(&base, &inputs).unwrap();
        assert!(
            published == expected,
            "v{version} is not the canonical FedAvg of round {r}'s stored updates"
        );
        assert!(published != base, "round {r} changed the model");
        let contributors: Vec<(&str, u64)> = record
            .contributors
            .iter()
            .map(|c| (c.plant_id.as_str(), c.num_samples))
            .collect();
        let senders: Vec<(&str, u64)> = updates
            .iter()
            .map(|u| (u.plant_id.as_str(), u.num_samples))
            .collect();
        assert_eq!(contributors, senders, "v{version}'s contributors");
        out.insert(r, updates);
    }
    out
}

/// The update's plant signature verifies with the key in the plant's state folder.
fn check_plant_signature(root: &Path, u: &UpdateRecord, base: &ModelState) {
    let key_path = root
        .join("plants")
        .join(&u.plant_id)
        .join("state")
        .join(PUBLIC_KEY_FILE);
    let key = VerifyingKey::load(&key_path).unwrap();
    let manifest = UpdateManifest {
        kind: UPDATE_KIND.into(),
        plant_id: u.plant_id.clone(),
        update_id: u.update_id.to_hex(),
        round: u.round,
        base_version: u.base_version,
        base_hash: base.content_hash().to_hex(),
        codec: codec_family(u.codec).into(),
        num_samples: u.num_samples,
        payload_sha256: u.delta_sha256.to_hex(),
    };
    manifest
        .verify(&key, &u.plant_signature)
        .unwrap_or_else(|e| panic!("{}'s update of round {}: {e}", u.plant_id, u.round));
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
