//! The coordinator's side of the bundle push, with raw gRPC plants (mutual TLS, fresh PKI) and
//! the default 640x640 detector, so the archive spans several chunks: promotion sends the
//! install task to the canary plant only (promoted over the Admin service); `DownloadBundle` streams the archive in chunks of at
//! most 1 MiB whose concatenation unpacks to a bundle that verifies with the coordinator key
//! and matches the task's manifest hash, and resumes at an offset; `ReportInstall` is recorded
//! (and a report of a bundle never pushed is refused); confirmation sends the task to the
//! other plant; a coordinator without `[bundles]` says so.

mod support;

use std::collections::BTreeMap;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::bundle::{unpack, verify_bundle, UnpackLimits};
use fedinspect_common::delta::Codec;
use fedinspect_common::model::Tensor;
use fedinspect_common::ModelState;
use fedinspect_coordinator::bundle::{
    BundleConfig, RawBundleSettings, RolloutReason, RolloutStage,
};
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::records::ModelStatus;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_coordinator::versions::{NewVersion, Versions};
use fedinspect_proto::v1 as pb;
use fedinspect_proto::{CHUNK_BYTES, PROTOCOL_VERSION};
use support::{admin, policy, sha256, url, Plant, Site, WAIT};

/// Deterministic weights for `arch` (an LCG), BatchNorm variances kept positive.
fn state(arch: &ArchConfig, seed: u64) -> ModelState {
    let mut x = seed;
    let mut state = ModelState::new();
    for spec in arch.graph().unwrap().params() {
        let n: usize = spec.shape.iter().product();
        let var = spec.name.ends_with("running_var");
        let data = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if var {
                    1.0 + 0.5 * u
                } else {
                    0.1 * u
                }
            })
            .collect();
        state
            .insert(spec.name, Tensor::new(spec.shape, data).unwrap())
            .unwrap();
    }
    state
}

async fn next_install(plant: &mut Plant) -> pb::InstallBundleTask {
    let stream = plant.tasks.as_mut().expect("join first");
    let task = tokio::time::timeout(WAIT * 6, stream.message())
        .await
        .expect("an install task within the wait")
        .unwrap()
        .expect("the task stream is open");
    match task.kind {
        Some(pb::task::Kind::InstallBundle(t)) => t,
        other => panic!("expected an install task, got {other:?}"),
    }
}

/// The archive from `offset`, its chunks checked; returns (bytes, final SHA-256, chunk count).
async fn download(plant: &mut Plant, id: &str, offset: u64) -> (Vec<u8>, Vec<u8>, usize) {
    let mut stream = plant
        .client
        .download_bundle(pb::DownloadBundleRequest {
            protocol_version: PROTOCOL_VERSION,
            bundle_id: id.to_string(),
            offset,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut bytes, mut digest, mut chunks) = (Vec::new(), Vec::new(), 0);
    let mut total = None;
    while let Some(c) = stream.message().await.unwrap() {
        assert_eq!(c.offset, offset + bytes.len() as u64, "contiguous chunks");
        assert!(
            c.data.len() <= CHUNK_BYTES,
            "chunk of {} bytes",
            c.data.len()
        );
        assert_eq!(*total.get_or_insert(c.total_bytes), c.total_bytes);
        bytes.extend_from_slice(&c.data);
        digest = c.sha256;
        chunks += 1;
    }
    assert_eq!(total, Some(offset + bytes.len() as u64));
    (bytes, digest, chunks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_streams_the_bundle_to_the_canary_then_to_all_after_confirmation() {
    let site = Site::new(2);
    let arch = ArchConfig::default();
    state(&arch, 1)
        .save_safetensors(&site.checkpoint, &BTreeMap::new())
        .unwrap();
    let mut config = site.config("c", policy(10, 10, 600, Codec::F16), Limits::default());
    let names: Vec<String> = (0..arch.num_classes).map(|i| format!("class{i}")).collect();
    let raw: RawBundleSettings = toml::from_str(&format!(
        "trtexec = \"off\"\ncanary_plants = [\"plant-1\"]\nclass_names = {}\n",
        serde_json::to_string(&names).unwrap()
    ))
    .unwrap();
    let raw = RawBundleSettings {
        architecture: Some(arch.clone()),
        ..raw
    };
    config.bundles =
        Some(BundleConfig::resolve(raw, site.dir.path(), &config.data_dir, None).unwrap());
    let running = support::start(&config).await;
    let url = url(&running);
    let hub = running.hub().clone();
    let mut p1 = Plant::connect(&site, &url, "plant-1").await;
    let mut p2 = Plant::connect(&site, &url, "plant-2").await;
    p1.join(10).await;
    p2.join(10).await;

    // Version 2 promoted over the Admin service: its bundle goes to the canary only.
    let signer =
        fedinspect_common::signing::SigningKey::load(&site.pki.coordinator_signing_key()).unwrap();
    Versions {
        store: &hub.store,
        blobs: &hub.blobs,
        signer: &signer,
    }
    .store(
        NewVersion {
            version: 2,
            model: &state(&arch, 2),
            parent: 1,
            round: 1,
            strategy: "test",
            contributors: Vec::new(),
            metrics: BTreeMap::new(),
            status: ModelStatus::Candidate,
        },
        None,
    )
    .unwrap();
    admin(
        &site,
        &url,
        AdminCommand::Promote {
            version: 2,
            force: true,
        },
    )
    .await
    .unwrap();
    let push = hub.bundles.get().unwrap().clone();
    let task = next_install(&mut p1).await;
    assert!(task.canary);
    assert_eq!(task.model_version, 2);
    assert!(task.bundle_id.starts_with("v2-"), "{task:?}");

    // The archive: several chunks of at most 1 MiB, the whole matching the last chunk's hash.
    let (archive, digest, chunks) = download(&mut p1, &task.bundle_id, 0).await;
    assert!(chunks >= 4, "{} bytes in {chunks} chunks", archive.len());
    assert_eq!(digest, sha256(&archive));
    println!(
        "bundle {}: archive {} bytes in {chunks} chunks",
        task.bundle_id,
        archive.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b");
    std::fs::create_dir(&out).unwrap();
    unpack(&archive[..], &out, &UnpackLimits::default()).unwrap();
    let verified = verify_bundle(&out, &site.verifying_key()).unwrap();
    assert_eq!(
        hex::decode(&verified.manifest_sha256).unwrap(),
        task.manifest_sha256
    );
    assert_eq!(verified.manifest.class_names, names);
    assert!(verified
        .manifest
        .engine_note
        .contains("bundles.trtexec = \"off\""));
    // Resumed at an offset: the rest of the same bytes.
    let (tail, _, _) = download(&mut p1, &task.bundle_id, 3_000_000).await;
    assert_eq!(tail, archive[3_000_000..]);

    // A bad id and a bundle not stored are refused.
    for id in ["../etc", "v9-0000000000000000"] {
        let err = p1
            .client
            .download_bundle(pb::DownloadBundleRequest {
                protocol_version: PROTOCOL_VERSION,
                bundle_id: id.into(),
                offset: 0,
            })
            .await
            .map(|_| ())
            .expect_err("a bad or unknown id must be refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{id}: {err:?}");
    }

    // Reports: the canary's is recorded; one of a bundle never pushed is refused.
    let report = |bundle_id: &str, ok: bool| pb::ReportInstallRequest {
        protocol_version: PROTOCOL_VERSION,
        bundle_id: bundle_id.into(),
        ok,
        message: "installed bundle (test)".into(),
        engine_built_locally: true,
    };
    p1.client
        .report_install(report(&task.bundle_id, true))
        .await
        .unwrap();
    let err = p1
        .client
        .report_install(report("v9-0000000000000000", false))
        .await
        .unwrap_err();
    assert!(err.message().contains("never pushed"), "{err:?}");
    let status = admin(&site, &url, AdminCommand::BundleStatus)
        .await
        .unwrap();
    assert_eq!(status["current"]["stage"], "canary", "{status}");
    let plants = status["current"]["plants"].as_array().unwrap();
    assert_eq!(
        plants.len(),
        1,
        "only the canary is in the rollout: {status}"
    );
    assert_eq!(plants[0]["result"], "installed");
    assert_eq!(plants[0]["engine_built_locally"], true);

    // Confirming another version is refused; this one sends the task to plant-2.
    let err = admin(
        &site,
        &url,
        AdminCommand::BundleConfirm {
            version: 1,
            force: false,
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not 1"), "{err}");
    admin(
        &site,
        &url,
        AdminCommand::BundleConfirm {
            version: 2,
            force: false,
        },
    )
    .await
    .unwrap();
    let task2 = next_install(&mut p2).await;
    assert!(!task2.canary);
    assert_eq!(task2.bundle_id, task.bundle_id);
    assert_eq!(push.current().unwrap().stage, RolloutStage::All);
    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_bundles_says_it_serves_none() {
    let site = Site::new(1);
    let config = site.config("c", policy(1, 1, 600, Codec::F16), Limits::default());
    let running = support::start(&config).await;
    let url = url(&running);
    let mut p = Plant::connect(&site, &url, "plant-1").await;
    p.join(1).await;
    let err = p
        .client
        .download_bundle(pb::DownloadBundleRequest {
            protocol_version: PROTOCOL_VERSION,
            bundle_id: "v1-0000000000000000".into(),
            offset: 0,
        })
        .await
        .map(|_| ())
        .expect_err("no bundles");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("[bundles]"), "{err:?}");
    let err = admin(&site, &url, AdminCommand::BundleStatus)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("[bundles]"), "{err}");
    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_canary_failure_the_push_goes_to_all_after_the_quiet_delay() {
    let site = Site::new(2);
    let arch = ArchConfig {
        input_size: 64,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    };
    state(&arch, 1)
        .save_safetensors(&site.checkpoint, &BTreeMap::new())
        .unwrap();
    let mut config = site.config("c", policy(10, 10, 600, Codec::F16), Limits::default());
    let names: Vec<String> = (0..arch.num_classes).map(|i| format!("class{i}")).collect();
    let raw: RawBundleSettings = toml::from_str(&format!(
        "trtexec = \"off\"\ncanary_plants = [\"plant-1\"]\nconfirm_after_secs = 1\n\
         class_names = {}\n",
        serde_json::to_string(&names).unwrap()
    ))
    .unwrap();
    let raw = RawBundleSettings {
        architecture: Some(arch.clone()),
        ..raw
    };
    config.bundles =
        Some(BundleConfig::resolve(raw, site.dir.path(), &config.data_dir, None).unwrap());
    let running = support::start(&config).await;
    let url = url(&running);
    let hub = running.hub().clone();
    let mut p1 = Plant::connect(&site, &url, "plant-1").await;
    let mut p2 = Plant::connect(&site, &url, "plant-2").await;
    p1.join(10).await;
    p2.join(10).await;
    // Version 1 was promoted by init-model, before any bundle: promoting it again pushes it.
    admin(
        &site,
        &url,
        AdminCommand::Promote {
            version: 1,
            force: false,
        },
    )
    .await
    .unwrap();
    let push = hub.bundles.get().unwrap().clone();
    let task = next_install(&mut p1).await;
    assert!(task.canary);
    assert_eq!(push.current().unwrap().reason, RolloutReason::Promotion);

    // No report yet: the delay passes but nothing goes to plant-2.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(push.current().unwrap().stage, RolloutStage::Canary);
    p1.client
        .report_install(pb::ReportInstallRequest {
            protocol_version: PROTOCOL_VERSION,
            bundle_id: task.bundle_id.clone(),
            ok: true,
            message: "installed".into(),
            engine_built_locally: false,
        })
        .await
        .unwrap();
    let task2 = next_install(&mut p2).await;
    assert_eq!(task2.bundle_id, task.bundle_id);
    let rollout = push.current().unwrap();
    assert_eq!(rollout.stage, RolloutStage::All);
    assert_eq!(rollout.confirmed_by.as_deref(), Some("coordinator"));
    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contributors_calibration_ranges_make_the_int8_variant() {
    use fedinspect_common::bundle::FileRole;
    use fedinspect_common::onnx::{qdq, ActivationRange, ActivationRanges};
    use fedinspect_coordinator::records::{Contribution, Digest};

    let site = Site::new(2);
    let arch = ArchConfig {
        input_size: 64,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    };
    state(&arch, 1)
        .save_safetensors(&site.checkpoint, &BTreeMap::new())
        .unwrap();
    let mut config = site.config("c", policy(10, 10, 600, Codec::F16), Limits::default());
    let names: Vec<String> = (0..arch.num_classes).map(|i| format!("class{i}")).collect();
    let raw: RawBundleSettings = toml::from_str(&format!(
        "trtexec = \"off\"\nclass_names = {}\n",
        serde_json::to_string(&names).unwrap()
    ))
    .unwrap();
    let raw = RawBundleSettings {
        architecture: Some(arch.clone()),
        ..raw
    };
    config.bundles =
        Some(BundleConfig::resolve(raw, site.dir.path(), &config.data_dir, None).unwrap());
    let running = support::start(&config).await;
    let url = url(&running);
    let hub = running.hub().clone();
    let push = hub.bundles.get().unwrap().clone();

    // A plant without an accepted update in the round may not send ranges.
    let mut p1 = Plant::connect(&site, &url, "plant-1").await;
    p1.join(10).await;
    let err = p1
        .client
        .report_calibration(pb::ReportCalibrationRequest {
            protocol_version: PROTOCOL_VERSION,
            round: 1,
            ranges: vec![pb::ActivationRange {
                node: "images".into(),
                min: 0.0,
                max: 1.0,
            }],
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("no accepted update"), "{err:?}");

    // Version 2 from round 1 by plants 1 and 2, each with its ranges.
    let contribution = |plant: &str| Contribution {
        plant_id: plant.into(),
        num_samples: 10,
        delta_sha256: Digest([0; 32]),
        plant_signature: Vec::new(),
    };
    let signer =
        fedinspect_common::signing::SigningKey::load(&site.pki.coordinator_signing_key()).unwrap();
    Versions {
        store: &hub.store,
        blobs: &hub.blobs,
        signer: &signer,
    }
    .store(
        NewVersion {
            version: 2,
            model: &state(&arch, 2),
            parent: 1,
            round: 1,
            strategy: "test",
            contributors: vec![contribution("plant-1"), contribution("plant-2")],
            metrics: BTreeMap::new(),
            status: ModelStatus::Candidate,
        },
        None,
    )
    .unwrap();
    let points = qdq::calibration_points(&arch.graph().unwrap());
    let ranges = |extent: f32| -> ActivationRanges {
        points
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    ActivationRange {
                        min: -extent,
                        max: extent,
                    },
                )
            })
            .collect()
    };
    // Only half of plant-1's points: alone they do not cover the model.
    let half: ActivationRanges = ranges(2.0).into_iter().take(points.len() / 2).collect();
    push.record_calibration(1, "plant-1", &half).unwrap();
    let built = {
        let (push, hub) = (push.clone(), hub.clone());
        tokio::task::spawn_blocking(move || push.build_version(&hub, 2))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(built
        .manifest
        .file_with_role(FileRole::OnnxInt8Qdq)
        .is_none());
    push.record_calibration(1, "plant-2", &ranges(3.0)).unwrap();
    // A second later the manifest (built_at) differs, so the build is fresh.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let built = {
        let (push, hub) = (push.clone(), hub.clone());
        tokio::task::spawn_blocking(move || push.build_version(&hub, 2))
            .await
            .unwrap()
            .unwrap()
    };
    let int8 = built
        .manifest
        .file_with_role(FileRole::OnnxInt8Qdq)
        .expect("an INT8 QDQ file from the merged ranges");
    let fp32 = built.manifest.file_with_role(FileRole::OnnxFp32).unwrap();
    assert!(int8.size < fp32.size, "{} vs {}", int8.size, fp32.size);
    println!(
        "bundle {}: model-fp32.onnx {} bytes, model-int8-qdq.onnx {} bytes",
        built.id, fp32.size, int8.size
    );
    running.stop(WAIT).await.unwrap();
}
