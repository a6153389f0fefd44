//! Resumable uploads over mutual TLS on 127.0.0.1 with real sled and blob folders: a stream
//! dropped half-way and one ended early each leave their received prefix durable; UploadStatus
//! reports it to the plant that sent it (0 to another plant); a resume at the wrong offset or
//! with a changed header is refused with a message naming what to send; a resume from the
//! durable offset completes, is counted once (a repeat answers "duplicate") and the published
//! model is the canonical FedAvg. Then the coordinator process is SIGKILLed holding a durable
//! prefix (with unsynced bytes after it): restarted, it keeps exactly the checkpointed prefix,
//! and the resume completes into the canonical FedAvg.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::PROTOCOL_VERSION;
use support::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const CODEC: Codec = Codec::Q8 { block: 64 };
/// Small chunks, so that a payload of about a kilobyte arrives in many pieces.
const CHUNK: usize = 64;

fn payload(seed: u64) -> Vec<u8> {
    encode(&synthetic_delta(seed, 0.02), CODEC)
}

/// The header then payload[from..to] in `CHUNK`-byte chunks (absolute offsets).
fn parts(
    header: pb::UpdateHeader,
    payload: &[u8],
    from: usize,
    to: usize,
) -> Vec<pb::UploadUpdateRequest> {
    let mut out = vec![pb::UploadUpdateRequest {
        part: Some(pb::upload_update_request::Part::Header(header)),
    }];
    let mut at = from;
    while at < to {
        let end = (at + CHUNK).min(to);
        out.push(pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
                offset: at as u64,
                data: payload[at..end].to_vec(),
                total_bytes: payload.len() as u64,
                sha256: Vec::new(),
            })),
        });
        at = end;
    }
    out
}

/// Sends `header` (with `resume_offset = from`) and payload[from..to]; the stream then ends.
async fn send(
    p: &mut Plant,
    mut header: pb::UpdateHeader,
    payload: &[u8],
    from: usize,
    to: usize,
) -> Result<pb::UploadUpdateResponse, tonic::Status> {
    header.resume_offset = from as u64;
    p.client
        .upload_update(tokio_stream::iter(parts(header, payload, from, to)))
        .await
        .map(|r| r.into_inner())
}

async fn status(p: &mut Plant, id: u8) -> pb::UploadStatusResponse {
    p.client
        .upload_status(pb::UploadStatusRequest {
            protocol_version: PROTOCOL_VERSION,
            update_id: vec![id; 16],
        })
        .await
        .unwrap()
        .into_inner()
}

/// Polls UploadStatus until it reports `durable` bytes (the prefix is kept on a blocking
/// thread after the stream ends, so it lands a moment later).
async fn wait_for_durable(p: &mut Plant, id: u8, durable: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status(p, id).await;
        if s.durable_bytes == durable && !s.accepted {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "UploadStatus never said {durable} durable bytes: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Files in `dir` with extension `ext` and their sizes.
fn files(dir: &Path, ext: &str) -> Vec<(PathBuf, u64)> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| {
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect()
}

/// Streams the header and payload[..to], waits until the coordinator wrote those bytes to its
/// file in flight, then drops the stream (the request is cancelled, as when a plant dies).
async fn drop_mid_stream(
    p: &mut Plant,
    header: pb::UpdateHeader,
    payload: &[u8],
    to: usize,
    incoming: &Path,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let mut client = p.client.clone();
    let upload = tokio::spawn(async move { client.upload_update(ReceiverStream::new(rx)).await });
    for part in parts(header, payload, 0, to) {
        tx.send(part).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !files(incoming, "part")
        .iter()
        .any(|(_, len)| *len == to as u64)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator never wrote {to} bytes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    upload.abort();
    assert!(upload.await.unwrap_err().is_cancelled());
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_uploads_resume_from_their_durable_prefix_and_count_once() {
    let site = Site::new(2);
    let config = site.config("data", policy(2, 2, 60, CODEC), Limits::default());
    let running = start(&config).await;
    let u = url(&running);
    let blobs = config.data_dir.join("blobs");
    let (mut p1, mut p2) = (
        Plant::connect(&site, &u, "plant-1").await,
        Plant::connect(&site, &u, "plant-2").await,
    );
    p1.join(70).await;
    p2.join(20).await;
    let task = p1.next_train().await;
    p2.next_train().await;
    let (b1, b2) = (payload(1), payload(2));
    let (h1, h2) = (
        header(&task, &b1, pb::Codec::Q8, 70, 1),
        header(&task, &b2, pb::Codec::Q8, 20, 2),
    );
    let (half, third) = (b1.len() / 2, b2.len() / 3);

    // plant-1's stream is dropped after half of its payload reached the coordinator.
    drop_mid_stream(&mut p1, h1.clone(), &b1, half, &blobs.join("incoming")).await;
    wait_for_durable(&mut p1, 1, half as u64).await;
    assert_eq!(
        files(&blobs.join("incoming"), "part"),
        [],
        "nothing left in flight"
    );
    assert_eq!(files(&blobs.join("partial"), "part")[0].1, half as u64);
    // Another plant asking about plant-1's update id learns nothing.
    let other = status(&mut p2, 1).await;
    assert_eq!((other.durable_bytes, other.accepted), (0, false));

    // plant-2's stream ends after a third: refused as cut off, the third is kept.
    let cut = send(&mut p2, h2.clone(), &b2, 0, third).await.unwrap_err();
    assert_eq!(cut.code(), Code::DataLoss, "{cut:?}");
    wait_for_durable(&mut p2, 2, third as u64).await;

    // A resume at another offset than the durable one, or with another header, is refused
    // and names what to do; the held prefix survives both.
    let wrong = send(&mut p1, h1.clone(), &b1, half - CHUNK, b1.len())
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::FailedPrecondition, "{wrong:?}");
    assert!(
        wrong
            .message()
            .contains(&format!("holds {half} durable bytes"))
            && wrong.message().contains(&format!("resume at byte {half}")),
        "{}",
        wrong.message()
    );
    let mut changed = h1.clone();
    changed.num_samples = 71;
    let changed = send(&mut p1, changed, &b1, half, b1.len())
        .await
        .unwrap_err();
    assert_eq!(changed.code(), Code::InvalidArgument, "{changed:?}");
    assert!(
        changed.message().contains("differs in: num_samples"),
        "{}",
        changed.message()
    );
    let past = send(&mut p2, h2.clone(), &b2, third + CHUNK, b2.len())
        .await
        .unwrap_err();
    assert_eq!(past.code(), Code::FailedPrecondition, "{past:?}");
    assert_eq!(status(&mut p1, 1).await.durable_bytes, half as u64);

    // Resumed from the durable offsets: accepted once; a repeat is a duplicate.
    let ack = send(&mut p1, h1.clone(), &b1, half, b1.len())
        .await
        .unwrap();
    assert!(!ack.duplicate);
    assert_eq!(
        ack.delta_sha256,
        sha256(&b1),
        "the whole payload was stored"
    );
    let s = status(&mut p1, 1).await;
    assert_eq!((s.durable_bytes, s.accepted), (b1.len() as u64, true));
    assert!(
        send(&mut p1, h1.clone(), &b1, half, b1.len())
            .await
            .unwrap()
            .duplicate
    );
    assert!(
        send(&mut p1, h1.clone(), &b1, 0, b1.len())
            .await
            .unwrap()
            .duplicate
    );
    let ack = send(&mut p2, h2.clone(), &b2, third, b2.len())
        .await
        .unwrap();
    assert!(!ack.duplicate);

    wait_for_version(&site, &u, 2).await;
    let (model, _) = ModelState::from_safetensors_bytes(&p1.download(2).await).unwrap();
    let expected = expected_fedavg(
        &base_model(),
        &[("plant-1", 70, &b1, CODEC), ("plant-2", 20, &b2, CODEC)],
    );
    assert_eq!(model, expected, "bit for bit the canonical FedAvg");
    assert_contributions(&site, &u, 2).await;
    assert_eq!(
        files(&blobs.join("partial"), "part"),
        [],
        "no partial outlives its round"
    );
    assert_eq!(files(&blobs.join("partial"), "json"), []);
    running.stop(WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_prefix_survives_sigkill_and_the_resume_completes() {
    let site = Site::new(2);
    let mut config = site.config("data", policy(2, 2, 60, CODEC), Limits::default());
    config.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let blobs = config.data_dir.join("blobs");
    let (b1, b2) = (payload(3), payload(4));
    let half = b1.len() / 2;

    let first = Process::start(&site, &config).await;
    let mut p1 = Plant::connect(&site, &first.url, "plant-1").await;
    let mut p2 = Plant::connect(&site, &first.url, "plant-2").await;
    p1.join(70).await;
    p2.join(20).await;
    let task = p1.next_train().await;
    let h1 = header(&task, &b1, pb::Codec::Q8, 70, 1);
    send(&mut p1, h1.clone(), &b1, 0, half).await.unwrap_err();
    wait_for_durable(&mut p1, 1, half as u64).await;
    first.kill();
    drop((p1, p2));

    // As if bytes had been written after the last fsync, plus a stray file in flight. The
    // mark that UploadStatus reads is written before the broken stream's file moves from
    // `incoming/` to `partial/`, so the kill can land on either side of that move (on a
    // loaded machine it does): start-up recovery must handle both.
    let held: Vec<_> = files(&blobs.join("partial"), "part")
        .into_iter()
        .chain(files(&blobs.join("incoming"), "part"))
        .collect();
    assert_eq!(
        held.len(),
        1,
        "one file of the upload, held or in flight: {held:?}"
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&held[0].0)
        .unwrap();
    std::io::Write::write_all(&mut f, b"not checkpointed").unwrap();
    drop(f);
    std::fs::write(blobs.join("incoming/stray.part"), b"x").unwrap();

    let second = Process::start(&site, &config).await;
    assert_eq!(files(&blobs.join("incoming"), "part"), []);
    assert_eq!(
        files(&blobs.join("partial"), "part")[0].1,
        half as u64,
        "cut to the checkpoint"
    );
    let mut p1 = Plant::connect(&site, &second.url, "plant-1").await;
    let mut p2 = Plant::connect(&site, &second.url, "plant-2").await;
    p1.join(70).await;
    p2.join(20).await;
    let task = p2.next_train().await;
    assert_eq!(task.round, 1, "the round resumed");
    wait_for_durable(&mut p1, 1, half as u64).await;
    let ack = send(&mut p1, h1.clone(), &b1, half, b1.len())
        .await
        .unwrap();
    assert!(!ack.duplicate);
    send(
        &mut p2,
        header(&task, &b2, pb::Codec::Q8, 20, 2),
        &b2,
        0,
        b2.len(),
    )
    .await
    .unwrap();
    wait_for_version(&site, &second.url, 2).await;
    let (model, _) = ModelState::from_safetensors_bytes(&p1.download(2).await).unwrap();
    let expected = expected_fedavg(
        &base_model(),
        &[("plant-1", 70, &b1, CODEC), ("plant-2", 20, &b2, CODEC)],
    );
    assert_eq!(model, expected);
    assert_contributions(&site, &second.url, 2).await;
    drop((p1, p2));
    second.kill();
}

/// Version 2 lists exactly `n` contributions.
async fn assert_contributions(site: &Site, url: &str, n: usize) {
    let models = admin(site, url, AdminCommand::Models { limit: 10 })
        .await
        .unwrap();
    let v2 = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == 2)
        .unwrap();
    assert_eq!(v2["contributions"].as_array().unwrap().len(), n, "{v2}");
}
