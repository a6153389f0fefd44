//! Bundle push end to end: a real coordinator with a `[bundles]` section (canary plant-1) and
//! three real plant agents over mutual TLS on 127.0.0.1, fresh PKI, a tiny detector. No round
//! runs (min_participants is above the plant count): only install tasks flow.
//!
//! Promotion of version 2 builds its bundle and sends it to the canary only; the canary
//! downloads, verifies, installs and reports. An admin confirms over the Admin service and the
//! other plants install it. An admin rollback pushes version 1's bundle to everyone, with
//! version 2's kept as previous. A bundle whose stored archive was tampered with is refused by
//! every plant, each reports the refusal, and version 1's bundle keeps running. Every report
//! shows in `admin bundle status` and the audit log.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedinspect_client::agent::types::InstallOutcome;
use fedinspect_client::agent::{Agent, Event};
use fedinspect_client::bundle::BundleInstaller;
use fedinspect_client::config::Config;
use fedinspect_client::data::deeppcb::CLASS_NAMES;
use fedinspect_client::detector::Detector;
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::ModelState;
use fedinspect_coordinator::bundle::{
    BundleConfig, RawBundleSettings, RolloutReason, RolloutStage,
};
use fedinspect_coordinator::config::{Limits, RoundPolicy};
use fedinspect_coordinator::hub::Hub;
use fedinspect_coordinator::records::ModelStatus;
use fedinspect_coordinator::rpc::admin_client::{self, AdminCommand};
use fedinspect_coordinator::versions::{NewVersion, Versions};
use fedinspect_coordinator::{admin_ops, Config as CoordinatorConfig, Coordinator, Running};
use tokio::sync::{mpsc, watch};

mod federation_site;

use federation_site::{tiny_arch, write_plant_data};

const PLANTS: usize = 3;
const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_pushes_to_the_canary_then_all_rollback_restores_and_tampering_is_refused() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = pki::init(&root.join("pki"), &InitOptions::with_plant_count(PLANTS)).unwrap();
    let names: Vec<String> = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
    let initial = Detector::seeded(tiny_arch(), names.clone(), tch::Device::Cpu, 7)
        .unwrap()
        .state()
        .unwrap();
    initial
        .save_safetensors(&root.join("initial.safetensors"), &BTreeMap::new())
        .unwrap();
    let running = start_coordinator(root, &pki, &names).await;
    let hub = running.hub().clone();
    let address = format!("https://127.0.0.1:{}", running.local_addr().port());

    let (stop, stopped) = watch::channel(false);
    let mut agents = Vec::new();
    let mut events = Vec::new();
    for i in 1..=PLANTS {
        let mut agent = Agent::build(plant_config(root, &pki, i, &address)).unwrap();
        events.push(agent.events());
        agents.push(tokio::spawn(agent.run(stopped.clone())));
    }
    wait_until("all plants connected", || hub.connected().len() == PLANTS).await;

    // Promote version 2: its bundle goes to the canary only.
    store_version(&hub, 2, &perturbed(&initial, 0.01));
    admin_ops::promote(&hub, "tester", 2, true).await.unwrap();
    let installed = next_install(&mut events[0]).await;
    assert!(installed.ok, "{installed:?}");
    assert!(installed.bundle_id.starts_with("v2-"), "{installed:?}");
    assert!(
        installed.message.contains("installed bundle v2-"),
        "{installed:?}"
    );
    assert!(
        !installed.engine_built_locally,
        "a CPU plant builds no engine"
    );
    let push = hub.bundles.get().unwrap().clone();
    wait_until("the canary's report recorded", || {
        push.current().is_some_and(|r| r.installed_at("plant-1"))
    })
    .await;
    let rollout = push.current().unwrap();
    assert_eq!(rollout.stage, RolloutStage::Canary);
    assert_eq!(rollout.reason, RolloutReason::Promotion);
    assert!(rollout.plants["plant-1"].canary);
    for p in ["plant-2", "plant-3"] {
        assert!(!rollout.plants.contains_key(p), "{p} got the canary push");
    }
    let v2_id = rollout.bundle_id.clone();
    assert_eq!(
        current_bundle(root, &pki, 1).as_deref(),
        Some(v2_id.as_str())
    );
    assert_eq!(current_bundle(root, &pki, 2), None);

    // An admin confirms over the Admin service: plants 2 and 3 install it.
    let admin_files = pki.admin_files();
    let status = admin_client::run(
        &address,
        &admin_files,
        AdminCommand::BundleConfirm {
            version: 2,
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(status["current"]["stage"], "all", "{status}");
    assert_eq!(status["current"]["confirmed_by"], "admin:admin", "{status}");
    for rx in &mut events[1..] {
        let o = next_install(rx).await;
        assert!(o.ok && o.bundle_id == v2_id, "{o:?}");
    }
    wait_until("every plant's report recorded", || {
        push.current()
            .is_some_and(|r| (1..=PLANTS).all(|i| r.installed_at(&format!("plant-{i}"))))
    })
    .await;
    for i in 1..=PLANTS {
        assert_eq!(
            current_bundle(root, &pki, i).as_deref(),
            Some(v2_id.as_str())
        );
    }

    // Rollback to version 1: its bundle goes to every plant; v2's stays as previous.
    admin_ops::rollback(&hub, "tester", 0).await.unwrap();
    let mut v1_id = String::new();
    for rx in &mut events {
        let o = next_install(rx).await;
        assert!(o.ok && o.bundle_id.starts_with("v1-"), "{o:?}");
        v1_id = o.bundle_id;
    }
    assert_eq!(push.current().unwrap().reason, RolloutReason::Rollback);
    assert_eq!(push.current().unwrap().stage, RolloutStage::All);
    for i in 1..=PLANTS {
        let (current, previous) = pointer(root, &pki, i);
        assert_eq!(current.as_deref(), Some(v1_id.as_str()));
        assert_eq!(previous.as_deref(), Some(v2_id.as_str()));
    }

    // A bundle whose stored archive was altered: every plant refuses it, v1 keeps running.
    store_version(&hub, 3, &perturbed(&initial, 0.02));
    let built = {
        let (push, hub) = (push.clone(), hub.clone());
        tokio::task::spawn_blocking(move || push.build_version(&hub, 3))
            .await
            .unwrap()
            .unwrap()
    };
    let mut archive = std::fs::read(&built.archive).unwrap();
    let at = data_offset(&archive, "weights.safetensors") + 4000;
    archive[at] ^= 0x20;
    std::fs::write(&built.archive, &archive).unwrap();
    push.start_rollout(&hub, &built, RolloutReason::Rollback)
        .unwrap();
    for rx in &mut events {
        let o = next_install(rx).await;
        assert!(!o.ok, "{o:?}");
        assert_eq!(o.bundle_id, built.id);
        assert!(
            o.message
                .starts_with("bundle refused, the running bundle stays:")
                && o.message.contains("SHA-256"),
            "{o:?}"
        );
    }
    wait_until("the refusals recorded", || {
        push.current().is_some_and(|r| {
            r.plants
                .values()
                .filter(|p| p.report.as_ref().is_some_and(|r| !r.ok))
                .count()
                == PLANTS
        })
    })
    .await;
    for i in 1..=PLANTS {
        assert_eq!(
            current_bundle(root, &pki, i).as_deref(),
            Some(v1_id.as_str())
        );
    }

    // The admin sees each report; the audit log has them.
    let status = admin_client::run(&address, &admin_files, AdminCommand::BundleStatus)
        .await
        .unwrap();
    let plants = status["current"]["plants"].as_array().unwrap();
    assert_eq!(plants.len(), PLANTS, "{status}");
    for p in plants {
        assert_eq!(p["result"], "failed", "{status}");
        assert!(
            p["message"].as_str().unwrap().contains("refused"),
            "{status}"
        );
    }
    let audit = hub.store.audit_entries(1000).unwrap();
    let reports = |needle: &str| {
        audit
            .iter()
            .filter(|a| a.action == "install_report" && a.detail.contains(needle))
            .count()
    };
    assert_eq!(reports(&format!("bundle {v2_id}: installed")), PLANTS);
    assert_eq!(reports(&format!("bundle {}: FAILED", built.id)), PLANTS);
    assert!(audit
        .iter()
        .any(|a| a.action == "bundle_confirm" && a.actor == "admin:admin"));
    assert_eq!(
        hub.store.model(2).unwrap().unwrap().status,
        ModelStatus::RolledBack
    );

    stop.send(true).unwrap();
    for a in agents {
        tokio::time::timeout(WAIT, a)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    running.stop(Duration::from_secs(10)).await.unwrap();
}

/// Offset of `name`'s data inside a bundle archive.
fn data_offset(archive: &[u8], name: &str) -> usize {
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            return entry.raw_file_position() as usize;
        }
    }
    panic!("{name} not in the archive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_s_plants_send_calibration_ranges_that_make_the_int8_variant() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = pki::init(&root.join("pki"), &InitOptions::with_plant_count(1)).unwrap();
    let names: Vec<String> = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
    Detector::seeded(tiny_arch(), names.clone(), tch::Device::Cpu, 7)
        .unwrap()
        .state()
        .unwrap()
        .save_safetensors(&root.join("initial.safetensors"), &BTreeMap::new())
        .unwrap();
    let round = RoundPolicy {
        min_participants: 1,
        target_participants: 1,
        max_rounds: 1,
        ..RoundPolicy::default()
    };
    let running = start_coordinator_with(root, &pki, &names, round).await;
    let hub = running.hub().clone();
    let address = format!("https://127.0.0.1:{}", running.local_addr().port());
    let (stop, stopped) = watch::channel(false);
    let agent = Agent::build(plant_config(root, &pki, 1, &address)).unwrap();
    let agent = tokio::spawn(agent.run(stopped));
    let ranges = root.join("coordinator/bundles/calibration/round-1/plant-1.json");
    wait_until("version 2 published and the plant's ranges stored", || {
        hub.store.model(2).unwrap().is_some() && ranges.is_file()
    })
    .await;
    let push = hub.bundles.get().unwrap().clone();
    let built = {
        let (push, hub) = (push.clone(), hub.clone());
        tokio::task::spawn_blocking(move || push.build_version(&hub, 2))
            .await
            .unwrap()
            .unwrap()
    };
    let int8 = built
        .manifest
        .file_with_role(fedinspect_common::bundle::FileRole::OnnxInt8Qdq)
        .expect("the plant's ranges cover every quantised activation");
    println!(
        "bundle {} of version 2 with {} ({} bytes) from plant-1's ranges",
        built.id, int8.name, int8.size
    );
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    running.stop(Duration::from_secs(10)).await.unwrap();
}

async fn start_coordinator(root: &Path, pki: &PkiLayout, names: &[String]) -> Running {
    // No round opens: more participants needed than there are plants.
    let round = RoundPolicy {
        min_participants: 10,
        target_participants: 10,
        ..RoundPolicy::default()
    };
    start_coordinator_with(root, pki, names, round).await
}

async fn start_coordinator_with(
    root: &Path,
    pki: &PkiLayout,
    names: &[String],
    round: RoundPolicy,
) -> Running {
    let data_dir = root.join("coordinator");
    let raw: RawBundleSettings = toml::from_str(&format!(
        "trtexec = \"off\"\ncanary_plants = [\"plant-1\"]\nresend_secs = 600\nclass_names = {}\n",
        serde_json::to_string(names).unwrap()
    ))
    .unwrap();
    let raw = RawBundleSettings {
        architecture: Some(tiny_arch()),
        ..raw
    };
    let bundles = BundleConfig::resolve(raw, root, &data_dir, None).unwrap();
    let config = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        tls: pki.coordinator_files(),
        signing_key: pki.coordinator_signing_key(),
        initial_model: Some(root.join("initial.safetensors")),
        round,
        limits: Limits::default(),
        bundles: Some(bundles),
        metrics_listen: None,
        storage: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Coordinator::build(&config)
        .unwrap()
        .spawn(listener)
        .unwrap()
}

/// Stores `model` as candidate `version`, as a round would.
fn store_version(hub: &Arc<Hub>, version: u64, model: &ModelState) {
    let signer = &hub.signer;
    Versions {
        store: &hub.store,
        blobs: &hub.blobs,
        signer,
    }
    .store(
        NewVersion {
            version,
            model,
            parent: version - 1,
            round: version - 1,
            strategy: "test",
            contributors: Vec::new(),
            metrics: BTreeMap::new(),
            status: ModelStatus::Candidate,
        },
        None,
    )
    .unwrap();
}

fn perturbed(base: &ModelState, by: f32) -> ModelState {
    let mut m = base.clone();
    for (name, t) in m.iter_mut() {
        if !name.ends_with("running_var") {
            t.data_mut().iter_mut().for_each(|v| *v += by);
        }
    }
    m
}

fn installer(root: &Path, pki: &PkiLayout, i: usize) -> BundleInstaller {
    let key = VerifyingKey::load(&pki.coordinator_verifying_key()).unwrap();
    BundleInstaller::open(&root.join(format!("plant-{i}/state")), key).unwrap()
}

fn pointer(root: &Path, pki: &PkiLayout, i: usize) -> (Option<String>, Option<String>) {
    let p = installer(root, pki, i).pointer().unwrap();
    (p.current.map(|s| s.id), p.previous.map(|s| s.id))
}

fn current_bundle(root: &Path, pki: &PkiLayout, i: usize) -> Option<String> {
    pointer(root, pki, i).0
}

async fn next_install(rx: &mut mpsc::UnboundedReceiver<Event>) -> InstallOutcome {
    loop {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Event::BundleInstall(o))) => return o,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the agent stopped"),
            Err(_) => panic!("no install event within {WAIT:?}"),
        }
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn plant_config(root: &Path, pki: &PkiLayout, i: usize, address: &str) -> Config {
    let plant_dir = root.join(format!("plant-{i}"));
    write_plant_data(&plant_dir.join("PCBData"), i);
    let files = pki.plant_files(&format!("plant-{i}"));
    let text = format!(
        r#"
[coordinator]
address = "{address}"
public_key = "{pub_key}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[state]
dir = "state"

[data]
deeppcb = "PCBData"

[model]
input_size = 64
width = 0.25
fpn_width = 16
head_width = 16

[training]
device = "cpu"
threads = 1

[agent]
backoff_initial_ms = 100
backoff_max_secs = 1
"#,
        pub_key = pki.coordinator_verifying_key().display(),
        ca = files.ca_cert.display(),
        cert = files.cert.display(),
        key = files.key.display(),
    );
    let path = plant_dir.join("plant.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}
