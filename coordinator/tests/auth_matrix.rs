//! The authentication and authorisation matrix (issue 8): every Federation and Admin RPC
//! tried over real mutual TLS with no client certificate, a certificate from another CA, an
//! expired certificate, a revoked plant, a plant calling admin RPCs and an admin calling
//! plant RPCs; and a plant acting as another (another plant's update id, an update signed
//! with another plant's key, asking after another plant's upload). Every attempt is refused
//! with a clear status, and every refusal is in the audit log: the handshake ones through the
//! coordinator's TLS acceptor (`node::accept`, actor `unauthenticated`, action
//! `tls_handshake`, with the reason, the presented identity and the peer's address), the
//! others through the handlers.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fedinspect_common::delta::Codec;
use fedinspect_common::manifests::{UpdateManifest, UPDATE_KIND};
use fedinspect_common::pki::{self, InitOptions, Validity};
use fedinspect_common::signing::SigningKey;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_coordinator::Running;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use fedinspect_proto::v1::federation_client::FederationClient;
use fedinspect_proto::PROTOCOL_VERSION;
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Code, Status};

/// One RPC's outcome: `Ok` when the coordinator served it (for a stream, when the first
/// message came, or nothing came within a second: the stream was open).
type Outcome = (&'static str, Result<(), Status>);

const STREAM_WAIT: Duration = Duration::from_secs(1);

async fn first<T>(
    call: Result<tonic::Response<tonic::Streaming<T>>, Status>,
) -> Result<(), Status> {
    let mut stream = call?.into_inner();
    match tokio::time::timeout(STREAM_WAIT, stream.message()).await {
        Ok(Err(s)) => Err(s),
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

/// Every Federation RPC, with plausible requests.
async fn federation_rpcs(ch: Channel) -> Vec<Outcome> {
    let mut c = FederationClient::new(ch);
    let v = PROTOCOL_VERSION;
    let payload = encode(&synthetic_delta(7, 0.01), Codec::F32);
    let upload = vec![
        pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Header(pb::UpdateHeader {
                protocol_version: v,
                update_id: vec![0xEE; 16],
                round: 1,
                base_version: 1,
                codec: pb::Codec::F32.into(),
                num_samples: 10,
                payload_bytes: payload.len() as u64,
                payload_sha256: sha256(&payload),
                base_hash: vec![0; 32],
                plant_signature: vec![0; 64],
                ..Default::default()
            })),
        },
        pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
                offset: 0,
                data: payload.clone(),
                total_bytes: payload.len() as u64,
                sha256: Vec::new(),
            })),
        },
    ];
    vec![
        (
            "register",
            c.register(pb::RegisterRequest {
                protocol_version: v,
                capabilities: Some(pb::Capabilities {
                    device: "cpu".into(),
                    num_samples: 10,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "tasks",
            first(
                c.tasks(pb::TasksRequest {
                    protocol_version: v,
                })
                .await,
            )
            .await,
        ),
        (
            "download_model",
            first(
                c.download_model(pb::DownloadModelRequest {
                    protocol_version: v,
                    version: 1,
                    offset: 0,
                })
                .await,
            )
            .await,
        ),
        (
            "upload_update",
            c.upload_update(tokio_stream::iter(upload)).await.map(drop),
        ),
        (
            "upload_status",
            c.upload_status(pb::UploadStatusRequest {
                protocol_version: v,
                update_id: vec![0xEE; 16],
            })
            .await
            .map(drop),
        ),
        (
            "download_bundle",
            first(
                c.download_bundle(pb::DownloadBundleRequest {
                    protocol_version: v,
                    bundle_id: "v1".into(),
                    offset: 0,
                })
                .await,
            )
            .await,
        ),
        (
            "report_install",
            c.report_install(pb::ReportInstallRequest {
                protocol_version: v,
                bundle_id: "v1".into(),
                ok: true,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "report_calibration",
            c.report_calibration(pb::ReportCalibrationRequest {
                protocol_version: v,
                round: 1,
                ranges: vec![pb::ActivationRange {
                    node: "stem.conv".into(),
                    min: -1.0,
                    max: 1.0,
                }],
            })
            .await
            .map(drop),
        ),
    ]
}

/// Every Admin RPC, with plausible requests (the mutating ones aimed at real targets).
async fn admin_rpcs(ch: Channel) -> Vec<Outcome> {
    let mut c = AdminClient::new(ch);
    vec![
        ("status", c.status(pb::StatusRequest {}).await.map(drop)),
        (
            "list_plants",
            c.list_plants(pb::ListPlantsRequest {}).await.map(drop),
        ),
        (
            "list_rounds",
            c.list_rounds(pb::ListRoundsRequest { limit: 0 })
                .await
                .map(drop),
        ),
        (
            "list_models",
            c.list_models(pb::ListModelsRequest {
                limit: 0,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "promote",
            c.promote(pb::PromoteRequest {
                version: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        (
            "rollback",
            c.rollback(pb::RollbackRequest::default()).await.map(drop),
        ),
        (
            "revoke",
            c.revoke(pb::RevokeRequest {
                plant_id: "plant-1".into(),
                reason: "attack".into(),
            })
            .await
            .map(drop),
        ),
        (
            "release_plant_key",
            c.release_plant_key(pb::ReleasePlantKeyRequest {
                plant_id: "plant-1".into(),
            })
            .await
            .map(drop),
        ),
        (
            "get_round",
            c.get_round(pb::GetRoundRequest { round: 1 })
                .await
                .map(drop),
        ),
        (
            "export_model",
            first(
                c.export_model(pb::ExportModelRequest {
                    version: 1,
                    ..Default::default()
                })
                .await,
            )
            .await,
        ),
        (
            "list_audit",
            c.list_audit(pb::ListAuditRequest::default())
                .await
                .map(drop),
        ),
        ("check", c.check(pb::CheckRequest {}).await.map(drop)),
        (
            "bundle_status",
            c.bundle_status(pb::BundleStatusRequest {}).await.map(drop),
        ),
        (
            "confirm_bundle",
            c.confirm_bundle(pb::ConfirmBundleRequest {
                version: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        ),
    ]
}

/// Every outcome refused with `code`, a message, and an audit entry by `actor` for its action.
fn assert_refused_and_audited(
    case: &str,
    outcomes: &[Outcome],
    code: Code,
    running: &Running,
    actor: &str,
) {
    let audit = running.hub().store.audit_entries(10_000).unwrap();
    let audited: BTreeSet<&str> = audit
        .iter()
        .filter(|e| e.actor == actor)
        .map(|e| e.action.as_str())
        .collect();
    for (rpc, outcome) in outcomes {
        let s = outcome
            .as_ref()
            .expect_err(&format!("{case}: {rpc} was served"));
        assert_eq!(s.code(), code, "{case}: {rpc}: {}", s.message());
        assert!(!s.message().is_empty(), "{case}: {rpc} without a message");
        assert!(
            audited.contains(audit_action(rpc)),
            "{case}: {rpc} refused ({}) but not audited for {actor}; audited: {audited:?}",
            s.message()
        );
    }
}

/// The audit log's name of an RPC's action, where it differs from the RPC's.
fn audit_action(rpc: &str) -> &str {
    match rpc {
        "confirm_bundle" => "bundle_confirm",
        other => other,
    }
}

/// A TLS identity the server must refuse at the handshake: either the channel never opens,
/// or every RPC on it fails at the transport.
async fn assert_handshake_refused(case: &str, url: &str, tls: ClientTlsConfig) {
    let ch = Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await;
    let Ok(ch) = ch else { return };
    let outcomes = [federation_rpcs(ch.clone()).await, admin_rpcs(ch).await].concat();
    for (rpc, outcome) in outcomes {
        let s = outcome.expect_err(&format!("{case}: {rpc} was served"));
        assert!(
            matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{case}: {rpc}: {:?} {}",
            s.code(),
            s.message()
        );
    }
}

/// The three handshake refusals are in the audit log (written by a task, so waited for),
/// each with its reason, the peer's address and, where a certificate came, its identity; and
/// counted in the handshake metrics.
async fn assert_handshakes_audited(running: &Running) {
    use fedinspect_coordinator::node::refusal_audit::{ACTION, ACTOR};
    let expected = [
        ("no_certificate", None),
        ("unknown_issuer", Some("urn:fedinspect:plant:plant-1")),
        ("expired", Some("urn:fedinspect:plant:plant-1")),
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let audit = running.hub().store.audit_entries(10_000).unwrap();
        let handshakes: Vec<&str> = audit
            .iter()
            .filter(|e| e.actor == ACTOR && e.action == ACTION)
            .map(|e| e.detail.as_str())
            .collect();
        let missing: Vec<&str> = expected
            .iter()
            .filter(|(reason, identity)| {
                !handshakes.iter().any(|d| {
                    d.contains(&format!("refused: {reason} "))
                        && d.contains("(from 127.0.0.1:")
                        && identity.is_none_or(|id| d.contains(id))
                })
            })
            .map(|(reason, _)| *reason)
            .collect();
        if missing.is_empty() {
            assert!(
                audit.iter().all(|e| e.actor == ACTOR),
                "only handshake refusals so far: {audit:#?}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake refusals {missing:?} not audited; handshake entries: {handshakes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counted = running.hub().metrics.handshakes.counters();
    for (reason, _) in expected {
        let n = counted
            .refused
            .iter()
            .find(|(r, _)| r.as_str() == reason)
            .map_or(0, |(_, n)| *n);
        assert!(n >= 1, "{reason} not counted: {counted:?}");
    }
}

fn client_tls(site: &Site, cert: Option<(&std::path::Path, &std::path::Path)>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(site.pki.ca_cert()).unwrap(),
        ))
        .domain_name("localhost");
    match cert {
        None => tls,
        Some((c, k)) => tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        )),
    }
}

/// A signed header of an upload by `plant_id` (as the signer claims) for `task`.
fn signed_header(
    task: &pb::TrainTask,
    payload: &[u8],
    claimed_plant: &str,
    key: &SigningKey,
    id: u8,
) -> pb::UpdateHeader {
    let mut h = header(task, payload, pb::Codec::F32, 10, id);
    let m = UpdateManifest {
        kind: UPDATE_KIND.to_string(),
        plant_id: claimed_plant.to_string(),
        update_id: hex::encode(&h.update_id),
        round: h.round,
        base_version: h.base_version,
        base_hash: hex::encode(&h.base_hash),
        codec: "f32".into(),
        num_samples: h.num_samples,
        payload_sha256: hex::encode(&h.payload_sha256),
    };
    h.plant_signature = m.sign(key).unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_every_wrong_identity() {
    let site = Site::new(2);
    let config = site.config("data", policy(2, 2, 60, Codec::F32), Default::default());
    let running = start(&config).await;
    let url = url(&running);

    // No client certificate, a plant of another CA, an expired plant certificate of our CA.
    assert_handshake_refused("no client certificate", &url, client_tls(&site, None)).await;
    let other = tempfile::tempdir().unwrap();
    let foreign = pki::init(other.path(), &InitOptions::with_plant_count(1)).unwrap();
    let (fc, fk) = (foreign.plant_cert("plant-1"), foreign.plant_key("plant-1"));
    assert_handshake_refused("another CA", &url, client_tls(&site, Some((&fc, &fk)))).await;
    let expired_dir = tempfile::tempdir().unwrap();
    let expired = pki::issue_test_plant(
        site.pki.root(),
        "plant-1",
        Validity::expired(),
        expired_dir.path(),
    )
    .unwrap();
    assert_handshake_refused(
        "expired certificate",
        &url,
        client_tls(&site, Some((&expired.cert, &expired.key))),
    )
    .await;
    assert_handshakes_audited(&running).await;

    // Two plants with signing keys; the round opens once both hold a task stream.
    let keys = [
        SigningKey::generate().unwrap(),
        SigningKey::generate().unwrap(),
    ];
    let mut plants = Vec::new();
    for (id, key) in ["plant-1", "plant-2"].into_iter().zip(&keys) {
        let mut p = Plant::connect(&site, &url, id).await;
        p.client
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                capabilities: Some(pb::Capabilities {
                    device: "cpu".into(),
                    num_samples: 100,
                    ..Default::default()
                }),
                plant_public_key: key.verifying_key().as_bytes().to_vec(),
            })
            .await
            .unwrap();
        plants.push(p);
    }
    for p in &mut plants {
        // Not `join`: registering again without the key would replace the registered key.
        let tasks = p
            .client
            .tasks(pb::TasksRequest {
                protocol_version: PROTOCOL_VERSION,
            })
            .await
            .unwrap()
            .into_inner();
        p.tasks = Some(tasks);
    }
    let _ = plants[0].next_train().await;
    let task = plants[1].next_train().await;

    // plant-2 uploads its own update, signed with its key.
    let payload = encode(&synthetic_delta(2, 0.01), Codec::F32);
    let theirs = signed_header(&task, &payload, "plant-2", &keys[1], 2);
    plants[1]
        .upload(theirs.clone(), &payload, payload.len())
        .await
        .unwrap();

    // plant-1 acting as plant-2: its update id, its signature, its upload's status.
    let mine = encode(&synthetic_delta(1, 0.01), Codec::F32);
    let mut taken = signed_header(&task, &mine, "plant-1", &keys[0], 2);
    taken.update_id = theirs.update_id.clone();
    let s = plants[0]
        .upload(taken, &mine, mine.len())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::AlreadyExists, "{}", s.message());
    let forged = signed_header(&task, &mine, "plant-2", &keys[1], 3);
    let s = plants[0]
        .upload(forged, &mine, mine.len())
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains("signature"), "{}", s.message());
    let status = plants[0]
        .client
        .upload_status(pb::UploadStatusRequest {
            protocol_version: PROTOCOL_VERSION,
            update_id: theirs.update_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !status.accepted && status.durable_bytes == 0,
        "another plant's upload is not disclosed: {status:?}"
    );
    let audit = running.hub().store.audit_entries(10_000).unwrap();
    let by_plant_1: Vec<&str> = audit
        .iter()
        .filter(|e| e.actor == "plant:plant-1")
        .map(|e| e.detail.as_str())
        .collect();
    assert!(
        by_plant_1
            .iter()
            .any(|d| d.contains(&hex::encode(&theirs.update_id)))
            && by_plant_1.iter().any(|d| d.contains("signature")),
        "{by_plant_1:#?}"
    );

    // The key a plant registered first is pinned: registering another key, or none (which
    // would switch the signature check off), is refused and audited; an admin releases it.
    let other = SigningKey::generate().unwrap();
    for (what, key) in [
        ("another key", other.verifying_key().as_bytes().to_vec()),
        ("no key", Vec::new()),
    ] {
        let s = plants[0]
            .client
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                capabilities: Some(pb::Capabilities::default()),
                plant_public_key: key,
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {}", s.message());
        assert!(
            s.message().contains("release-key plant-1"),
            "{}",
            s.message()
        );
    }
    let refusals = running
        .hub()
        .store
        .audit_entries(10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.actor == "plant:plant-1" && e.detail.contains("pinned"))
        .count();
    assert_eq!(refusals, 2, "both key changes audited");
    admin(
        &site,
        &url,
        AdminCommand::ReleaseKey {
            plant: "plant-1".into(),
        },
    )
    .await
    .unwrap();
    plants[0]
        .client
        .register(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            capabilities: Some(pb::Capabilities::default()),
            plant_public_key: other.verifying_key().as_bytes().to_vec(),
        })
        .await
        .expect("after the release, the new key is pinned");
    let pinned = running.hub().store.plant("plant-1").unwrap().unwrap();
    assert_eq!(pinned.plant_public_key, other.verifying_key().as_bytes());

    // A plant on every Admin RPC; the admin on every Federation RPC.
    let p1 = site.pki.plant_files("plant-1");
    let ch = channel(&url, &p1.ca_cert, &p1.cert, &p1.key).await.unwrap();
    let outcomes = admin_rpcs(ch).await;
    assert_refused_and_audited(
        "plant on admin",
        &outcomes,
        Code::PermissionDenied,
        &running,
        "plant:plant-1",
    );
    let a = site.pki.admin_files();
    let ch = channel(&url, &a.ca_cert, &a.cert, &a.key).await.unwrap();
    let outcomes = federation_rpcs(ch).await;
    assert_refused_and_audited(
        "admin on federation",
        &outcomes,
        Code::PermissionDenied,
        &running,
        "admin:admin",
    );

    // A revoked plant, with its still-valid certificate, on every Federation RPC.
    admin(
        &site,
        &url,
        AdminCommand::Revoke {
            plant: "plant-2".into(),
            reason: "sent a poisoned update".into(),
        },
    )
    .await
    .unwrap();
    let p2 = site.pki.plant_files("plant-2");
    let ch = channel(&url, &p2.ca_cert, &p2.cert, &p2.key).await.unwrap();
    let outcomes = federation_rpcs(ch).await;
    assert_refused_and_audited(
        "revoked plant",
        &outcomes,
        Code::PermissionDenied,
        &running,
        "plant:plant-2",
    );
    for (rpc, outcome) in &outcomes {
        let m = outcome.as_ref().unwrap_err().message().to_string();
        assert!(m.contains("revoked"), "revoked plant on {rpc}: {m}");
    }

    running.stop(WAIT).await.unwrap();
}
