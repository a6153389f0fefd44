//! The `coordinator admin` commands central IT uses to take data out of a running coordinator,
//! run as the real binary against a coordinator over mutual TLS: `export-model` writes the
//! very bytes plants download (SHA-256 checked) and refuses unknown versions; `round N` shows
//! a round with its accepted updates and the traffic the coordinator counted; a plant
//! certificate cannot export.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::Limits;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use support::*;

/// Runs `coordinator admin --addr URL --pki PKI --json ARGS` on a blocking thread.
async fn cli(url: &str, pki: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    cmd.args(["admin", "--addr", url, "--pki"])
        .arg(pki)
        .arg("--json")
        .args(args)
        .env("NO_COLOR", "1");
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_export_versions_and_read_rounds_with_the_cli() {
    let site = Site::new(1);
    let config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let pki = site.pki.root().to_path_buf();

    // A round: the plant downloads version 1 and sends one update.
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    let task = plant.next_train().await;
    let downloaded = plant.download(1).await;
    let payload = encode(&synthetic_delta(1, 0.01), Codec::F32);
    let h = header(&task, &payload, pb::Codec::F32, 40, 1);
    plant.upload(h, &payload, payload.len()).await.unwrap();
    wait_for_version(&site, &url, 2).await;

    // export-model: the bytes plants download, written whole.
    let out = site.dir.path().join("exports/v1.safetensors");
    let o = cli(
        &url,
        &pki,
        &[
            "export-model",
            "--version",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["bytes"], downloaded.len() as u64);
    assert_eq!(report["sha256"], hex::encode(sha256(&downloaded)));
    assert_eq!(std::fs::read(&out).unwrap(), downloaded);
    let (model, _) = ModelState::load_safetensors(&out).unwrap();
    assert_eq!(model, base_model());

    // round 1: state, the update as recorded, the traffic counted.
    let o = cli(&url, &pki, &["round", "1"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "published");
    assert_eq!(r["published_version"], 2);
    assert_eq!(r["participants"], 1);
    assert_eq!(r["base_size_bytes"], downloaded.len() as u64);
    assert_eq!(r["bytes_received"], payload.len() as u64);
    assert_eq!(r["bytes_sent"], downloaded.len() as u64);
    assert!(r["closed_unix_ms"].as_i64().unwrap() >= r["opened_unix_ms"].as_i64().unwrap());
    assert!(r["published_unix_ms"].as_i64().unwrap() >= r["closed_unix_ms"].as_i64().unwrap());
    let updates = r["updates"].as_array().unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["plant_id"], "plant-1");
    assert_eq!(updates[0]["num_samples"], 40);
    assert_eq!(updates[0]["codec"], "f32");
    assert_eq!(updates[0]["payload_bytes"], payload.len() as u64);
    assert_eq!(updates[0]["delta_sha256"], hex::encode(sha256(&payload)));

    // Refusals name what is wrong.
    let o = cli(&url, &pki, &["round", "7"]).await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("round 7 does not exist"),
        "{}",
        stderr(&o)
    );
    let missing = site.dir.path().join("exports/v9.safetensors");
    let o = cli(
        &url,
        &pki,
        &[
            "export-model",
            "--version",
            "9",
            "--out",
            missing.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("version 9 does not exist"),
        "{}",
        stderr(&o)
    );
    assert!(!missing.exists(), "nothing is written for a refused export");

    // A plant certificate gets no model out of the admin service.
    let files = files_of(&site, "plant-1");
    let ch = channel(&url, &files.ca_cert, &files.cert, &files.key)
        .await
        .unwrap();
    let err = AdminClient::new(ch)
        .export_model(pb::ExportModelRequest {
            version: 1,
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    running
        .stop(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}
