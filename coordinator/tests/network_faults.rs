//! Network faults between plants and a real coordinator over mutual TLS (issue 8), injected by
//! `support::fault_proxy`: with latency a round completes with the canonical FedAvg; an
//! upload reset or truncated mid-stream is retried with the same update id and counted once;
//! an upload stalled past the round deadline does not hold the coordinator: the connection is
//! closed by the HTTP/2 keepalive (`round.stream_idle_timeout`), the round fails at its
//! deadline and the next one opens. Every await here has a time limit.

mod support;

use std::future::Future;
use std::time::Duration;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::records::RoundState;
use fedinspect_coordinator::Running;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::federation_client::FederationClient;
use support::fault_proxy::FaultProxy;
use support::*;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Status;

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// Polls `cond` every 20 ms until it holds, failing the test after [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upload whose parts the test sends one at a time, the call running on its own task.
struct Streamed {
    tx: mpsc::Sender<pb::UploadUpdateRequest>,
    call: JoinHandle<Result<pb::UploadUpdateResponse, Status>>,
    payload: Vec<u8>,
    sent: usize,
}

impl Streamed {
    async fn start(
        mut client: FederationClient<Channel>,
        header: pb::UpdateHeader,
        payload: &[u8],
    ) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let call = tokio::spawn(async move {
            client
                .upload_update(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        within(
            "queueing the header",
            tx.send(pb::UploadUpdateRequest {
                part: Some(pb::upload_update_request::Part::Header(header)),
            }),
        )
        .await
        .unwrap();
        Self {
            tx,
            call,
            payload: payload.to_vec(),
            sent: 0,
        }
    }

    /// Sends the payload up to byte `to` in chunks of 1000 bytes.
    async fn send_to(&mut self, to: usize) {
        while self.sent < to {
            let end = (self.sent + 1000).min(to);
            let part = pb::upload_update_request::Part::Chunk(pb::Chunk {
                offset: self.sent as u64,
                data: self.payload[self.sent..end].to_vec(),
                total_bytes: self.payload.len() as u64,
                sha256: Vec::new(),
            });
            // The call may already have failed (the fault); its result says so.
            if self
                .tx
                .send(pb::UploadUpdateRequest { part: Some(part) })
                .await
                .is_err()
            {
                return;
            }
            self.sent = end;
        }
    }

    /// Sends the rest, ends the stream and waits for the coordinator's answer.
    async fn finish(mut self) -> Result<pb::UploadUpdateResponse, Status> {
        self.send_to(self.payload.len()).await;
        drop(self.tx);
        within("the upload's answer", self.call).await.unwrap()
    }
}

fn bytes_received(running: &Running) -> u64 {
    running.hub().metrics.counters().update_bytes_received
}

/// Retries an upload until the coordinator answers it otherwise than ABORTED (the broken
/// stream's claim on the update not yet released), waiting 50 ms between attempts. With
/// `resume`, each attempt starts at the durable prefix `UploadStatus` reports; else at byte 0.
/// Returns the answer, the attempts made and the byte the last attempt started from.
async fn retry_upload(
    client: &mut FederationClient<Channel>,
    header: &pb::UpdateHeader,
    payload: &[u8],
    resume: bool,
) -> (Result<pb::UploadUpdateResponse, Status>, u32, u64) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let from = if resume {
            client
                .upload_status(pb::UploadStatusRequest {
                    protocol_version: header.protocol_version,
                    update_id: header.update_id.clone(),
                })
                .await
                .expect("UploadStatus answers")
                .into_inner()
                .durable_bytes
        } else {
            0
        };
        let mut h = header.clone();
        h.resume_offset = from;
        let start = usize::try_from(from).unwrap();
        let mut parts = vec![pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Header(h)),
        }];
        let mut at = start;
        while at < payload.len() {
            let end = (at + 1000).min(payload.len());
            parts.push(pb::UploadUpdateRequest {
                part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
                    offset: at as u64,
                    data: payload[at..end].to_vec(),
                    total_bytes: payload.len() as u64,
                    sha256: Vec::new(),
                })),
            });
            at = end;
        }
        let r = client
            .upload_update(tokio_stream::iter(parts))
            .await
            .map(|r| r.into_inner());
        match r {
            Err(s) if s.code() == tonic::Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return (other, attempts, from),
        }
    }
}

fn open_connections(running: &Running) -> u64 {
    running.hub().metrics.handshakes.counters().open
}

fn refused_total(running: &Running) -> u64 {
    running
        .hub()
        .metrics
        .counters()
        .updates_refused
        .values()
        .sum()
}

async fn published(plant: &mut Plant, version: u64) -> ModelState {
    let bytes = within("downloading the published model", plant.download(version)).await;
    ModelState::from_safetensors_bytes(&bytes).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_latency_the_round_completes_with_the_canonical_model() {
    let site = Site::new(2);
    let running =
        start(&site.config("data", policy(2, 2, 30, Codec::F32), Default::default())).await;
    let proxy = FaultProxy::start(running.local_addr()).await;
    proxy.set_latency(Duration::from_millis(25));
    let began = Instant::now();
    let mut plants = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = within(
            "connecting through the proxy",
            Plant::connect(&site, &proxy.url(), id),
        )
        .await;
        within("joining", p.join(100)).await;
        plants.push(p);
    }
    let samples = [120u64, 300];
    let mut payloads = Vec::new();
    for (i, p) in plants.iter_mut().enumerate() {
        let task = p.next_train().await;
        let payload = encode(&synthetic_delta(i as u64 + 1, 0.01), Codec::F32);
        let h = header(&task, &payload, pb::Codec::F32, samples[i], i as u8 + 1);
        within("uploading", p.upload(h, &payload, payload.len()))
            .await
            .unwrap();
        payloads.push(payload);
    }
    within(
        "publishing version 2",
        wait_for_version(&site, &url(&running), 2),
    )
    .await;
    let model = published(&mut plants[0], 2).await;
    let expected = expected_fedavg(
        &base_model(),
        &[
            ("plant-1", samples[0], &payloads[0], Codec::F32),
            ("plant-2", samples[1], &payloads[1], Codec::F32),
        ],
    );
    assert_eq!(model, expected, "bit for bit the canonical FedAvg");
    let c = proxy.counts();
    println!(
        "latency 25 ms per forwarded read: round and download took {:.2} s; proxy forwarded {} bytes up, {} down over {} connections",
        began.elapsed().as_secs_f64(),
        c.up_bytes,
        c.down_bytes,
        c.accepted
    );
    assert!(
        c.up_bytes > 2 * payloads[0].len() as u64,
        "the uploads went through the proxy"
    );
    within("stopping", running.stop(WAIT)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_reset_or_cut_mid_stream_are_retried_and_counted_once() {
    let site = Site::new(2);
    let running =
        start(&site.config("data", policy(2, 2, 30, Codec::F32), Default::default())).await;
    let direct = url(&running);
    let proxy = FaultProxy::start(running.local_addr()).await;
    // Task streams go direct; uploads through the proxy, on their own connections.
    let mut plants = Vec::new();
    let mut tasks = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = within("connecting", Plant::connect(&site, &direct, id)).await;
        within("joining", p.join(100)).await;
        plants.push(p);
    }
    for p in &mut plants {
        tasks.push(p.next_train().await);
    }
    let payloads: Vec<Vec<u8>> = (1..=2)
        .map(|s| encode(&synthetic_delta(s, 0.01), Codec::F32))
        .collect();
    let headers: Vec<pb::UpdateHeader> = (0..2)
        .map(|i| header(&tasks[i], &payloads[i], pb::Codec::F32, 100, i as u8 + 1))
        .collect();

    // plant-1: the connection is reset after the first 1000 payload bytes arrived.
    let proxy_url = proxy.url();
    let via_proxy = |id: &'static str| Plant::connect(&site, &proxy_url, id);
    let before = bytes_received(&running);
    let mut up = Streamed::start(
        within("connecting", via_proxy("plant-1")).await.client,
        headers[0].clone(),
        &payloads[0],
    )
    .await;
    up.send_to(1000).await;
    wait_until("the first chunk at the coordinator", || {
        bytes_received(&running) >= before + 1000
    })
    .await;
    proxy.reset_all();
    let s = up
        .finish()
        .await
        .expect_err("a reset upload is not acknowledged");
    println!(
        "reset mid-upload: the plant saw {:?}: {}",
        s.code(),
        s.message()
    );

    // plant-2: the stream is cut 500 bytes into its second chunk (a truncated TLS record).
    let before = bytes_received(&running);
    let mut up = Streamed::start(
        within("connecting", via_proxy("plant-2")).await.client,
        headers[1].clone(),
        &payloads[1],
    )
    .await;
    up.send_to(1000).await;
    wait_until("the first chunk at the coordinator", || {
        bytes_received(&running) >= before + 1000
    })
    .await;
    proxy.cut_after(500);
    let s = up
        .finish()
        .await
        .expect_err("a truncated upload is not acknowledged");
    println!(
        "truncated mid-upload: the plant saw {:?}: {}",
        s.code(),
        s.message()
    );

    // The coordinator ended both handlers (refused, nothing stored) before any retry.
    wait_until("both broken uploads refused by the coordinator", || {
        refused_total(&running) >= 2
    })
    .await;
    let refused = running.hub().metrics.counters().updates_refused;
    println!("coordinator refusals after the faults: {refused:?}");
    assert!(
        running.hub().store.updates_of_round(1).unwrap().is_empty(),
        "nothing stored from a broken upload"
    );

    // The retries, same update ids, over fresh connections: plant-1 starts over, plant-2
    // resumes from the durable prefix UploadStatus reports. Accepted once each; a second
    // retry of plant-1 (as if its acknowledgement were lost) is a duplicate.
    for i in 0..2 {
        let mut p = within("reconnecting", via_proxy(["plant-1", "plant-2"][i])).await;
        let (r, attempts, from) = within(
            "retrying",
            retry_upload(&mut p.client, &headers[i], &payloads[i], i == 1),
        )
        .await;
        let r = r.expect("the retry is accepted");
        println!(
            "{}: retry accepted after {attempts} attempt(s), sent from byte {from} of {}",
            p.id,
            payloads[i].len()
        );
        if i == 0 {
            let again = within(
                "retrying again",
                p.upload(headers[0].clone(), &payloads[0], payloads[0].len()),
            )
            .await
            .expect("a retry of an accepted update is acknowledged");
            assert!(again.duplicate && !r.duplicate, "{r:?} then {again:?}");
        }
    }
    within("publishing version 2", wait_for_version(&site, &direct, 2)).await;
    let stored = running.hub().store.updates_of_round(1).unwrap();
    let mut ids: Vec<&str> = stored.iter().map(|u| u.plant_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["plant-1", "plant-2"], "one update per plant");
    let c = running.hub().metrics.counters();
    assert_eq!((c.updates_accepted, c.updates_duplicate), (2, 1), "{c:?}");
    let expected = expected_fedavg(
        &base_model(),
        &[
            ("plant-1", 100, &payloads[0], Codec::F32),
            ("plant-2", 100, &payloads[1], Codec::F32),
        ],
    );
    assert_eq!(published(&mut plants[0], 2).await, expected);
    within("stopping", running.stop(WAIT)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_stalled_past_the_deadline_fails_the_round_cleanly() {
    let site = Site::new(2);
    let mut round = policy(2, 2, 4, Codec::F32);
    round.stream_idle_timeout = Duration::from_secs(2);
    let running = start(&site.config("data", round, Default::default())).await;
    let direct = url(&running);
    let proxy = FaultProxy::start(running.local_addr()).await;
    let mut plants = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = within("connecting", Plant::connect(&site, &direct, id)).await;
        within("joining", p.join(100)).await;
        plants.push(p);
    }
    let t1 = plants[0].next_train().await;
    let t2 = plants[1].next_train().await;
    assert_eq!(t1.round, 1);
    let p1 = encode(&synthetic_delta(1, 0.01), Codec::F32);
    within(
        "plant-1's upload",
        plants[0].upload(header(&t1, &p1, pb::Codec::F32, 100, 1), &p1, p1.len()),
    )
    .await
    .unwrap();

    // plant-2's upload stalls after its first chunk, for twice the round deadline.
    let p2 = encode(&synthetic_delta(2, 0.01), Codec::F32);
    let before = bytes_received(&running);
    let client = within("connecting", Plant::connect(&site, &proxy.url(), "plant-2"))
        .await
        .client;
    let mut up = Streamed::start(client, header(&t2, &p2, pb::Codec::F32, 100, 2), &p2).await;
    up.send_to(1000).await;
    wait_until("the first chunk at the coordinator", || {
        bytes_received(&running) >= before + 1000
    })
    .await;
    let open_before = open_connections(&running);
    let stalled = Instant::now();
    proxy.stall_for(Duration::from_secs(8));
    up.send_to(p2.len()).await;

    // The coordinator closes the stalled connection by itself (its keepalive ping goes
    // unanswered), long before the stall ends; hyper drops the upload's handler with it ...
    wait_until("the coordinator closing the stalled connection", || {
        open_connections(&running) < open_before
    })
    .await;
    let gave_up = stalled.elapsed();
    // ... the round fails at its deadline, and the next one opens for both plants.
    wait_until("round 1 failed", || {
        running
            .hub()
            .store
            .round(1)
            .unwrap()
            .is_some_and(|r| r.state == RoundState::Failed)
    })
    .await;
    let failed = stalled.elapsed();
    let r1 = running.hub().store.round(1).unwrap().unwrap();
    assert_eq!(r1.state, RoundState::Failed);
    let next = [plants[0].next_train().await, plants[1].next_train().await];
    assert!(next.iter().all(|t| t.round == 2), "round 2 tasks: {next:?}");
    let opened = stalled.elapsed();
    assert!(
        gave_up < Duration::from_secs(8),
        "the coordinator waited for the stall to end ({gave_up:?})"
    );
    let answer = up.finish().await;
    let answered = stalled.elapsed();
    let s = answer.expect_err("a stalled upload is not acknowledged");
    println!(
        "stall of 8 s, deadline 4 s, stream_idle_timeout 2 s: coordinator ended the upload after {:.2} s, round 1 failed after {:.2} s, round 2 tasks after {:.2} s, the plant's call returned after {:.2} s ({:?}: {})",
        gave_up.as_secs_f64(),
        failed.as_secs_f64(),
        opened.as_secs_f64(),
        answered.as_secs_f64(),
        s.code(),
        s.message()
    );
    let updates = running.hub().store.updates_of_round(1).unwrap();
    assert!(
        updates.iter().all(|u| u.plant_id == "plant-1"),
        "{updates:?}"
    );
    within("stopping", running.stop(WAIT)).await.unwrap();
}
