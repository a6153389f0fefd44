//! Three plant agents and a real coordinator over mutual TLS on 127.0.0.1: two rounds of real
//! (tiny) training, q8 updates with error feedback, FedProx in the plan. Checks the published
//! lineage and signatures, that every published model is the canonical FedAvg of the stored
//! updates, that the plants' signatures verify, that a retried upload (its acknowledgement
//! lost) is answered "duplicate" and counted once, and that a corrupt cached model is
//! downloaded again. Then, with one plant: a pending update survives a restart of the agent,
//! a refused update is logged and the agent goes on, shutdown stops training between steps,
//! the coordinator refuses an update not signed with the key the plant registered, and an agent
//! refuses a coordinator that announces another key than the pinned one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fedinspect_client::agent::rpc;
use fedinspect_client::agent::types::{Capabilities, Task, UpdateHeader};
use fedinspect_client::agent::{Agent, AgentError, Event, Faults};
use fedinspect_client::config::{Config, PUBLIC_KEY_FILE};
use fedinspect_client::data::deeppcb::CLASS_NAMES;
use fedinspect_client::detector::Detector;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate};
use fedinspect_common::manifests::{self, UpdateManifest, UPDATE_KIND};
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::signing::{SigningKey, VerifyingKey};
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::{Limits, RoundPolicy};
use fedinspect_coordinator::records::RoundState;
use fedinspect_coordinator::versions::Versions;
use fedinspect_coordinator::{Config as CoordinatorConfig, Coordinator, Running};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{mpsc, watch};

const PLANTS: usize = 3;
const IMAGES_PER_PLANT: usize = 8;
const WAIT: Duration = Duration::from_secs(90);

fn tiny_arch() -> ArchConfig {
    ArchConfig {
        in_channels: 2,
        num_classes: CLASS_NAMES.len() as u32,
        input_size: 64,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_federate_two_rounds_into_the_canonical_fedavg() {
    let site = Site::new(PLANTS);
    let policy = policy(PLANTS, 120, 2);
    let running = site.start(policy, Limits::default()).await;
    let (root, pki, initial) = (site.dir.path(), &site.pki, &site.initial);
    let address = site.address(&running);

    // plant-2 starts with a corrupt copy of version 1 in its model cache.
    let corrupt = root
        .join("plant-2/state/models")
        .join(format!("{}.safetensors", initial.content_hash().to_hex()));
    std::fs::create_dir_all(corrupt.parent().unwrap()).unwrap();
    std::fs::write(&corrupt, b"not a model").unwrap();

    let (stop, stopped) = watch::channel(false);
    let mut agents = Vec::new();
    let mut events = Vec::new();
    for i in 1..=PLANTS {
        let config = site.plant(i, &address, "");
        let mut agent = Agent::build(config).unwrap().with_faults(Faults {
            lose_first_ack: i == 1,
        });
        events.push(agent.events());
        agents.push(tokio::spawn(agent.run(stopped.clone())));
    }

    let hub = running.hub().clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.store.model(3).unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "version 3 not published within {WAIT:?}"
        );
        assert!(
            agents.iter().all(|a| !a.is_finished()),
            "an agent stopped before the rounds were done"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    for a in agents {
        tokio::time::timeout(WAIT, a)
            .await
            .expect("the agent stops when asked")
            .unwrap()
            .expect("the agent ends cleanly");
    }
    let events: Vec<Vec<Event>> = events.iter_mut().map(drain).collect();

    // Lineage: v3 from round 2 on v2, v2 from round 1 on v1; both rounds published by all.
    let store = &hub.store;
    let v2 = store.model(2).unwrap().unwrap();
    let v3 = store.model(3).unwrap().unwrap();
    assert_eq!((v2.parent, v2.round), (1, 1));
    assert_eq!((v3.parent, v3.round), (2, 2));
    for r in 1..=2 {
        let round = store.round(r).unwrap().unwrap();
        assert_eq!(round.state, RoundState::Published, "round {r}");
        assert_eq!(round.participants, PLANTS as u32, "round {r}");
    }

    // The coordinator's signatures verify with the key the plants pinned.
    let pinned = VerifyingKey::load(&pki.coordinator_verifying_key()).unwrap();
    let signer = SigningKey::load(&pki.coordinator_signing_key()).unwrap();
    let versions = Versions {
        store: &hub.store,
        blobs: &hub.blobs,
        signer: &signer,
    };
    assert_eq!(versions.load(1).unwrap().1, *initial);
    for v in 1..=3 {
        let record = store.model(v).unwrap().unwrap();
        manifests::verify_model(&pinned, v, &record.content_hash.0, &record.signature).unwrap();
    }

    // Each published model is the canonical FedAvg of the round's stored updates, each
    // signed by its plant over the update manifest.
    let plant_keys: BTreeMap<String, VerifyingKey> = (1..=PLANTS)
        .map(|i| {
            let path = root.join(format!("plant-{i}/state/{PUBLIC_KEY_FILE}"));
            (format!("plant-{i}"), VerifyingKey::load(&path).unwrap())
        })
        .collect();
    for r in 1..=2u64 {
        let (base_record, base) = versions.load(r).unwrap();
        let (_, published) = versions.load(r + 1).unwrap();
        let updates = store.updates_of_round(r).unwrap();
        let ids: Vec<&str> = updates.iter().map(|u| u.plant_id.as_str()).collect();
        assert_eq!(
            ids,
            ["plant-1", "plant-2", "plant-3"],
            "round {r}: one update each"
        );
        let layout = Layout::of(&base);
        let mut deltas = Vec::new();
        for u in &updates {
            assert_eq!(u.codec, Codec::q8());
            assert!(u.metrics["train_seconds"] > 0.0, "{:?}", u.metrics);
            assert!(u.metrics["train_steps"] >= 1.0, "{:?}", u.metrics);
            assert!(
                u.metrics.contains_key("local_map50_after"),
                "{:?}",
                u.metrics
            );
            let manifest = UpdateManifest {
                kind: UPDATE_KIND.into(),
                plant_id: u.plant_id.clone(),
                update_id: u.update_id.to_hex(),
                round: r,
                base_version: r,
                base_hash: base_record.content_hash.0.to_hex(),
                codec: "q8".into(),
                num_samples: u.num_samples,
                payload_sha256: u.delta_sha256.to_hex(),
            };
            manifest
                .verify(&plant_keys[&u.plant_id], &u.plant_signature)
                .unwrap();
            let bytes = hub.blobs.read(&u.delta_sha256).unwrap();
            deltas.push(delta::decode_to_model(bytes.as_slice(), &layout, Some(u.codec)).unwrap());
        }
        let inputs: Vec<PlantUpdate<'_>> = updates
            .iter()
            .zip(&deltas)
            .map(|(u, d)| PlantUpdate::new(u.plant_id.as_str(), u.num_samples, d))
            .collect();
        let expected = aggregate_canonical(&base, &inputs).unwrap();
        assert_eq!(
            published, expected,
            "round {r}: bit for bit the canonical FedAvg"
        );
        assert_ne!(published, base, "round {r} changed the model");
    }

    // plant-1 lost the acknowledgement of its round-1 upload: it sent the same update again
    // after reconnecting, the coordinator answered "duplicate", and counted it once.
    let plant1_round1 = store.update_for(1, "plant-1").unwrap().unwrap();
    let delivered: Vec<(u64, [u8; 16], bool)> = events[0]
        .iter()
        .filter_map(|e| match e {
            Event::Delivered {
                round,
                update_id,
                duplicate,
            } => Some((*round, *update_id, *duplicate)),
            _ => None,
        })
        .collect();
    assert_eq!(
        delivered[0],
        (1, plant1_round1.update_id.0, true),
        "{:?}",
        events[0]
    );
    assert!(events[0]
        .iter()
        .any(|e| matches!(e, Event::Disconnected { reason } if reason.contains("injected"))));
    assert_eq!(v2.contributors.len(), PLANTS);
    for (i, plant_events) in events.iter().enumerate().skip(1) {
        let first = plant_events
            .iter()
            .find_map(|e| match e {
                Event::Delivered { duplicate, .. } => Some(*duplicate),
                _ => None,
            })
            .unwrap();
        assert!(!first, "plant-{} was acknowledged the first time", i + 1);
    }

    // plant-2 found its cached version 1 corrupt and downloaded it again.
    assert!(events[1].contains(&Event::BaseReady {
        round: 1,
        version: 1,
        from_cache: false
    }));
    assert!(
        !corrupt.exists(),
        "only the latest base (version 2) stays cached"
    );
    let cached = root
        .join("plant-2/state/models")
        .join(format!("{}.safetensors", v2.content_hash.0.to_hex()));
    let (model, _) = ModelState::load_safetensors(&cached).unwrap();
    assert_eq!(model.content_hash(), v2.content_hash.0);

    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_update_survives_a_restart_and_is_counted_once() {
    let site = Site::new(1);
    let running = site.start(policy(1, 120, 1), Limits::default()).await;
    let address = site.address(&running);
    let state = site.dir.path().join("plant-1/state");
    // The acknowledgement is lost, and the reconnection waits long enough to stop the agent
    // first: its update is on disk, delivered as far as the coordinator knows.
    let slow = "backoff_initial_ms = 60000\nbackoff_max_secs = 60\ndeadline_margin_secs = 1";
    let mut agent = Agent::build(site.plant(1, &address, slow))
        .unwrap()
        .with_faults(Faults {
            lose_first_ack: true,
        });
    let mut events = agent.events();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(agent.run(stopped));
    loop {
        if let Event::Disconnected { .. } = next_event(&mut events).await {
            break;
        }
    }
    stop.send(true).unwrap();
    task.await
        .unwrap()
        .expect("stops cleanly while waiting to reconnect");
    assert!(state.join("pending/update.json").exists());
    assert!(state.join("residual.next.safetensors").exists());
    assert!(!state.join("residual.safetensors").exists());
    let stored = running
        .hub()
        .store
        .update_for(1, "plant-1")
        .unwrap()
        .unwrap();

    // A new agent on the same state folder sends it again, with the same update id.
    let mut agent = Agent::build(site.plant(1, &address, "")).unwrap();
    let mut events = agent.events();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(agent.run(stopped));
    let delivered = loop {
        if let e @ Event::Delivered { .. } = next_event(&mut events).await {
            break e;
        }
    };
    assert_eq!(
        delivered,
        Event::Delivered {
            round: 1,
            update_id: stored.update_id.0,
            duplicate: true
        }
    );
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(running.hub().store.updates_of_round(1).unwrap().len(), 1);
    assert!(!state.join("pending/update.json").exists());
    assert!(
        state.join("residual.safetensors").exists(),
        "the q8 residual became current once delivered"
    );
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_is_logged_and_the_agent_goes_on_to_the_next_round() {
    let site = Site::new(1);
    // Every delta is over this norm bound: each round is refused and fails at its deadline.
    let limits = Limits {
        delta_norm_bound: Some(1e-9),
        ..Limits::default()
    };
    let running = site.start(policy(1, 2, 2), limits).await;
    let address = site.address(&running);
    let mut agent = Agent::build(site.plant(1, &address, "")).unwrap();
    let mut events = agent.events();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(agent.run(stopped));
    let mut refused = Vec::new();
    while refused.len() < 2 {
        if let Event::Refused { round, message } = next_event(&mut events).await {
            refused.push((round, message));
        }
    }
    assert_eq!(refused[0].0, 1);
    assert_eq!(refused[1].0, 2, "the agent trained again on the next round");
    assert!(
        refused[0].1.contains("exceeds the bound"),
        "the coordinator's message is kept: {}",
        refused[0].1
    );
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let state = site.dir.path().join("plant-1/state");
    assert!(!state.join("pending/update.json").exists(), "dropped");
    assert!(
        !state.join("residual.safetensors").exists(),
        "nothing was delivered, so no residual is current"
    );
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_checks_update_signatures_against_the_registered_plant_key() {
    let site = Site::new(1);
    let running = site.start(policy(1, 120, 1), Limits::default()).await;
    let config = site.plant(1, &site.address(&running), "");
    let mut conn = rpc::connect(&config.coordinator, &config.tls)
        .await
        .unwrap();
    let key = config.signing_key.verifying_key();
    conn.register(&Capabilities::default(), &key).await.unwrap();
    let mut tasks = conn.tasks().await.unwrap();
    let Some(Task::Train(task)) = tasks.next().await.unwrap() else {
        panic!("expected a train task");
    };
    let mut payload = Vec::new();
    delta::encode(&site.initial.zeros_like(), task.plan.codec, &mut payload).unwrap();
    let mut header = UpdateHeader {
        update_id: [7; 16],
        round: task.round,
        base_version: task.base_version,
        base_hash: task.base_hash,
        codec: task.plan.codec,
        num_samples: 6,
        payload_bytes: payload.len() as u64,
        payload_sha256: rpc::sha256(&payload).try_into().unwrap(),
        plant_signature: Vec::new(),
        metrics: BTreeMap::new(),
    };
    let payload: std::sync::Arc<[u8]> = payload.into();
    let sign = |h: &UpdateHeader, k: &SigningKey| h.manifest("plant-1").sign(k).unwrap();

    // Signed by another key, or a field changed after signing: refused.
    let other = SigningKey::generate().unwrap();
    header.plant_signature = sign(&header, &other);
    let err = conn.upload(&header, payload.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("plant signature"), "{err}");
    header.plant_signature = sign(&header, &config.signing_key);
    header.num_samples = 600;
    let err = conn.upload(&header, payload.clone()).await.unwrap_err();
    assert!(err.to_string().contains("plant signature"), "{err}");

    // Signed by the registered key: accepted.
    header.num_samples = 6;
    let ack = conn.upload(&header, payload).await.unwrap();
    assert!(!ack.duplicate);
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_training_at_the_next_step_and_sends_nothing() {
    let site = Site::new(1);
    // Ten thousand epochs: minutes of training, unless stopped.
    let long = RoundPolicy {
        local_epochs: 10_000,
        ..policy(1, 600, 1)
    };
    let running = site.start(long, Limits::default()).await;
    let mut agent = Agent::build(site.plant(1, &site.address(&running), "")).unwrap();
    let mut events = agent.events();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(agent.run(stopped));
    loop {
        if let Event::BaseReady { .. } = next_event(&mut events).await {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("training stops at a step boundary")
        .unwrap()
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert!(drain(&mut events).is_empty(), "nothing trained or sent");
    assert!(running.hub().store.updates_of_round(1).unwrap().is_empty());
    let state = site.dir.path().join("plant-1/state");
    assert!(!state.join("pending/update.json").exists());
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stops_when_the_coordinator_announces_another_key_than_the_pinned_one() {
    let site = Site::new(1);
    let running = site.start(policy(1, 120, 1), Limits::default()).await;
    let mut config = site.plant(1, &site.address(&running), "");
    let pinned = SigningKey::generate().unwrap().verifying_key();
    config.coordinator.public_key = pinned;
    let agent = Agent::build(config).unwrap();
    let (_stop, stopped) = watch::channel(false);
    let err = tokio::time::timeout(WAIT, agent.run(stopped))
        .await
        .expect("a fatal error ends the agent")
        .unwrap_err();
    assert!(matches!(err, AgentError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&pinned.to_hex()), "{err}");
    assert!(running.hub().store.updates_of_round(1).unwrap().is_empty());
    running.stop(Duration::from_secs(10)).await.unwrap();
}

/// A PKI and the initial model (version 1) in a temporary folder.
struct Site {
    dir: tempfile::TempDir,
    pki: PkiLayout,
    initial: ModelState,
}

impl Site {
    fn new(plants: usize) -> Self {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::init(
            &dir.path().join("pki"),
            &InitOptions::with_plant_count(plants),
        )
        .unwrap();
        let names = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
        let initial = Detector::seeded(tiny_arch(), names, tch::Device::Cpu, 7)
            .unwrap()
            .state()
            .unwrap();
        initial
            .save_safetensors(&dir.path().join("initial.safetensors"), &BTreeMap::new())
            .unwrap();
        Self { dir, pki, initial }
    }

    /// A coordinator on 127.0.0.1:0 with its own sled folder.
    async fn start(&self, round: RoundPolicy, limits: Limits) -> Running {
        let root = self.dir.path();
        let config = CoordinatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: root.join("coordinator"),
            tls: self.pki.coordinator_files(),
            signing_key: self.pki.coordinator_signing_key(),
            initial_model: Some(root.join("initial.safetensors")),
            round,
            limits,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Coordinator::build(&config)
            .unwrap()
            .spawn(listener)
            .unwrap()
    }

    fn address(&self, running: &Running) -> String {
        format!("https://127.0.0.1:{}", running.local_addr().port())
    }

    /// plant-`i`'s data and plant.toml (paths relative to its folder where they can be), with
    /// `agent` as the `[agent]` table; the config loaded from that file.
    fn plant(&self, i: usize, address: &str, agent: &str) -> Config {
        let plant_dir = self.dir.path().join(format!("plant-{i}"));
        if !plant_dir.join("PCBData").exists() {
            write_plant_data(&plant_dir.join("PCBData"), i);
        }
        let files = self.pki.plant_files(&format!("plant-{i}"));
        let agent = if agent.is_empty() {
            "backoff_initial_ms = 100\nbackoff_max_secs = 1\ndeadline_margin_secs = 1"
        } else {
            agent
        };
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
validation_fraction = 0.25

[model]
input_size = 64
width = 0.25
fpn_width = 16
head_width = 16

[training]
device = "cpu"
threads = 1
warmup_steps = 2
seed = {i}

[agent]
{agent}
"#,
            pub_key = self.pki.coordinator_verifying_key().display(),
            ca = files.ca_cert.display(),
            cert = files.cert.display(),
            key = files.key.display(),
        );
        let path = plant_dir.join("plant.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }
}

/// `plants` plants per round, q8, FedProx, one local epoch of batches of 3.
fn policy(plants: usize, deadline_secs: u64, max_rounds: u64) -> RoundPolicy {
    RoundPolicy {
        min_participants: plants as u32,
        target_participants: plants as u32,
        deadline: Duration::from_secs(deadline_secs),
        local_epochs: 1,
        learning_rate: 5e-3,
        fedprox_mu: 0.01,
        batch_size: 3,
        codec: Codec::q8(),
        max_rounds,
    }
}

/// The next event, within `WAIT`.
async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event within the wait")
        .expect("the agent is running")
}

/// Eight 64x64 DeepPCB pairs for plant `plant`: a board with traces as the template, the
/// same board with bright and dark defect rectangles as the test image.
fn write_plant_data(root: &Path, plant: usize) {
    let group = format!("{:05}", plant);
    let mut rng = ChaCha8Rng::seed_from_u64(plant as u64);
    let mut split = String::new();
    for n in 0..IMAGES_PER_PLANT {
        let stem = format!("{group}{n:03}");
        let mut template = vec![60u8; 64 * 64];
        for y in (8..64).step_by(16) {
            for x in 0..64 {
                template[y * 64 + x] = 150;
                template[(y + 1) * 64 + x] = 150;
            }
        }
        let mut test = template.clone();
        let mut boxes = String::new();
        for _ in 0..rng.gen_range(1..=2) {
            let (w, h) = (rng.gen_range(6..14), rng.gen_range(6..14));
            let (x0, y0) = (rng.gen_range(0..64 - w), rng.gen_range(0..64 - h));
            let class = rng.gen_range(1..=6u32);
            let value = if class % 2 == 0 { 250 } else { 0 };
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    test[y * 64 + x] = value;
                }
            }
            boxes.push_str(&format!("{x0} {y0} {} {} {class}\n", x0 + w, y0 + h));
        }
        let images = root.join(format!("group{group}/{group}"));
        jpeg(&images.join(format!("{stem}_test.jpg")), &test);
        jpeg(&images.join(format!("{stem}_temp.jpg")), &template);
        let notes = root.join(format!("group{group}/{group}_not"));
        std::fs::create_dir_all(&notes).unwrap();
        std::fs::write(notes.join(format!("{stem}.txt")), boxes).unwrap();
        split.push_str(&format!(
            "group{group}/{group}/{stem}.jpg group{group}/{group}_not/{stem}.txt\n"
        ));
    }
    std::fs::write(root.join("trainval.txt"), split).unwrap();
}

fn jpeg(path: &Path, grey: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = std::fs::File::create(path).unwrap();
    JpegEncoder::new_with_quality(&mut file, 95)
        .encode(grey, 64, 64, ExtendedColorType::L8)
        .unwrap();
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}
