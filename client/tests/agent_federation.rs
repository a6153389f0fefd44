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
use std::time::Duration;

use fedinspect_client::agent::rpc;
use fedinspect_client::agent::types::{Capabilities, Task, UpdateHeader};
use fedinspect_client::agent::{Agent, AgentError, Event, Faults};
use fedinspect_client::config::PUBLIC_KEY_FILE;
use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate};
use fedinspect_common::manifests::{self, UpdateManifest, UPDATE_KIND};
use fedinspect_common::signing::{SigningKey, VerifyingKey};
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::{Limits, RoundPolicy};
use fedinspect_coordinator::records::RoundState;
use fedinspect_coordinator::versions::Versions;
use tokio::sync::watch;

mod federation_site;

use federation_site::{drain, next_event, policy, Site, WAIT};

const PLANTS: usize = 3;

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
            ..Faults::default()
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

    // plant-1 lost the acknowledgement of its round-1 upload: after reconnecting it asked
    // UploadStatus for the same update id, learnt it was accepted (reported as a duplicate),
    // and the coordinator counted it once.
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
            ..Faults::default()
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
    let err = conn.upload(&header, payload.clone(), 0).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("plant signature"), "{err}");
    header.plant_signature = sign(&header, &config.signing_key);
    header.num_samples = 600;
    let err = conn.upload(&header, payload.clone(), 0).await.unwrap_err();
    assert!(err.to_string().contains("plant signature"), "{err}");

    // Signed by the registered key: accepted.
    header.num_samples = 6;
    let ack = conn.upload(&header, payload, 0).await.unwrap();
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
