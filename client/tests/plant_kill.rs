//! Issue 8, "Faults": plant processes (`client run`, the binary of this build) SIGKILLed and
//! restarted while a real coordinator (mTLS on 127.0.0.1, sled on disk) waits for their
//! updates. plant-1 is killed mid-training (its base downloaded, nothing saved to send yet);
//! plant-2 is killed mid-upload (a relay stops forwarding its upload half-way, so the
//! coordinator holds a partial upload). Both start again on their state folders: plant-1
//! trains again and sends one update; plant-2 sends its pending update under the update id it
//! saved before its first byte left (resumed or sent whole, whichever the coordinator offers).
//! The round then publishes with each plant counted exactly once.

mod federation_site;
#[path = "../../coordinator/tests/support/relay.rs"]
mod relay;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use federation_site::{policy, Site, WAIT};
use fedinspect_client::agent::state::StateDir;
use fedinspect_common::delta::{self, Codec};
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::records::RoundState;
use relay::Relay;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plants_killed_mid_training_and_mid_upload_are_counted_once() {
    let site = Site::new(2);
    let running = site.start(policy(2, 300, 1), Limits::default()).await;
    let hub = running.hub().clone();
    let address = site.address(&running);
    let state = |i: usize| site.dir.path().join(format!("plant-{i}/state"));

    // plant-2 reaches the coordinator through a relay that cuts its first upload half-way.
    let mut payload = Vec::new();
    delta::encode(&site.initial.zeros_like(), Codec::q8(), &mut payload).unwrap();
    let pending_json = state(2).join("pending/update.json");
    let relay = Relay::start(running.local_addr(), payload.len() as u64 / 2, move || {
        pending_json.exists()
    });
    site.plant(1, &address, "");
    site.plant(2, &relay.address(), "");
    let mut p1 = PlantProcess::start(&site, 1);
    let mut p2 = PlantProcess::start(&site, 2);

    // plant-1: killed once its base is cached and before it saved an update: mid-training.
    wait_until("plant-1 to download its base", || {
        has_file(&state(1).join("models"))
    })
    .await;
    p1.kill();
    assert!(
        StateDir::open(&state(1)).unwrap().pending().is_none(),
        "plant-1 was killed after training, not during it; see {}",
        p1.log.display()
    );

    // plant-2: killed while the coordinator holds half of its upload.
    wait_until("the relay to cut plant-2's upload", || relay.has_cut()).await;
    let incoming = site.dir.path().join("coordinator/blobs/incoming");
    wait_until("the coordinator to hold the partial upload", || {
        has_file(&incoming)
    })
    .await;
    p2.kill();
    let cut = StateDir::open(&state(2))
        .unwrap()
        .pending()
        .expect("plant-2 saved its update before sending it");
    assert_eq!(cut.header.round, 1);
    let round = hub.store.round(1).unwrap().unwrap();
    assert_eq!(round.state, RoundState::Collecting, "waits for both plants");
    assert!(
        hub.store.updates_of_round(1).unwrap().is_empty(),
        "nothing was recorded before the restarts"
    );

    // Both come back on their state folders.
    let p1 = PlantProcess::start(&site, 1);
    let p2 = PlantProcess::start(&site, 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.store.round(1).unwrap().unwrap().state != RoundState::Published {
        assert!(
            tokio::time::Instant::now() < deadline,
            "round 1 not published; see {} and {}",
            p1.log.display(),
            p2.log.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let round = hub.store.round(1).unwrap().unwrap();
    assert_eq!(round.participants, 2);
    let updates = hub.store.updates_of_round(1).unwrap();
    let plants: Vec<&str> = updates.iter().map(|u| u.plant_id.as_str()).collect();
    assert_eq!(plants, ["plant-1", "plant-2"], "each plant counted once");
    let resent = &updates[1];
    assert_eq!(
        resent.update_id.0, cut.header.update_id,
        "plant-2 sent its pending update again under the same id"
    );
    assert_eq!(resent.delta_sha256.0, cut.header.payload_sha256);
    let model = hub.store.model(2).unwrap().expect("version 2");
    let mut contributors: Vec<&str> = model
        .contributors
        .iter()
        .map(|c| c.plant_id.as_str())
        .collect();
    contributors.sort_unstable();
    assert_eq!(contributors, ["plant-1", "plant-2"]);
    let log = std::fs::read_to_string(&p2.log).unwrap();
    assert!(
        log.contains("sending the pending update again"),
        "plant-2's log:\n{log}"
    );
    // Resumed from the coordinator's durable offset, or sent whole: either is once.
    let how = log
        .lines()
        .find(|l| l.contains("resuming the upload"))
        .unwrap_or("sent from byte 0 (no resume logged)");
    println!(
        "plant-2 resent update {} ({} bytes, {} forwarded before the cut): {how}; round 1 \
         published with {} updates",
        hex::encode(cut.header.update_id),
        cut.header.payload_bytes,
        relay.forwarded_of_upload(),
        updates.len()
    );
    drop((p1, p2));
    running.stop(Duration::from_secs(10)).await.unwrap();
}

/// A `client run` process with its output in `plant-<i>.log` (appended across starts);
/// SIGKILLed when dropped.
struct PlantProcess {
    child: Child,
    log: PathBuf,
}

impl PlantProcess {
    fn start(site: &Site, i: usize) -> Self {
        let dir = site.dir.path().join(format!("plant-{i}"));
        let log = site.dir.path().join(format!("plant-{i}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_client"))
            .args(["run", "--config", "plant.toml"])
            .current_dir(&dir)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// SIGKILL: nothing is flushed or finished.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the plant ended before the kill: {status}; see {}",
            self.log.display()
        );
    }
}

impl Drop for PlantProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn has_file(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}
