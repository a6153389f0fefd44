//! Server momentum in real rounds over mutual TLS, with a coordinator restart between them:
//! `[aggregation] server_momentum = 0.5`. Round 1's base is the initial model (no parent), so
//! version 2 is plain FedAvg; round 2 runs on a freshly started coordinator and publishes
//! `v2 + mean2 + 0.5 × (v2 − v1)`, recomputed here from the decoded payloads: the velocity
//! comes from the lineage in sled, not from memory a restart would lose.

mod support;

use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate, ServerStep};
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::{AggregationStrategy, Limits, RoundPolicy};
use fedinspect_proto::v1 as pb;
use support::*;

const PLANTS: [(&str, u64); 2] = [("plant-1", 120), ("plant-2", 40)];
const MOMENTUM: f64 = 0.5;

/// Runs one round on a fresh start of the coordinator in `site`'s data directory and returns
/// the decoded deltas and the version it published.
async fn one_round(site: &Site, round: u64, version: u64) -> (Vec<ModelState>, ModelState, String) {
    let step = ServerStep::new(1.0)
        .unwrap()
        .with_momentum(MOMENTUM)
        .unwrap();
    let policy = RoundPolicy {
        aggregation: AggregationStrategy::ServerStep(step),
        ..policy(2, 2, 30, Codec::F32)
    };
    let config = site.config("data", policy, Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let mut plants = Vec::new();
    for (id, n) in PLANTS {
        let mut p = Plant::connect(site, &url, id).await;
        p.join(n).await;
        plants.push(p);
    }
    let mut deltas = Vec::new();
    for (i, p) in plants.iter_mut().enumerate() {
        let task = p.next_train().await;
        assert_eq!(task.round, round);
        assert_eq!(task.base_version, version - 1);
        let d = synthetic_delta(10 * round + i as u64, 0.01);
        let payload = encode(&d, Codec::F32);
        let id = (10 * round) as u8 + i as u8;
        let h = header(&task, &payload, pb::Codec::F32, PLANTS[i].1, id);
        p.upload(h, &payload, payload.len()).await.unwrap();
        let layout = Layout::of(&base_model());
        deltas.push(delta::decode_to_model(&payload[..], &layout, Some(Codec::F32)).unwrap());
    }
    wait_for_version(site, &url, version).await;
    let bytes = plants[0].download(version).await;
    let (published, _) = ModelState::from_safetensors_bytes(&bytes).unwrap();
    let recorded = running
        .hub()
        .store
        .model(version)
        .unwrap()
        .unwrap()
        .strategy;
    running.stop(WAIT).await.unwrap();
    (deltas, published, recorded)
}

fn fedavg(base: &ModelState, deltas: &[ModelState]) -> ModelState {
    let ups: Vec<_> = PLANTS
        .iter()
        .zip(deltas)
        .map(|((id, n), d)| PlantUpdate::new(*id, *n, d))
        .collect();
    aggregate_canonical(base, &ups).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn momentum_steps_along_the_lineage_across_a_restart() {
    let site = Site::new(PLANTS.len());
    let v1 = base_model();
    let (deltas1, v2, recorded) = one_round(&site, 1, 2).await;
    assert_eq!(recorded, "fedavg(server_lr=1,momentum=0.5)");
    assert_eq!(v2, fedavg(&v1, &deltas1), "round 1 has no previous step");

    // A new coordinator process on the same data directory: nothing but sled and the blobs.
    let (deltas2, v3, _) = one_round(&site, 2, 3).await;
    let mean = fedavg(&v2, &deltas2);
    let mut want = v2.clone();
    for (name, t) in want.iter_mut() {
        let m = mean.get(name).unwrap().data();
        let before = v1.get(name).unwrap().data();
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            let b = f64::from(*v);
            *v = ((b + (f64::from(m[i]) - b)) + MOMENTUM * (b - f64::from(before[i]))) as f32;
        }
    }
    assert_eq!(v3, want, "bit for bit v2 + mean step + 0.5 (v2 - v1)");
    // And it is not plain FedAvg: the previous step moved it.
    assert_ne!(v3, mean);
}
