//! Restarts: a coordinator stopped after updates were acknowledged resumes the round from sled
//! on the same data folder and publishes the same bits as an uninterrupted run; a round found
//! aggregating at start is aggregated again from the stored updates; the coordinator process
//! SIGKILLed in the middle of an upload, and again right after the last acknowledgement,
//! loses no accepted update, keeps no unsynced partial one (a checkpointed prefix survives:
//! `upload_resume.rs`), and publishes the canonical bits.

mod support;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::hub::PreviewOutcome;
use fedinspect_coordinator::records::RoundState;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
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
    // The restarted round rebuilt its running mean from the two stored updates.
    let deadline = tokio::time::Instant::now() + WAIT;
    let check = loop {
        if let Some(c) = second.hub().last_preview_check() {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "no comparison");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        !matches!(check.outcome, PreviewOutcome::Unavailable(_)),
        "{check:?}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_upload_and_after_the_last_ack_publishes_the_same_bits() {
    let site = Site::new(3);
    let mut config = site.config("data", policy(3, 3, 60, CODEC), Limits::default());
    config.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let incoming = config.data_dir.join("blobs/incoming");

    // plant-1's update is acknowledged; plant-2 is half-way through its upload when the
    // process is killed.
    let first = Process::start(&site, &config).await;
    let mut p1 = Plant::connect(&site, &first.url, "plant-1").await;
    let mut p2 = Plant::connect(&site, &first.url, "plant-2").await;
    let mut p3 = Plant::connect(&site, &first.url, "plant-3").await;
    for (p, n) in [(&mut p1, 70), (&mut p2, 20), (&mut p3, 200)] {
        p.join(n).await;
    }
    let task = p1.next_train().await;
    let b0 = payload(0);
    p1.upload(header(&task, &b0, pb::Codec::Q8, 70, 1), &b0, b0.len())
        .await
        .unwrap();
    let task = p2.next_train().await;
    let b1 = payload(1);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = p2.client.clone();
    let upload = tokio::spawn(async move {
        client
            .upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(pb::UploadUpdateRequest {
        part: Some(pb::upload_update_request::Part::Header(header(
            &task,
            &b1,
            pb::Codec::Q8,
            20,
            2,
        ))),
    })
    .await
    .unwrap();
    tx.send(pb::UploadUpdateRequest {
        part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
            offset: 0,
            data: b1[..b1.len() / 2].to_vec(),
            total_bytes: b1.len() as u64,
            sha256: Vec::new(),
        })),
    })
    .await
    .unwrap();
    // The half upload has reached its temporary file.
    let deadline = tokio::time::Instant::now() + WAIT;
    while std::fs::read_dir(&incoming).unwrap().count() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no partial upload");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    first.kill();
    assert!(
        upload.await.unwrap().is_err(),
        "the cut upload was not acknowledged"
    );
    drop((p1, p2, p3, tx));

    // Restarted: the stream was live when the process died and its bytes were never
    // checkpointed (a payload this small is fsynced only when its stream breaks or ends), so
    // nothing of it is held: bytes after the last fsync are not trusted. plant-1's update
    // still counts, plant-2 learns it must send from byte 0 and does, plant-3 sends; the
    // process is killed again right after the last acknowledgement.
    let second = Process::start(&site, &config).await;
    assert_eq!(std::fs::read_dir(&incoming).unwrap().count(), 0);
    let partial = config.data_dir.join("blobs/partial");
    assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);
    let mut p2 = Plant::connect(&site, &second.url, "plant-2").await;
    p2.join(20).await;
    let held = p2
        .client
        .upload_status(pb::UploadStatusRequest {
            protocol_version: fedinspect_proto::PROTOCOL_VERSION,
            update_id: vec![2; 16],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((held.durable_bytes, held.accepted), (0, false));
    let task = p2.next_train().await;
    assert_eq!(task.round, 1);
    p2.upload(header(&task, &b1, pb::Codec::Q8, 20, 2), &b1, b1.len())
        .await
        .unwrap();
    let mut p3 = Plant::connect(&site, &second.url, "plant-3").await;
    p3.join(200).await;
    let task = p3.next_train().await;
    let b2 = payload(2);
    let ack = p3
        .upload(header(&task, &b2, pb::Codec::Q8, 200, 3), &b2, b2.len())
        .await
        .unwrap();
    assert!(!ack.duplicate);
    second.kill();
    drop((p2, p3));

    // Whether or not the killed process had published, the next one has version 2, and it is
    // the canonical FedAvg of exactly the three acknowledged updates.
    let third = Process::start(&site, &config).await;
    wait_for_version(&site, &third.url, 2).await;
    let mut p3 = Plant::connect(&site, &third.url, "plant-3").await;
    p3.register(200).await.unwrap();
    let (model, _) = ModelState::from_safetensors_bytes(&p3.download(2).await).unwrap();
    let expected = expected_fedavg(
        &base_model(),
        &[
            ("plant-1", 70, &b0, CODEC),
            ("plant-2", 20, &b1, CODEC),
            ("plant-3", 200, &b2, CODEC),
        ],
    );
    assert_eq!(model, expected);
    let models = admin(&site, &third.url, AdminCommand::Models { limit: 10 })
        .await
        .unwrap();
    let v2 = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == 2)
        .unwrap();
    assert_eq!(v2["contributions"].as_array().unwrap().len(), 3, "{v2}");
    drop(p3);
    third.kill();
}
