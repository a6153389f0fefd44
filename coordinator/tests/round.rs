//! Whole rounds over real mutual TLS: three plants complete a round and the published model is
//! the canonical FedAvg of their deltas; the running mean fed at intake takes refused uploads
//! out again and equals the published model when the sums are exact; a round short of its
//! minimum fails at the deadline and the next one opens; sixteen plants registering and
//! uploading at once are all served; the admin flows over the result.

mod support;

use fedinspect_common::delta::Codec;
use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::hub::PreviewOutcome;
use fedinspect_coordinator::manifest;
use fedinspect_coordinator::records::RoundState;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_proto::v1 as pb;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_plants_complete_a_round_with_the_canonical_fedavg() {
    let site = Site::new(3);
    let config = site.config("data", policy(3, 3, 30, Codec::F16), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let base = base_model();

    let samples = [("plant-1", 120u64), ("plant-2", 300), ("plant-3", 45)];
    let mut plants = Vec::new();
    for (id, n) in samples {
        let mut p = Plant::connect(&site, &url, id).await;
        let reg = p.join(n).await;
        assert_eq!(reg.plant_id, id, "the id comes from the certificate");
        assert_eq!(reg.coordinator_id, "coordinator");
        let key = VerifyingKey::from_bytes(reg.coordinator_public_key.try_into().unwrap());
        assert_eq!(key, site.verifying_key());
        plants.push(p);
    }

    let mut payloads = Vec::new();
    for (i, p) in plants.iter_mut().enumerate() {
        let task = p.next_train().await;
        assert_eq!((task.round, task.base_version), (1, 1));
        let plan = task.plan.unwrap();
        assert_eq!(plan.codec, pb::Codec::F16 as i32);
        let hash = fedinspect_common::ModelHash(task.base_hash.clone().try_into().unwrap());
        assert_eq!(hash, base.content_hash());
        manifest::verify_model(&site.verifying_key(), 1, &hash, &task.base_signature).unwrap();
        let (downloaded, _) = ModelState::from_safetensors_bytes(&p.download(1).await).unwrap();
        assert_eq!(downloaded, base);

        let payload = encode(&synthetic_delta(i as u64 + 1, 0.01), Codec::F16);
        let h = header(&task, &payload, pb::Codec::F16, samples[i].1, i as u8 + 1);
        let ack = p.upload(h, &payload, payload.len()).await.unwrap();
        assert!(!ack.duplicate);
        assert_eq!(ack.delta_sha256, sha256(&payload));
        payloads.push(payload);
    }

    wait_for_version(&site, &url, 2).await;
    let expected = expected_fedavg(
        &base,
        &[
            ("plant-1", 120, &payloads[0], Codec::F16),
            ("plant-2", 300, &payloads[1], Codec::F16),
            ("plant-3", 45, &payloads[2], Codec::F16),
        ],
    );
    let (published, _) = ModelState::from_safetensors_bytes(&plants[0].download(2).await).unwrap();
    assert_eq!(published, expected, "bit for bit the canonical FedAvg");

    let models = admin(&site, &url, AdminCommand::Models { limit: 10 })
        .await
        .unwrap();
    let v2 = &models[0];
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["parent"], 1);
    assert_eq!(v2["round"], 1);
    assert_eq!(v2["status"], "candidate");
    assert_eq!(v2["content_hash"], expected.content_hash().to_hex());
    let contributions = v2["contributions"].as_array().unwrap();
    let got: Vec<(String, u64, String)> = contributions
        .iter()
        .map(|c| {
            (
                c["plant_id"].as_str().unwrap().to_string(),
                c["num_samples"].as_u64().unwrap(),
                c["delta_sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, u64, String)> = samples
        .iter()
        .zip(&payloads)
        .map(|((id, n), p)| (id.to_string(), *n, hex::encode(sha256(p))))
        .collect();
    assert_eq!(got, want, "contributors in plant-id order");
    let sig = hex::decode(v2["signature"].as_str().unwrap()).unwrap();
    manifest::verify_model(&site.verifying_key(), 2, &expected.content_hash(), &sig).unwrap();
    // Sample-weighted train_loss: (120·1 + 300·2 + 45·3) / 465.
    let loss = v2["metrics"]["train_loss"].as_f64().unwrap();
    assert!((loss - 855.0 / 465.0).abs() < 1e-12, "{loss}");

    let rounds = admin(&site, &url, AdminCommand::Rounds { limit: 10 })
        .await
        .unwrap();
    let r1 = rounds
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["round"] == 1)
        .unwrap();
    assert_eq!(r1["state"], RoundState::Published.as_str());
    assert_eq!(r1["published_version"], 2);
    assert_eq!(r1["participants"], 3);
    // Traffic of the round: the three payloads in, version 1 out to each plant once.
    let r1 = running.hub().store.round(1).unwrap().unwrap();
    let v1 = running.hub().store.model(1).unwrap().unwrap();
    let sent: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    assert_eq!(r1.bytes_received, sent);
    assert_eq!(r1.bytes_sent, 3 * v1.size_bytes);
    // f16 noise is not an exact case: the running mean may differ by rounding, but it held
    // exactly the three contributions.
    let check = running.hub().last_preview_check().unwrap();
    assert_eq!(check.round, 1);
    assert!(
        !matches!(check.outcome, PreviewOutcome::Unavailable(_)),
        "{check:?}"
    );

    // The next round opens on version 2 for the same plants.
    let next = plants[0].next_train().await;
    assert_eq!((next.round, next.base_version), (2, 2));

    // Promotion is gated on an evaluation; force skips it; rollback returns to version 1.
    let refused = admin(
        &site,
        &url,
        AdminCommand::Promote {
            version: 2,
            force: false,
        },
    )
    .await;
    assert!(format!("{}", refused.unwrap_err()).contains("eval_map50"));
    let promoted = admin(
        &site,
        &url,
        AdminCommand::Promote {
            version: 2,
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(promoted["status"], "promoted");
    let back = admin(&site, &url, AdminCommand::Rollback { to: 0 })
        .await
        .unwrap();
    assert_eq!(back["version"], 1);
    let status = admin(&site, &url, AdminCommand::Status).await.unwrap();
    assert_eq!(status["promoted_version"], 1);
    assert_eq!(status["plants_registered"], 3);
    let models = admin(&site, &url, AdminCommand::Models { limit: 10 })
        .await
        .unwrap();
    assert_eq!(models[0]["status"], "rolled_back");

    running.stop(WAIT).await.unwrap();
}

/// An f32 payload of `delta` whose first value of `head.weight` (the last tensor, so the
/// tensors before it are decoded and fed to the running mean first) is NaN, with the stream's
/// checksum recomputed, as a diverged client would send it.
fn nan_in_last_tensor(delta: &fedinspect_common::ModelState) -> Vec<u8> {
    let mut d = delta.clone();
    let marker = 0.123_456_78_f32;
    d.iter_mut()
        .find(|(name, _)| *name == "head.weight")
        .unwrap()
        .1
        .data_mut()[0] = marker;
    let mut bytes = encode(&d, Codec::F32);
    let at = bytes
        .windows(4)
        .position(|w| w == marker.to_le_bytes())
        .unwrap();
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let body = bytes.len() - 32;
    let sum = sha256(&bytes[..body]);
    bytes[body..].copy_from_slice(&sum);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_mean_takes_refused_uploads_out_and_equals_the_published_model() {
    let site = Site::new(3);
    let limits = Limits {
        delta_norm_bound: Some(1.0),
        ..Limits::default()
    };
    let config = site.config("data", policy(3, 3, 30, Codec::F32), limits);
    let running = start(&config).await;
    let url = url(&running);
    let samples = [("plant-1", 120u64), ("plant-2", 300), ("plant-3", 45)];
    let mut plants = Vec::new();
    for (id, n) in samples {
        let mut p = Plant::connect(&site, &url, id).await;
        p.join(n).await;
        plants.push(p);
    }
    let f32c = pb::Codec::F32;
    let mut payloads = Vec::new();
    for (i, p) in plants.iter_mut().enumerate() {
        let task = p.next_train().await;
        let delta = exact_delta(i as u64 + 1);
        let good = encode(&delta, Codec::F32);
        let n = samples[i].1;
        // Refused after part of the values reached the running mean: each must be taken out.
        let refused = match i {
            0 => {
                let nan = nan_in_last_tensor(&delta);
                p.upload(header(&task, &nan, f32c, n, 50), &nan, nan.len())
                    .await
            }
            1 => {
                p.upload(header(&task, &good, f32c, n, 51), &good, good.len() - 700)
                    .await
            }
            _ => {
                let big = encode(&synthetic_delta(9, 1.0), Codec::F32);
                p.upload(header(&task, &big, f32c, n, 52), &big, big.len())
                    .await
            }
        };
        assert!(refused.is_err(), "plant {i}: {refused:?}");
        p.upload(
            header(&task, &good, f32c, n, i as u8 + 1),
            &good,
            good.len(),
        )
        .await
        .unwrap();
        payloads.push(good);
    }
    wait_for_version(&site, &url, 2).await;
    let expected = expected_fedavg(
        &base_model(),
        &[
            ("plant-1", 120, &payloads[0], Codec::F32),
            ("plant-2", 300, &payloads[1], Codec::F32),
            ("plant-3", 45, &payloads[2], Codec::F32),
        ],
    );
    let (published, _) = ModelState::from_safetensors_bytes(&plants[0].download(2).await).unwrap();
    assert_eq!(published, expected);
    let deadline = tokio::time::Instant::now() + WAIT;
    let check = loop {
        match running.hub().last_preview_check() {
            Some(c) if c.round == 1 => break c,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            other => panic!("no comparison for round 1: {other:?}"),
        }
    };
    assert_eq!(check.outcome, PreviewOutcome::Exact);
    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_plants_registering_and_uploading_at_once_complete_the_round() {
    const K: usize = 16;
    let site = Site::new(K);
    let config = site.config(
        "data",
        policy(K as u32, K as u32, 60, Codec::F32),
        Limits::default(),
    );
    let running = start(&config).await;
    let url = url(&running);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..K {
        let (site_pki, url) = (site.pki.clone(), url.clone());
        tasks.spawn(async move {
            let id = format!("plant-{}", k + 1);
            let files = site_pki.plant_files(&id);
            let ch = channel(&url, &files.ca_cert, &files.cert, &files.key)
                .await
                .unwrap();
            let mut p = Plant {
                id,
                client: fedinspect_proto::v1::federation_client::FederationClient::new(ch),
                tasks: None,
            };
            let n = 10 + k as u64;
            p.join(n).await;
            let task = p.next_train().await;
            let payload = encode(&exact_delta(k as u64), Codec::F32);
            p.upload(
                header(&task, &payload, pb::Codec::F32, n, k as u8 + 1),
                &payload,
                payload.len(),
            )
            .await
            .unwrap();
            (p.id, n, payload)
        });
    }
    let mut sent = Vec::new();
    while let Some(done) = tokio::time::timeout(WAIT, tasks.join_next())
        .await
        .expect("every plant is served")
    {
        sent.push(done.unwrap());
    }
    wait_for_version(&site, &url, 2).await;
    let uploads: Vec<(&str, u64, &[u8], Codec)> = sent
        .iter()
        .map(|(id, n, p)| (id.as_str(), *n, p.as_slice(), Codec::F32))
        .collect();
    let expected = expected_fedavg(&base_model(), &uploads);
    let mut p = Plant::connect(&site, &url, "plant-1").await;
    let (published, _) = ModelState::from_safetensors_bytes(&p.download(2).await).unwrap();
    assert_eq!(published, expected);
    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_short_of_its_minimum_fails_at_the_deadline_and_the_next_opens() {
    let site = Site::new(2);
    let config = site.config("data", policy(2, 2, 1, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let mut p1 = Plant::connect(&site, &url, "plant-1").await;
    let mut p2 = Plant::connect(&site, &url, "plant-2").await;
    p1.join(10).await;
    p2.join(10).await;
    let task = p1.next_train().await;
    let payload = encode(&synthetic_delta(1, 0.01), Codec::F32);
    p1.upload(
        header(&task, &payload, pb::Codec::F32, 10, 1),
        &payload,
        payload.len(),
    )
    .await
    .unwrap();

    // plant-2 never answers: round 1 fails at its deadline and round 2 opens on version 1.
    let first = p2.next_train().await;
    assert_eq!(first.round, 1);
    let second = p2.next_train().await;
    assert_eq!((second.round, second.base_version), (2, 1));
    let rounds = admin(&site, &url, AdminCommand::Rounds { limit: 10 })
        .await
        .unwrap();
    let r1 = rounds
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["round"] == 1)
        .unwrap();
    assert_eq!(r1["state"], "failed");
    assert_eq!(r1["participants"], 1);
    assert!(
        r1["failure"]
            .as_str()
            .unwrap()
            .contains("only 1 of the required 2"),
        "{r1}"
    );
    let status = admin(&site, &url, AdminCommand::Status).await.unwrap();
    assert_eq!(status["latest_version"], 1);

    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_over_the_norm_bound_is_clipped_when_configured() {
    use fedinspect_common::delta::{self, Layout};
    use fedinspect_coordinator::aggregation::apply_scale;
    use fedinspect_coordinator::config::NormAction;
    use fedinspect_coordinator::records::UpdateId;

    let site = Site::new(1);
    let limits = Limits {
        delta_norm_bound: Some(1.0),
        norm_action: NormAction::Clip,
        ..Limits::default()
    };
    let running = start(&site.config("data", policy(1, 1, 30, Codec::F32), limits)).await;
    let url = url(&running);
    let mut p = Plant::connect(&site, &url, "plant-1").await;
    p.join(10).await;
    let task = p.next_train().await;
    let payload = encode(&synthetic_delta(5, 1.0), Codec::F32);
    p.upload(
        header(&task, &payload, pb::Codec::F32, 10, 1),
        &payload,
        payload.len(),
    )
    .await
    .unwrap();
    wait_for_version(&site, &url, 2).await;

    let record = running
        .hub()
        .store
        .update_by_id(&UpdateId([1; 16]))
        .unwrap()
        .unwrap();
    let scale = record.clip_scale.expect("the delta was clipped");
    assert!(record.l2_norm > 1.0);
    assert!((f64::from(scale) - 1.0 / record.l2_norm).abs() < 1e-6);
    let base = base_model();
    let mut clipped = delta::decode_to_model(payload.as_slice(), &Layout::of(&base), None).unwrap();
    apply_scale(&mut clipped, scale);
    let expected = fedinspect_common::fedavg::aggregate_canonical(
        &base,
        &[fedinspect_common::fedavg::PlantUpdate::new(
            "plant-1", 10, &clipped,
        )],
    )
    .unwrap();
    let (published, _) = ModelState::from_safetensors_bytes(&p.download(2).await).unwrap();
    assert_eq!(published, expected, "FedAvg of the clipped delta");
    // The running mean rescaled the clipped delta: with one plant every sum is exact.
    let deadline = tokio::time::Instant::now() + WAIT;
    while running.hub().last_preview_check().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no comparison");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        running.hub().last_preview_check().unwrap().outcome,
        PreviewOutcome::Exact
    );
    running.stop(WAIT).await.unwrap();
}
