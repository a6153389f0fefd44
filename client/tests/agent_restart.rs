//! A coordinator restart ridden out by running plant agents: the real `coordinator` binary
//! (its own process, on a fixed port and data folder) and two real agents with tiny data. The
//! coordinator is SIGKILLed while the plants train round 1 and started again a moment later on
//! the same port and folder. plant-1's first upload is also cut after half of its payload
//! (`Faults::cut_first_upload`). The agents reconnect with backoff, register again, deliver
//! (plant-1 resuming from the bytes the coordinator held durably) and round 1 publishes with
//! each plant's update counted exactly once; the published model is recomputed as the
//! canonical FedAvg of the stored deltas, each checked against its plant's signature.
//!
//! Needs the coordinator binary of this build beside the test (`target/debug/coordinator`):
//! `scripts/test.sh` builds it; alone, run `scripts/cargo build -p fedinspect-coordinator --bins`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use fedinspect_client::agent::{Agent, Event, Faults};
use fedinspect_client::config::PUBLIC_KEY_FILE;
use fedinspect_common::delta::{self, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate};
use fedinspect_common::manifests::{UpdateManifest, UPDATE_KIND};
use fedinspect_common::signing::{SigningKey, VerifyingKey};
use fedinspect_coordinator::rpc::admin_client::{self, AdminCommand};
use fedinspect_coordinator::storage::{BlobStore, Store};
use fedinspect_coordinator::versions::Versions;
use tokio::sync::watch;

mod federation_site;

use federation_site::{drain, next_event, Site, WAIT};

const PLANTS: usize = 2;

/// The coordinator binary next to this test (`target/<profile>/coordinator`), refused when
/// older than a source file of the crates it is built from.
fn coordinator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .join("coordinator");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: build it with `scripts/cargo build -p fedinspect-coordinator --bins` (scripts/test.sh does)",
                bin.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["coordinator/src", "common/src", "proto/proto"] {
        if let Some(newer) = newer_than(&root.join(dir), built) {
            panic!(
                "{} is older than {}: build it again with `scripts/cargo build -p fedinspect-coordinator --bins`",
                bin.display(),
                newer.display()
            );
        }
    }
    bin
}

fn newer_than(dir: &Path, built: SystemTime) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(p) = newer_than(&path, built) {
                return Some(p);
            }
        } else if entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > built)
        {
            return Some(path);
        }
    }
    None
}

/// `coordinator serve` on 127.0.0.1:`port` with its data in `root/coordinator`.
fn serve(bin: &Path, site: &Site, port: u16) -> Child {
    let root = site.dir.path();
    let toml = root.join("coordinator.toml");
    if !toml.exists() {
        let files = site.pki.coordinator_files();
        let q = |p: &Path| format!("\"{}\"", p.display());
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {}\nsigning_key = {}\ninitial_model = {}\n\
             [tls]\nca = {}\ncert = {}\nkey = {}\n\
             [round]\nmin_participants = {PLANTS}\ntarget_participants = {PLANTS}\n\
             deadline_secs = 120\nlocal_epochs = 1\nlearning_rate = 0.005\nbatch_size = 3\n\
             codec = \"q8\"\nmax_rounds = 1\n",
            q(&root.join("coordinator")),
            q(&site.pki.coordinator_signing_key()),
            q(&root.join("initial.safetensors")),
            q(&files.ca_cert),
            q(&files.cert),
            q(&files.key),
        );
        std::fs::write(&toml, text).unwrap();
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("coordinator.log"))
        .unwrap();
    Command::new(bin)
        .args(["serve", "--config"])
        .arg(&toml)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_ride_out_a_coordinator_killed_mid_round() {
    let bin = coordinator_binary();
    let site = Site::new(PLANTS);
    let port = free_port();
    let address = format!("https://127.0.0.1:{port}");
    let mut coordinator = Some(serve(&bin, &site, port));

    let (stop, stopped) = watch::channel(false);
    let mut agents = Vec::new();
    let mut events = Vec::new();
    for i in 1..=PLANTS {
        let config = site.plant(i, &address, "");
        let mut agent = Agent::build(config).unwrap().with_faults(Faults {
            cut_first_upload: i == 1,
            ..Faults::default()
        });
        events.push(agent.events());
        agents.push(tokio::spawn(agent.run(stopped.clone())));
    }

    // Both plants have their base and train: the coordinator dies, and comes back once both
    // agents noticed and retried for a while.
    let mut log: Vec<Vec<Event>> = vec![Vec::new(); PLANTS];
    for (rx, log) in events.iter_mut().zip(&mut log) {
        while !log
            .iter()
            .any(|e| matches!(e, Event::BaseReady { round: 1, .. }))
        {
            log.push(next_event(rx).await);
        }
    }
    kill(coordinator.take().unwrap());
    for (rx, log) in events.iter_mut().zip(&mut log) {
        while !log.iter().any(|e| matches!(e, Event::Disconnected { .. })) {
            log.push(next_event(rx).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    coordinator = Some(serve(&bin, &site, port));

    let admin = site.pki.admin_files();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(s) = admin_client::run(&address, &admin, AdminCommand::Status).await {
            if s["latest_version"] == 2 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "version 2 not published within {WAIT:?}"
        );
        assert!(agents.iter().all(|a| !a.is_finished()), "an agent stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let models = admin_client::run(&address, &admin, AdminCommand::Models { limit: 10 })
        .await
        .unwrap();
    let v2 = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == 2)
        .unwrap()
        .clone();
    stop.send(true).unwrap();
    for a in agents {
        tokio::time::timeout(WAIT, a)
            .await
            .expect("the agent stops when asked")
            .unwrap()
            .expect("the agent ends cleanly");
    }
    kill(coordinator.take().unwrap());
    for (rx, log) in events.iter_mut().zip(&mut log) {
        log.extend(drain(rx));
    }
    let after = log;

    // Each plant delivered round 1 once, reconnected after the kill, and plant-1 resumed its
    // cut upload from the coordinator's durable bytes.
    let contributors: Vec<&str> = v2["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["plant_id"].as_str().unwrap())
        .collect();
    assert_eq!(contributors, ["plant-1", "plant-2"], "{v2}");
    for (i, plant_events) in after.iter().enumerate() {
        let delivered: Vec<&Event> = plant_events
            .iter()
            .filter(|e| matches!(e, Event::Delivered { round: 1, .. }))
            .collect();
        assert_eq!(delivered.len(), 1, "plant-{}: {plant_events:?}", i + 1);
        assert!(
            plant_events
                .iter()
                .any(|e| matches!(e, Event::Reconnected { failed } if *failed >= 1)),
            "plant-{} reconnected: {plant_events:?}",
            i + 1
        );
    }
    let resumed = after[0]
        .iter()
        .find_map(|e| match e {
            Event::UploadResumed { round: 1, from, .. } => Some(*from),
            _ => None,
        })
        .unwrap_or_else(|| panic!("plant-1 resumed its cut upload: {:?}", after[0]));
    assert!(resumed > 0);

    // The published model is the canonical FedAvg of the two stored deltas, each the bytes
    // its plant signed.
    let data = site.dir.path().join("coordinator");
    let store = Store::open(&data.join("db")).unwrap();
    let blobs = BlobStore::open(&data.join("blobs")).unwrap();
    let signer = SigningKey::load(&site.pki.coordinator_signing_key()).unwrap();
    let versions = Versions {
        store: &store,
        blobs: &blobs,
        signer: &signer,
    };
    let (base_record, base) = versions.load(1).unwrap();
    let (_, published) = versions.load(2).unwrap();
    let updates = store.updates_of_round(1).unwrap();
    assert_eq!(updates.len(), PLANTS, "each update counted once");
    let keys: BTreeMap<String, VerifyingKey> = (1..=PLANTS)
        .map(|i| {
            let path = site
                .dir
                .path()
                .join(format!("plant-{i}/state/{PUBLIC_KEY_FILE}"));
            (format!("plant-{i}"), VerifyingKey::load(&path).unwrap())
        })
        .collect();
    let layout = Layout::of(&base);
    let mut deltas = Vec::new();
    for u in &updates {
        let manifest = UpdateManifest {
            kind: UPDATE_KIND.into(),
            plant_id: u.plant_id.clone(),
            update_id: u.update_id.to_hex(),
            round: 1,
            base_version: 1,
            base_hash: base_record.content_hash.0.to_hex(),
            codec: "q8".into(),
            num_samples: u.num_samples,
            payload_sha256: u.delta_sha256.to_hex(),
        };
        manifest
            .verify(&keys[&u.plant_id], &u.plant_signature)
            .unwrap();
        let bytes = blobs.read(&u.delta_sha256).unwrap();
        deltas.push(delta::decode_to_model(bytes.as_slice(), &layout, Some(u.codec)).unwrap());
    }
    let inputs: Vec<PlantUpdate<'_>> = updates
        .iter()
        .zip(&deltas)
        .map(|(u, d)| PlantUpdate::new(u.plant_id.as_str(), u.num_samples, d))
        .collect();
    assert_eq!(published, aggregate_canonical(&base, &inputs).unwrap());
}
