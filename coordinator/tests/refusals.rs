//! Refusals over real mutual TLS, each with its gRPC code and an audit entry: a certificate
//! from another CA, the wrong role on either service, a stale base, NaN, a norm over the bound,
//! an oversized payload, a cut-off stream, a wrong SHA-256, a revoked plant; and a replayed
//! update id, acknowledged as a duplicate and counted once.

mod support;

use fedinspect_common::delta::Codec;
use fedinspect_common::pki::{self, InitOptions};
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::{Limits, NormAction};
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use fedinspect_proto::v1::federation_client::FederationClient;
use support::*;
use tonic::Code;

const LIMIT_BYTES: u64 = 4096;

fn limits() -> Limits {
    Limits {
        max_update_bytes: LIMIT_BYTES,
        max_samples_per_plant: 1000,
        delta_norm_bound: Some(10.0),
        norm_action: NormAction::Reject,
        ..Limits::default()
    }
}

/// An f32 payload whose value at the first occurrence of a marker is replaced by NaN, with
/// the stream's trailing checksum recomputed, as a broken client would send it.
fn nan_payload() -> Vec<u8> {
    let mut delta = synthetic_delta(9, 0.01);
    let marker = 0.123_456_78_f32;
    delta.iter_mut().next().unwrap().1.data_mut()[5] = marker;
    let mut bytes = encode(&delta, Codec::F32);
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
async fn bad_updates_are_refused_with_their_codes_and_replays_count_once() {
    let site = Site::new(3);
    let config = site.config("data", policy(1, 2, 30, Codec::F32), limits());
    let running = start(&config).await;
    let url = url(&running);

    let mut p1 = Plant::connect(&site, &url, "plant-1").await;
    p1.join(100).await;
    let task = p1.next_train().await;
    let good = encode(&synthetic_delta(1, 0.01), Codec::F32);
    let f32c = pb::Codec::F32;
    let code = |r: Result<pb::UploadUpdateResponse, tonic::Status>| {
        let s = r.unwrap_err();
        assert!(!s.message().is_empty());
        (s.code(), s.message().to_string())
    };

    // Stale base version.
    let mut h = header(&task, &good, f32c, 100, 10);
    h.base_version = 99;
    let (c, m) = code(p1.upload(h, &good, good.len()).await);
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    assert!(m.contains("download version 1"), "{m}");

    // NaN inside an otherwise well-formed stream.
    let nan = nan_payload();
    let (c, m) = code(
        p1.upload(header(&task, &nan, f32c, 100, 11), &nan, nan.len())
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("non-finite"), "{m}");

    // Over the norm bound.
    let big = encode(&synthetic_delta(2, 5.0), Codec::F32);
    let (c, m) = code(
        p1.upload(header(&task, &big, f32c, 100, 12), &big, big.len())
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("L2 norm"), "{m}");

    // Over the payload limit.
    let mut h = header(&task, &good, f32c, 100, 13);
    h.payload_bytes = LIMIT_BYTES + 1;
    let (c, m) = code(p1.upload(h, &good, good.len()).await);
    assert_eq!(c, Code::ResourceExhausted, "{m}");

    // Over the sample cap.
    let (c, m) = code(
        p1.upload(header(&task, &good, f32c, 1001, 14), &good, good.len())
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{m}");

    // A stream cut off halfway, and a whole stream whose SHA-256 differs from the header's.
    let (c, m) = code(
        p1.upload(header(&task, &good, f32c, 100, 15), &good, good.len() / 2)
            .await,
    );
    assert_eq!(c, Code::DataLoss, "{m}");
    let mut h = header(&task, &good, f32c, 100, 16);
    h.payload_sha256[0] ^= 1;
    let (c, m) = code(p1.upload(h, &good, good.len()).await);
    assert_eq!(c, Code::DataLoss, "{m}");

    // Another codec than the round's.
    let f16 = encode(&synthetic_delta(1, 0.01), Codec::F16);
    let (c, m) = code(
        p1.upload(
            header(&task, &f16, pb::Codec::F16, 100, 17),
            &f16,
            f16.len(),
        )
        .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");

    // The good update, then its replay: acknowledged as a duplicate, never counted twice.
    let ack = p1
        .upload(header(&task, &good, f32c, 100, 1), &good, good.len())
        .await
        .unwrap();
    assert!(!ack.duplicate);
    let replay = p1
        .upload(header(&task, &good, f32c, 100, 1), &good, good.len())
        .await
        .unwrap();
    assert!(replay.duplicate);
    assert_eq!(replay.delta_sha256, ack.delta_sha256);
    // A second, different update from the same plant in the same round is refused.
    let other = encode(&synthetic_delta(3, 0.01), Codec::F32);
    let (c, m) = code(
        p1.upload(header(&task, &other, f32c, 100, 2), &other, other.len())
            .await,
    );
    assert_eq!(c, Code::AlreadyExists, "{m}");
    let status = p1
        .client
        .upload_status(pb::UploadStatusRequest {
            protocol_version: fedinspect_proto::PROTOCOL_VERSION,
            update_id: vec![1; 16],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.accepted);
    assert_eq!(status.durable_bytes, good.len() as u64);

    // An unregistered plant, then a revoked one.
    let mut p3 = Plant::connect(&site, &url, "plant-3").await;
    let (c, m) = code(
        p3.upload(header(&task, &good, f32c, 100, 30), &good, good.len())
            .await,
    );
    assert_eq!(c, Code::FailedPrecondition, "{m}");
    p3.register(5).await.unwrap();
    admin(
        &site,
        &url,
        AdminCommand::Revoke {
            plant: "plant-3".into(),
            reason: "stolen laptop".into(),
        },
    )
    .await
    .unwrap();
    let s = p3.register(5).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    assert!(s.message().contains("stolen laptop"));

    // plant-2 completes the round: exactly plant-1 and plant-2 contributed, once each.
    let mut p2 = Plant::connect(&site, &url, "plant-2").await;
    p2.join(50).await;
    let task2 = p2.next_train().await;
    assert_eq!(task2.round, 1);
    let good2 = encode(&synthetic_delta(2, 0.01), Codec::F32);
    p2.upload(
        header(&task2, &good2, f32c, 50, 2 + 100),
        &good2,
        good2.len(),
    )
    .await
    .unwrap();
    wait_for_version(&site, &url, 2).await;
    let models = admin(&site, &url, AdminCommand::Models { limit: 1 })
        .await
        .unwrap();
    let ids: Vec<&str> = models[0]["contributions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["plant_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["plant-1", "plant-2"]);
    let base = base_model();
    let expected = expected_fedavg(
        &base,
        &[
            ("plant-1", 100, &good, Codec::F32),
            ("plant-2", 50, &good2, Codec::F32),
        ],
    );
    let (published, _) = ModelState::from_safetensors_bytes(&p2.download(2).await).unwrap();
    assert_eq!(published, expected);

    // Every refusal left an audit entry.
    let audit = running.hub().store.audit_entries(100).unwrap();
    let refusals = audit.iter().filter(|e| e.action == "upload_update").count();
    assert_eq!(refusals, 10, "{audit:#?}");
    assert!(audit
        .iter()
        .any(|e| e.action == "revoke" && e.actor == "admin:admin"));

    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_of_the_wrong_role_are_refused() {
    let site = Site::new(1);
    let config = site.config("data", policy(1, 1, 30, Codec::F32), limits());
    let running = start(&config).await;
    let url = url(&running);

    // A plant certificate from another CA (trusting our CA for the server) never gets a reply.
    let other = tempfile::tempdir().unwrap();
    let foreign = pki::init(other.path(), &InitOptions::with_plant_count(1)).unwrap();
    let refused = match channel(
        &url,
        &site.pki.ca_cert(),
        &foreign.plant_cert("plant-1"),
        &foreign.plant_key("plant-1"),
    )
    .await
    {
        Err(_) => true,
        Ok(ch) => FederationClient::new(ch)
            .register(pb::RegisterRequest {
                protocol_version: fedinspect_proto::PROTOCOL_VERSION,
                capabilities: None,
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate from another CA must fail the handshake"
    );

    // An admin certificate on the federation service, a plant certificate on the admin one.
    let a = site.pki.admin_files();
    let ch = channel(&url, &a.ca_cert, &a.cert, &a.key).await.unwrap();
    let s = FederationClient::new(ch)
        .register(pb::RegisterRequest {
            protocol_version: fedinspect_proto::PROTOCOL_VERSION,
            capabilities: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    let p = site.pki.plant_files("plant-1");
    let ch = channel(&url, &p.ca_cert, &p.cert, &p.key).await.unwrap();
    let s = AdminClient::new(ch)
        .status(pb::StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());

    // A wrong protocol version.
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    let s = plant
        .client
        .register(pb::RegisterRequest {
            protocol_version: 99,
            capabilities: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());

    let audit = running.hub().store.audit_entries(100).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.actor == "admin:admin" && e.action == "register"),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e.actor == "plant:plant-1" && e.action == "status"),
        "{audit:#?}"
    );
    running.stop(WAIT).await.unwrap();
}
