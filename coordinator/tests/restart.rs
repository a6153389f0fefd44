//! Restarts: a coordinator stopped after updates were acknowledged resumes the round from sled
//! on the same data folder and publishes the same bits as an uninterrupted run; a round found
//! aggregating at start is aggregated again from the stored updates.

mod support;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::records::RoundState;
use fedinspect_coordinator::storage::Store;
use fedinspect_proto::v1 as pb;
use support::*;

const CODEC: Codec = Codec::Q8 { block: 64 };
const SAMPLES: [(&str, u64); 3] = [("plant-1", 70), ("plant-2", 20), ("plant-3", 200)];

fn payload(i: usize) -> Vec<u8> {
    encode(&synthetic_delta(i as u64 + 7, 0.02), CODEC)
}

/// Plant `i` (0-based) joins, takes its train task and uploads its delta.
async fn contribute(site: &Site, url: &str, i: usize) -> Plant {
    let (id, n) = SAMPLES[i];
    let mut p = Plant::connect(site, url, id).await;
    p.join(n).await;
    let task = p.next_train().await;
    assert_eq!((task.round, task.base_version), (1, 1));
    let bytes = payload(i);
    let ack = p
        .upload(
            header(&task, &bytes, pb::Codec::Q8, n, i as u8 + 1),
            &bytes,
            bytes.len(),
        )
        .await
        .unwrap();
    assert!(!ack.duplicate);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_resumes_after_a_restart_with_the_same_bits() {
    let site = Site::new(3);
    let round = policy(1, 3, 60, CODEC);

    // Uninterrupted.
    let config = site.config("straight", round.clone(), Limits::default());
    let running = start(&config).await;
    let u = url(&running);
    let mut plants = Vec::new();
    for i in 0..3 {
        plants.push(contribute(&site, &u, i).await);
    }
    wait_for_version(&site, &u, 2).await;
    let straight = plants[0].download(2).await;
    drop(plants);
    running.stop(WAIT).await.unwrap();

    // Stopped after two acknowledged updates, restarted on the same data folder.
    let config = site.config("restarted", round, Limits::default());
    let first = start(&config).await;
    let u = url(&first);
    let p1 = contribute(&site, &u, 0).await;
    let p2 = contribute(&site, &u, 1).await;
    drop((p1, p2));
    first.stop(WAIT).await.unwrap();

    let second = start(&config).await;
    let u = url(&second);
    let mut p3 = contribute(&site, &u, 2).await;
    wait_for_version(&site, &u, 2).await;
    let restarted = p3.download(2).await;
    assert_eq!(restarted, straight, "the same model file, bit for bit");

    let (model, _) = ModelState::from_safetensors_bytes(&restarted).unwrap();
    let (p0, p1, p2) = (payload(0), payload(1), payload(2));
    let expected = expected_fedavg(
        &base_model(),
        &[
            ("plant-1", 70, &p0, CODEC),
            ("plant-2", 20, &p1, CODEC),
            ("plant-3", 200, &p2, CODEC),
        ],
    );
    assert_eq!(model, expected);
    second.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_found_aggregating_is_aggregated_again() {
    let site = Site::new(3);
    let config = site.config("data", policy(1, 3, 60, CODEC), Limits::default());
    let first = start(&config).await;
    let u = url(&first);
    let p1 = contribute(&site, &u, 0).await;
    let p2 = contribute(&site, &u, 1).await;
    drop((p1, p2));
    first.stop(WAIT).await.unwrap();

    // As if the coordinator died after recording "aggregating" and before publishing.
    {
        let store = Store::open(&config.data_dir.join("db")).unwrap();
        let mut r = store.round(1).unwrap().unwrap();
        assert_eq!(r.state, RoundState::Collecting);
        r.state = RoundState::Aggregating;
        r.participants = 2;
        store.put_round(&r).unwrap();
        store.flush_blocking().unwrap();
    }

    let second = start(&config).await;
    let u = url(&second);
    wait_for_version(&site, &u, 2).await;
    let round = second.hub().store.round(1).unwrap().unwrap();
    assert_eq!(round.state, RoundState::Published);
    assert_eq!(round.published_version, Some(2));
    let mut p3 = Plant::connect(&site, &u, "plant-3").await;
    p3.register(1).await.unwrap();
    let (model, _) = ModelState::from_safetensors_bytes(&p3.download(2).await).unwrap();
    let (p0, p1) = (payload(0), payload(1));
    let expected = expected_fedavg(
        &base_model(),
        &[("plant-1", 70, &p0, CODEC), ("plant-2", 20, &p1, CODEC)],
    );
    assert_eq!(model, expected);
    second.stop(WAIT).await.unwrap();
}
