//! What a plant sends in a round is its encoded delta plus a small constant (docs/security.md):
//! a real agent trains one round against a real coordinator over mutual TLS, through a TCP
//! relay on 127.0.0.1 that counts every byte the plant sends (TLS records, HTTP/2 frames and
//! all). The count must cover the accepted payload and exceed it by no more than
//! [`ALLOWANCE`]: registration, task and download requests, the update header and framing
//! (about 3 KiB when this was written). The plant's eight tiny 64x64 boards alone are larger
//! than the allowance, so not even they could be sent unnoticed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fedinspect_client::agent::Agent;
use fedinspect_coordinator::config::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

mod federation_site;

use federation_site::{policy, Site, WAIT};

/// Bytes a plant may send beyond its encoded delta in one round.
const ALLOWANCE: u64 = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plant_sends_its_encoded_delta_plus_a_small_constant() {
    let site = Site::new(1);
    let running = site.start(policy(1, 120, 1), Limits::default()).await;
    let upstream = running.local_addr();
    let sent = Arc::new(AtomicU64::new(0));
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let counter = Arc::clone(&sent);
    let relay_task = tokio::spawn(async move {
        loop {
            let (plant, _) = relay.accept().await.unwrap();
            let coordinator = TcpStream::connect(upstream).await.unwrap();
            tokio::spawn(forward(plant, coordinator, Arc::clone(&counter)));
        }
    });

    let config = site.plant(1, &format!("https://127.0.0.1:{}", relay_addr.port()), "");
    let images: u64 = std::fs::read_dir(site.dir.path().join("plant-1/PCBData/group00001/00001"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let agent = Agent::build(config).unwrap();
    let (stop, stopped) = watch::channel(false);
    let agent = tokio::spawn(agent.run(stopped));
    let hub = running.hub().clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.store.model(2).unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "round 1 not published within {WAIT:?}"
        );
        assert!(!agent.is_finished(), "the agent stopped before the round");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops when asked")
        .unwrap()
        .expect("the agent ends cleanly");
    relay_task.abort();

    let updates = hub.store.updates_of_round(1).unwrap();
    assert_eq!(updates.len(), 1, "one accepted update");
    let payload = updates[0].payload_bytes;
    let sent = sent.load(Ordering::SeqCst);
    println!(
        "plant sent {sent} bytes for a {payload}-byte encoded delta ({} bytes more); its \
         images: {images} bytes",
        sent - payload.min(sent)
    );
    assert!(
        images > ALLOWANCE,
        "the fixture's images ({images} bytes) must not fit in the allowance"
    );
    assert!(
        sent >= payload,
        "the relay saw the whole upload: {sent} < {payload}"
    );
    assert!(
        sent <= payload + ALLOWANCE,
        "the plant sent {sent} bytes, more than its {payload}-byte delta plus {ALLOWANCE}"
    );
    running
        .stop(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}

/// Copies both ways until either side closes, counting the bytes from `plant`.
async fn forward(mut plant: TcpStream, mut coordinator: TcpStream, sent: Arc<AtomicU64>) {
    let (mut plant_rx, mut plant_tx) = plant.split();
    let (mut coord_rx, mut coord_tx) = coordinator.split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match plant_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sent.fetch_add(n as u64, Ordering::SeqCst);
                    if coord_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = coord_tx.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut coord_rx, &mut plant_tx).await;
        let _ = plant_tx.shutdown().await;
    };
    tokio::join!(up, down);
}
