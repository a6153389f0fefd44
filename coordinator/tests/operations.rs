//! What central IT watches and checks, against a real coordinator over mutual TLS on loopback:
//! the Prometheus endpoint's numbers move with a real round (and a refused upload); the gRPC
//! health service reports both services serving; the audit log lists refusals, revocations,
//! promotions and rollbacks (`coordinator admin audit`); `rounds` shows each round's bytes;
//! an unknown round is NOT_FOUND; `coordinator admin check` passes on a healthy data directory
//! and fails, naming the file, once a blob is corrupted.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use fedinspect_common::delta::Codec;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// `GET /metrics` over plain HTTP/1.1; returns the body.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// Scrapes until `ready` holds for the body (at most 10 s), and returns that body.
async fn scrape_when(addr: std::net::SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(addr).await;
        if ready(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the awaited figure never came:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the sample `name` (with its labels, as written) in a scrape.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// Runs `coordinator admin --addr URL --pki PKI --json ARGS` on a blocking thread.
async fn cli(url: &str, pki: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    cmd.args(["admin", "--addr", url, "--pki"])
        .arg(pki)
        .arg("--json")
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_real_round_and_health_reports_serving() {
    let site = Site::new(2);
    let mut config = site.config("data", policy(2, 2, 30, Codec::F32), Limits::default());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let running = start(&config).await;
    let url = url(&running);
    let metrics = running.metrics_addr().expect("metrics are configured");

    let before = scrape(metrics).await;
    assert_eq!(sample(&before, "fedinspect_model_version_latest"), 1.0);
    assert_eq!(sample(&before, "fedinspect_plants_connected"), 0.0);
    assert_eq!(
        sample(&before, "fedinspect_updates_total{result=\"accepted\"}"),
        0.0
    );

    // Health over mTLS, with a plant's certificate: the server and both services serve.
    let files = files_of(&site, "plant-1");
    let ch = channel(&url, &files.ca_cert, &files.cert, &files.key)
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    for service in ["", "fedinspect.v1.Federation", "fedinspect.v1.Admin"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service '{service}'"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "fedinspect.v1.Nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // A round: both plants download version 1; plant-1 first sends a stale update (refused),
    // then both send real ones.
    let mut plants = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = Plant::connect(&site, &url, id).await;
        p.join(50).await;
        plants.push(p);
    }
    let during = scrape(metrics).await;
    assert_eq!(sample(&during, "fedinspect_plants_connected"), 2.0);
    let mut payloads = Vec::new();
    let mut downloaded = 0u64;
    for (i, p) in plants.iter_mut().enumerate() {
        let task = p.next_train().await;
        downloaded += p.download(1).await.len() as u64;
        let payload = encode(&synthetic_delta(i as u64 + 1, 0.01), Codec::F32);
        if i == 0 {
            let mut stale = header(&task, &payload, pb::Codec::F32, 50, 90);
            stale.base_version = 7;
            let err = p.upload(stale, &payload, payload.len()).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        }
        let h = header(&task, &payload, pb::Codec::F32, 50, i as u8 + 1);
        p.upload(h, &payload, payload.len()).await.unwrap();
        payloads.push(payload);
    }
    wait_for_version(&site, &url, 2).await;

    // Version 2 is stored before the driver opens round 2: read every figure from one scrape
    // taken once round 2 is open.
    let after = scrape_when(metrics, |t| {
        sample(t, "fedinspect_current_round") == 2.0
            && sample(t, "fedinspect_current_round_state{state=\"collecting\"}") == 1.0
    })
    .await;
    let received: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    assert_eq!(
        sample(&after, "fedinspect_updates_total{result=\"accepted\"}"),
        2.0
    );
    assert_eq!(
        sample(
            &after,
            "fedinspect_updates_refused_total{reason=\"stale_base\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "fedinspect_update_bytes_received_total"),
        received as f64,
        "a refused header brings no payload bytes"
    );
    assert_eq!(
        sample(&after, "fedinspect_model_bytes_sent_total"),
        downloaded as f64
    );
    assert_eq!(
        sample(&after, "fedinspect_rounds_total{event=\"published\"}"),
        1.0
    );
    assert_eq!(sample(&after, "fedinspect_aggregations_total"), 1.0);
    assert!(sample(&after, "fedinspect_aggregation_seconds_total") > 0.0);
    assert_eq!(sample(&after, "fedinspect_model_version_latest"), 2.0);
    assert_eq!(
        sample(&after, "fedinspect_current_round"),
        2.0,
        "round 2 opened"
    );
    assert_eq!(
        sample(
            &after,
            "fedinspect_current_round_state{state=\"collecting\"}"
        ),
        1.0
    );

    // `rounds` carries each round's traffic.
    let rounds = admin(&site, &url, AdminCommand::Rounds { limit: 10 })
        .await
        .unwrap();
    let r1 = rounds
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["round"] == 1)
        .unwrap();
    assert_eq!(r1["bytes_received"], received);
    assert_eq!(r1["bytes_sent"], downloaded);

    // An unknown round is NOT_FOUND.
    let admin_files = site.pki.admin_files();
    let ch = channel(
        &url,
        &admin_files.ca_cert,
        &admin_files.cert,
        &admin_files.key,
    )
    .await
    .unwrap();
    let err = AdminClient::new(ch)
        .get_round(pb::GetRoundRequest { round: 99 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(err.message().contains("round 99 does not exist"), "{err}");

    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_lists_refusals_revocations_promotions_and_rollbacks() {
    let site = Site::new(2);
    let config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let pki = site.pki.root().to_path_buf();

    // A round gives version 2.
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    let task = plant.next_train().await;
    let payload = encode(&synthetic_delta(1, 0.01), Codec::F32);
    // A refusal: a payload that does not match its announced SHA-256.
    let mut bad = header(&task, &payload, pb::Codec::F32, 40, 9);
    bad.payload_sha256 = vec![0; 32];
    plant
        .upload(bad, &payload, payload.len())
        .await
        .unwrap_err();
    let h = header(&task, &payload, pb::Codec::F32, 40, 1);
    plant.upload(h, &payload, payload.len()).await.unwrap();
    wait_for_version(&site, &url, 2).await;
    let mut other = Plant::connect(&site, &url, "plant-2").await;
    other.register(10).await.unwrap();

    for args in [
        // Version 1 is promoted from the start.
        &["promote", "2", "--force"][..],
        &["rollback"],
        &["revoke", "plant-2", "--reason", "decommissioned"],
    ] {
        let o = cli(&url, &pki, args).await;
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }

    let o = cli(&url, &pki, &["audit"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let all: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let kinds: Vec<&str> = all.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["revocation", "rollback", "promotion", "refusal"],
        "newest first: {all:#?}"
    );
    assert_eq!(all[0]["plant_id"], "plant-2");
    assert_eq!(all[0]["actor"], "admin:admin");
    assert!(all[1]["detail"]
        .as_str()
        .unwrap()
        .contains("rolled back to 1"));
    assert_eq!(all[3]["action"], "upload_update");
    assert_eq!(all[3]["plant_id"], "plant-1");
    assert!(
        all[3]["detail"].as_str().unwrap().contains("SHA-256"),
        "{}",
        all[3]
    );

    // Filters: by kind, by plant, and a limit.
    let o = cli(&url, &pki, &["audit", "--kind", "promotion"]).await;
    let promotions: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(promotions.len(), 1);
    assert!(promotions[0]["detail"]
        .as_str()
        .unwrap()
        .contains("version 2 promoted"));
    let o = cli(&url, &pki, &["audit", "--plant", "plant-1"]).await;
    let about: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(about.len(), 1);
    assert_eq!(about[0]["kind"], "refusal");
    let o = cli(&url, &pki, &["audit", "--limit", "2"]).await;
    let two: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(two.len(), 2);
    let o = cli(&url, &pki, &["audit", "--kind", "nonsense"]).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("'nonsense' is not an audit kind"),
        "{}",
        stderr(&o)
    );

    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_data_dir_and_names_a_corrupted_blob() {
    let site = Site::new(1);
    let config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let pki = site.pki.root().to_path_buf();

    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    let task = plant.next_train().await;
    let payload = encode(&synthetic_delta(1, 0.01), Codec::F32);
    let h = header(&task, &payload, pb::Codec::F32, 40, 1);
    plant.upload(h, &payload, payload.len()).await.unwrap();
    wait_for_version(&site, &url, 2).await;

    let o = cli(&url, &pki, &["check"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["models_checked"], 2);
    assert_eq!(report["updates_checked"], 1);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0, "{report}");

    // Flip one byte of the update blob and one of model version 2's blob.
    let hub = running.hub();
    let update = hub.store.updates_of_round(1).unwrap().remove(0);
    let model = hub.store.model(2).unwrap().unwrap();
    let update_path = hub.blobs.path_of(&update.delta_sha256);
    let model_path = hub.blobs.path_of(&model.blob_sha256);
    for path in [&update_path, &model_path] {
        let mut bytes = std::fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(path, bytes).unwrap();
    }

    let o = cli(&url, &pki, &["check"]).await;
    assert!(!o.status.success(), "check must fail on a corrupted blob");
    assert!(stderr(&o).contains("2 problem(s)"), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with("model version 2")
            && problems[0].contains(&model.blob_sha256.to_hex()),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with("update ") && problems[1].contains(&update.delta_sha256.to_hex()),
        "{problems:#?}"
    );

    running.stop(Duration::from_secs(10)).await.unwrap();
}
