//! End to end, as deployed: `coordinator serve` and three `client run` processes (the
//! binaries of this build) over mutual TLS on 127.0.0.1, two rounds of real (tiny) training
//! with q8 deltas. plant-3 reaches the coordinator through a relay that cuts its round-1
//! upload in the middle; the test then kills plant-3 with SIGKILL, checks that the coordinator
//! no longer receives the cut upload (its durable prefix moves to `blobs/partial`, nothing of
//! it is recorded), and starts plant-3 again on the same state folder: it sends its pending
//! update again under the same update id (resumed from the coordinator's durable bytes, or
//! from byte 0) and round 1 completes with all three plants, each counted once. Afterwards every published version is recomputed independently from the
//! stored deltas and sample counts (canonical FedAvg), with lineage and signatures checked.

mod support;

use std::path::Path;
use std::time::Duration;

use fedinspect_client::agent::state::StateDir;
use fedinspect_common::delta::{self, Codec};
use fedinspect_common::ModelState;
use fedinspect_simulations::federation::Federation;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::site::Site;
use support::relay::Relay;

const WAIT: Duration = Duration::from_secs(90);

#[test]
fn a_plant_killed_mid_upload_resends_under_the_same_id_and_every_version_is_the_fedavg() {
    let bins = support::binaries();
    let dir = tempfile::tempdir().unwrap();
    let data = support::write_tiny_data(&dir.path().join("data"), 6);
    let codec = Codec::q8();
    let site = Site::create(support::tiny_site(&dir.path().join("run"), &data, 2, codec)).unwrap();

    // plant-3 talks to the coordinator through the relay, which cuts its first upload after
    // half of the payload.
    let payload = payload_bytes(&site.initial_model(), codec);
    let pending = site.plant_state("plant-3").join("pending/update.json");
    let relay = Relay::start(site.listen, payload / 2, move || pending.exists());
    site.write_plant_config("plant-3", &relay.address())
        .unwrap();

    let mut fed = Federation::start(site.clone(), bins, Interrupt::none()).unwrap();
    // Once plants 1 and 2 delivered, an upload in progress at the coordinator is plant-3's.
    fed.wait_for("the cut of plant-3's upload", WAIT, |f| {
        let delivered = f.status()?.current_round == 1 && f.round(1)?.updates.len() == 2;
        Ok((relay.has_cut() && delivered).then_some(()))
    })
    .unwrap();
    let incoming = site.coordinator_data().join("blobs/incoming");
    fed.wait_for("the coordinator to receive plant-3's upload", WAIT, |_| {
        Ok(partial_uploads(&incoming).then_some(()))
    })
    .unwrap();
    let cut = StateDir::open(&site.plant_state("plant-3"))
        .unwrap()
        .pending()
        .expect("plant-3 saved its update before sending it");
    assert_eq!(cut.header.round, 1);
    assert!(relay.forwarded_of_upload() < cut.header.payload_bytes);

    let status = fed.kill_plant("plant-3").unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    fed.wait_for(
        "the coordinator to stop receiving the cut upload",
        WAIT,
        |_| Ok((!partial_uploads(&incoming)).then_some(())),
    )
    .unwrap();
    let round1 = fed.round(1).unwrap();
    assert_eq!(round1.round.state, "collecting", "waits for its 3 plants");
    assert!(
        round1.updates.iter().all(|u| u.plant_id != "plant-3"),
        "nothing of the cut upload was recorded: {:?}",
        round1.updates
    );

    // plant-3 comes back on the same state folder and delivers the same update.
    fed.start_plant("plant-3").unwrap();
    let round1 = fed
        .wait_for_round(1, WAIT, &mut |_| {})
        .expect("round 1 completes");
    assert_eq!(round1.round.state, "published");
    assert_eq!(round1.round.participants, 3);
    let resent = round1
        .updates
        .iter()
        .find(|u| u.plant_id == "plant-3")
        .expect("plant-3's update is in round 1");
    assert_eq!(resent.update_id, hex::encode(cut.header.update_id));
    assert_eq!(resent.payload_bytes, cut.header.payload_bytes);
    // Traffic as the coordinator counted it: each accepted payload once, and version 1 once
    // per plant (plant-3 kept it in its model cache across the kill).
    let accepted: u64 = round1.updates.iter().map(|u| u.payload_bytes).sum();
    assert_eq!(round1.bytes_received, accepted);
    assert_eq!(round1.bytes_sent, 3 * round1.base_size_bytes);
    let round2 = fed.wait_for_round(2, WAIT, &mut |_| {}).unwrap();
    assert_eq!(round2.round.state, "published");
    assert_eq!(round2.round.participants, 3);

    for version in 1..=3 {
        let out = site.models().join(format!("v{version:04}.safetensors"));
        let exported = fed.export_model(version, &out).unwrap();
        assert_eq!(exported.bytes, std::fs::metadata(&out).unwrap().len());
    }
    for (name, status) in fed.stop(Duration::from_secs(20)) {
        assert!(status.success(), "{name} did not stop cleanly: {status}");
    }
    drop(fed);

    let updates = support::check_published_versions(site.root(), 2);
    for (round, updates) in &updates {
        let plants: Vec<&str> = updates.iter().map(|u| u.plant_id.as_str()).collect();
        assert_eq!(plants, ["plant-1", "plant-2", "plant-3"], "round {round}");
    }
    assert_eq!(updates[&1][2].update_id.0, cut.header.update_id);
    for id in site.plant_ids() {
        let log = std::fs::read_to_string(site.logs().join(format!("{id}.log"))).unwrap();
        assert!(log.contains("update delivered"), "{id}'s log:\n{log}");
    }
}

/// Bytes of a delta of the model in `initial` encoded with `codec`.
fn payload_bytes(initial: &Path, codec: Codec) -> u64 {
    let (model, _) = ModelState::load_safetensors(initial).unwrap();
    let mut payload = Vec::new();
    delta::encode(&model.zeros_like(), codec, &mut payload).unwrap();
    assert!(
        payload.len() > 32 * 1024,
        "a payload of {} bytes is too small to cut in the middle reliably",
        payload.len()
    );
    payload.len() as u64
}

/// Whether the coordinator is receiving an upload (a `.part` file in `blobs/incoming`; a cut
/// upload's durable prefix waits in `blobs/partial` instead).
fn partial_uploads(incoming: &Path) -> bool {
    std::fs::read_dir(incoming)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "part"))
        })
        .unwrap_or(false)
}
