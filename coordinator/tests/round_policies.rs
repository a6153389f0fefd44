//! Round policies over real mutual TLS: participant sampling (`round.sample_fraction`) tasks
//! only the plants drawn from the seed and the round number, refuses the others' updates, and
//! a restarted coordinator resumes with the same plants; blob retention
//! (`round.keep_update_blobs_rounds`) removes the update blobs of older rounds and keeps the
//! newest ones, and `check` accounts for the removed ones; a learning-rate cycle
//! (`round.lr_cycle_rounds`) gives each round its stretch of the cosine, restarting after the
//! cycle, and the stretch stays in the round record; `round.hold` opens no round while the
//! plants register and fetch the model, until the coordinator restarts without it.

mod support;

use std::time::Duration;

use fedinspect_common::delta::Codec;
use fedinspect_coordinator::config::{Limits, RoundPolicy};
use fedinspect_coordinator::hub::sampling;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_coordinator::storage::check;
use fedinspect_proto::v1 as pb;
use support::*;

/// Waits until the coordinator's newest round is `round`.
async fn wait_for_round(site: &Site, url: &str, round: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = admin(site, url, AdminCommand::Status).await.unwrap();
        if s["current_round"] == round {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "round {round} not opened: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_rounds_task_the_drawn_plants_and_keep_them_across_a_restart() {
    let site = Site::new(4);
    let round_policy = RoundPolicy {
        sample_fraction: 0.5,
        sample_seed: 11,
        ..policy(2, 2, 30, Codec::F32)
    };
    let config = site.config("data", round_policy.clone(), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let ids: Vec<String> = (1..=4).map(|i| format!("plant-{i}")).collect();

    // Every plant registers before any opens its task stream, so round 1 draws from four.
    let mut plants = Vec::new();
    for id in &ids {
        let mut p = Plant::connect(&site, &url, id).await;
        p.register(30).await.unwrap();
        plants.push(p);
    }
    for p in &mut plants {
        p.join(30).await;
    }
    let drawn1 = sampling::draw(&ids, 1, &round_policy);
    assert_eq!(
        drawn1.len(),
        2,
        "ceil(0.5 · 4), and target_participants is 2"
    );
    wait_for_round(&site, &url, 1).await;
    assert_eq!(
        running.hub().store.round(1).unwrap().unwrap().sampled,
        drawn1
    );

    // The drawn plants get the task; a plant not drawn is refused with a reason.
    let index = |id: &str| ids.iter().position(|x| x == id).unwrap();
    let mut tasks = Vec::new();
    for id in &drawn1 {
        tasks.push(plants[index(id)].next_train().await);
    }
    let outsider = ids.iter().find(|id| !drawn1.contains(id)).unwrap();
    let payload = encode(&synthetic_delta(9, 0.01), Codec::F32);
    let h = header(&tasks[0], &payload, pb::Codec::F32, 30, 9);
    let err = plants[index(outsider)]
        .upload(h, &payload, payload.len())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains(&format!(
            "'{outsider}' is not among the plants sampled for round 1"
        )),
        "{err}"
    );
    for (n, (id, task)) in drawn1.iter().zip(&tasks).enumerate() {
        let payload = encode(&synthetic_delta(n as u64 + 1, 0.01), Codec::F32);
        let h = header(task, &payload, pb::Codec::F32, 30, n as u8 + 1);
        plants[index(id)]
            .upload(h, &payload, payload.len())
            .await
            .unwrap();
    }
    wait_for_version(&site, &url, 2).await;
    let v2 = running.hub().store.model(2).unwrap().unwrap();
    let contributors: Vec<String> = v2.contributors.iter().map(|c| c.plant_id.clone()).collect();
    assert_eq!(contributors, drawn1);

    // Round 2 draws again; a restart resumes it with the very same plants.
    wait_for_round(&site, &url, 2).await;
    let drawn2 = sampling::draw(&ids, 2, &round_policy);
    assert_eq!(
        running.hub().store.round(2).unwrap().unwrap().sampled,
        drawn2
    );
    drop(plants);
    running.stop(Duration::from_secs(10)).await.unwrap();

    let running = start(&config).await;
    let url = self::url(&running);
    let deadline = tokio::time::Instant::now() + WAIT;
    let resumed = loop {
        if let Some(open) = running.hub().open_round() {
            break open;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "round 2 did not resume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(resumed.record.round, 2);
    assert_eq!(resumed.record.sampled, drawn2);
    for id in &drawn2 {
        let mut p = Plant::connect(&site, &url, id).await;
        p.join(30).await;
        assert_eq!(p.next_train().await.round, 2);
    }
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_older_update_blobs_and_keeps_the_newest_rounds() {
    let site = Site::new(1);
    let round_policy = RoundPolicy {
        keep_update_blobs_rounds: Some(1),
        ..policy(1, 1, 30, Codec::F32)
    };
    let config = site.config("data", round_policy, Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let hub = running.hub().clone();

    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    for round in 1..=2u64 {
        let task = plant.next_train().await;
        assert_eq!(task.round, round);
        let payload = encode(&synthetic_delta(round, 0.01), Codec::F32);
        let h = header(&task, &payload, pb::Codec::F32, 40, round as u8);
        plant.upload(h, &payload, payload.len()).await.unwrap();
        // The driver removes old blobs before it opens the next round.
        wait_for_round(&site, &url, round + 1).await;
        let blob = |r: u64| {
            let u = hub.store.updates_of_round(r).unwrap().remove(0);
            hub.blobs.path_of(&u.delta_sha256)
        };
        assert!(
            blob(round).is_file(),
            "the newest ended round keeps its blob"
        );
        if round == 2 {
            assert!(!blob(1).exists(), "round 1's update blob is removed");
        }
    }
    assert_eq!(hub.store.update_blobs_removed_through().unwrap(), 1);
    // The update records stay, and `check` knows the removed blob is not missing.
    assert_eq!(hub.store.updates_of_round(1).unwrap().len(), 1);
    let report = check::check(&hub.store, &hub.blobs).unwrap();
    assert_eq!(report.problems, Vec::<String>::new());
    assert_eq!(report.update_blobs_removed, 1);
    assert_eq!(report.updates_checked, 2);
    // Model blobs are never removed.
    for v in 1..=3 {
        let m = hub.store.model(v).unwrap().unwrap();
        assert!(hub.blobs.path_of(&m.blob_sha256).is_file(), "version {v}");
    }
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_of_a_learning_rate_cycle_carry_their_stretch_of_the_cosine() {
    let site = Site::new(2);
    let round_policy = RoundPolicy {
        lr_cycle_rounds: 2,
        ..policy(2, 2, 30, Codec::F32)
    };
    let config = site.config("data", round_policy, Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let mut plants = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = Plant::connect(&site, &url, id).await;
        p.join(30).await;
        plants.push(p);
    }
    let expected = [(1, 0.0, 0.5), (2, 0.5, 1.0), (3, 0.0, 0.5)];
    for (round, start, end) in expected {
        for (n, p) in plants.iter_mut().enumerate() {
            let task = p.next_train().await;
            assert_eq!(task.round, round);
            let plan = task.plan.unwrap();
            assert_eq!(
                (plan.lr_span_start, plan.lr_span_end),
                (start, end),
                "round {round}: its half of the cosine (round 3 starts the next cycle)"
            );
            let payload = encode(&synthetic_delta(round * 10 + n as u64, 0.01), Codec::F32);
            // A fresh update id each round (a reused one is a duplicate).
            let h = header(
                &task,
                &payload,
                pb::Codec::F32,
                30,
                (round * 10) as u8 + n as u8,
            );
            let ack = p.upload(h, &payload, payload.len()).await.unwrap();
            assert!(!ack.duplicate);
        }
        wait_for_version(&site, &url, round + 1).await;
        let record = running.hub().store.round(round).unwrap().unwrap();
        let span = record
            .plan
            .lr_span
            .expect("a cycle's round records its span");
        assert_eq!((span.start, span.end), (start, end));
    }
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cycle_every_round_is_a_cosine_of_its_own() {
    let site = Site::new(1);
    let config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let mut p = Plant::connect(&site, &url, "plant-1").await;
    p.join(30).await;
    let plan = p.next_train().await.plan.unwrap();
    assert_eq!((plan.lr_span_start, plan.lr_span_end), (0.0, 0.0));
    assert_eq!(
        running.hub().store.round(1).unwrap().unwrap().plan.lr_span,
        None
    );
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holding_coordinator_opens_no_round_until_restarted_without_hold() {
    let site = Site::new(1);
    let held = RoundPolicy {
        hold: true,
        ..policy(1, 1, 30, Codec::F32)
    };
    let config = site.config("data", held, Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let mut p = Plant::connect(&site, &url, "plant-1").await;
    p.join(30).await;
    // The plant is registered, its task stream is open and it can fetch the initial model:
    // without the hold, round 1 (one participant needed) would open at once.
    let model = p.download(1).await;
    assert!(!model.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let opened = running.hub().store.latest_round().unwrap();
    assert!(opened.is_none(), "a round opened under hold: {opened:?}");
    let s = admin(&site, &url, AdminCommand::Plants).await.unwrap();
    assert!(s.to_string().contains("plant-1"), "{s}");
    let s = admin(&site, &url, AdminCommand::Status).await.unwrap();
    assert_eq!(
        (s["holding"].as_bool(), s["current_round"].as_u64()),
        (Some(true), Some(0)),
        "{s}"
    );
    drop(p);
    running.stop(Duration::from_secs(10)).await.unwrap();

    // The same data folder without the hold: round 1 opens for the plant.
    let config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = self::url(&running);
    let mut p = Plant::connect(&site, &url, "plant-1").await;
    p.join(30).await;
    assert_eq!(p.next_train().await.round, 1);
    let s = admin(&site, &url, AdminCommand::Status).await.unwrap();
    assert_eq!(s["holding"].as_bool(), Some(false), "{s}");
    running.stop(Duration::from_secs(10)).await.unwrap();
}
