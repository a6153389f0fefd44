//! Robust aggregation in a real round over mutual TLS: five plants, one of which sends a
//! boosted delta (its honest delta ×100); with `[aggregation] strategy = "median"` (and
//! `"trimmed_mean"`) the published model equals the coordinate-wise median (trimmed mean)
//! recomputed here from the decoded payloads, the boost does not get through while it would
//! have moved FedAvg far, and the version's record names the strategy. The same round with
//! `server_learning_rate = 2` (not a defence: FedAvg with a longer step) publishes
//! `base + 2 × (FedAvg − base)`, rounded once from f64.

mod support;

use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{ServerStep, TrimmedMean};
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::{AggregationStrategy, Limits, RoundPolicy};
use fedinspect_proto::v1 as pb;
use support::*;

const PLANTS: [(&str, u64); 5] = [
    ("plant-1", 120),
    ("plant-2", 300),
    ("plant-3", 45),
    ("plant-4", 200),
    ("plant-5", 80),
];
/// plant-2, the largest plant, boosts its delta.
const ATTACKER: usize = 1;
const BOOST: f32 = 100.0;

/// Runs round 1 with `aggregation` and returns the base, the decoded deltas (plant order of
/// [`PLANTS`]), the published model and the strategy recorded for version 2.
async fn round_with(
    aggregation: AggregationStrategy,
) -> (ModelState, Vec<ModelState>, ModelState, String) {
    let site = Site::new(PLANTS.len());
    let round = RoundPolicy {
        aggregation,
        ..policy(5, 5, 30, Codec::F32)
    };
    let config = site.config("data", round, Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let base = base_model();
    let mut plants = Vec::new();
    for (id, n) in PLANTS {
        let mut p = Plant::connect(&site, &url, id).await;
        p.join(n).await;
        plants.push(p);
    }
    let mut payloads = Vec::new();
    for (i, p) in plants.iter_mut().enumerate() {
        let task = p.next_train().await;
        let mut d = synthetic_delta(i as u64 + 1, 0.01);
        if i == ATTACKER {
            for (_, t) in d.iter_mut() {
                t.data_mut().iter_mut().for_each(|v| *v *= BOOST);
            }
        }
        let payload = encode(&d, Codec::F32);
        let h = header(&task, &payload, pb::Codec::F32, PLANTS[i].1, i as u8 + 1);
        p.upload(h, &payload, payload.len()).await.unwrap();
        payloads.push(payload);
    }
    wait_for_version(&site, &url, 2).await;
    let (published, _) = ModelState::from_safetensors_bytes(&plants[0].download(2).await).unwrap();
    let recorded = running.hub().store.model(2).unwrap().unwrap().strategy;
    running.stop(WAIT).await.unwrap();
    let layout = Layout::of(&base);
    let deltas = payloads
        .iter()
        .map(|b| delta::decode_to_model(&b[..], &layout, Some(Codec::F32)).unwrap())
        .collect();
    (base, deltas, published, recorded)
}

/// Per coordinate: sort the plants' values, drop `trim` at each end, then the median (odd
/// count) or the mean of the rest, added to the base in f64 and rounded once.
fn recompute(base: &ModelState, deltas: &[ModelState], median: bool, trim: usize) -> ModelState {
    let mut out = base.clone();
    for (name, t) in out.iter_mut() {
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            let mut col: Vec<f32> = deltas
                .iter()
                .map(|d| d.get(name).unwrap().data()[i])
                .collect();
            col.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let kept = &col[trim..col.len() - trim];
            let step = if median {
                f64::from(kept[kept.len() / 2])
            } else {
                kept.iter().map(|x| f64::from(*x)).sum::<f64>() / kept.len() as f64
            };
            *v = (f64::from(*v) + step) as f32;
        }
    }
    out
}

fn max_abs_diff(a: &ModelState, b: &ModelState) -> f32 {
    a.iter()
        .flat_map(|(n, t)| {
            let other = b.get(n).unwrap().data();
            t.data().iter().zip(other).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

fn fedavg(base: &ModelState, deltas: &[ModelState]) -> ModelState {
    let ups: Vec<_> = PLANTS
        .iter()
        .zip(deltas)
        .map(|((id, n), d)| fedinspect_common::fedavg::PlantUpdate::new(*id, *n, d))
        .collect();
    fedinspect_common::fedavg::aggregate_canonical(base, &ups).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boosted_delta_does_not_get_through_the_median() {
    let (base, deltas, published, recorded) = round_with(AggregationStrategy::Median).await;
    assert_eq!(recorded, "median");
    let want = recompute(&base, &deltas, true, 0);
    assert_eq!(published, want, "bit for bit the median of the five deltas");
    let honest: Vec<ModelState> = deltas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != ATTACKER)
        .map(|(_, d)| d.clone())
        .collect();
    // Honest deltas are about ±0.01; the boosted one about ±1.
    let from_honest_fedavg = max_abs_diff(&published, &fedavg(&base, &honest));
    let boosted_fedavg_moved = max_abs_diff(&fedavg(&base, &deltas), &fedavg(&base, &honest));
    assert!(from_honest_fedavg < 0.02, "{from_honest_fedavg}");
    assert!(boosted_fedavg_moved > 0.1, "{boosted_fedavg_moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boosted_delta_is_trimmed_by_the_trimmed_mean() {
    let tm = TrimmedMean::new(0.2).unwrap();
    let (base, deltas, published, recorded) =
        round_with(AggregationStrategy::TrimmedMean(tm)).await;
    assert_eq!(recorded, "trimmed_mean(0.2)");
    let want = recompute(&base, &deltas, false, 1);
    assert_eq!(
        published, want,
        "bit for bit the trimmed mean of the five deltas"
    );
    let honest_max = deltas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != ATTACKER)
        .map(|(_, d)| max_abs_diff(d, &d.zeros_like()))
        .fold(0.0, f32::max);
    assert!(max_abs_diff(&published, &base) <= honest_max * 1.0001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_learning_rate_doubles_the_fedavg_step() {
    let step = ServerStep::new(2.0).unwrap();
    let (base, deltas, published, recorded) =
        round_with(AggregationStrategy::ServerStep(step)).await;
    assert_eq!(recorded, "fedavg(server_lr=2)");
    let mean = fedavg(&base, &deltas);
    let mut want = base.clone();
    let mut scaled = 0;
    for (name, t) in want.iter_mut() {
        let m = mean.get(name).unwrap().data();
        let statistic = name.ends_with("running_mean")
            || name.ends_with("running_var")
            || name.ends_with("num_batches_tracked");
        for (v, &m) in t.data_mut().iter_mut().zip(m) {
            *v = if statistic {
                m
            } else {
                scaled += 1;
                let b = f64::from(*v);
                (b + 2.0 * (f64::from(m) - b)) as f32
            };
        }
    }
    assert!(scaled > 0);
    assert_eq!(published, want, "bit for bit twice the FedAvg step");
    // The boosted plant is in this round too: the step is twice FedAvg's, boost included.
    let fedavg_moved = max_abs_diff(&mean, &base);
    let moved = max_abs_diff(&published, &base);
    assert!(
        (moved / fedavg_moved - 2.0).abs() < 1e-3,
        "{moved} vs {fedavg_moved}"
    );
}
