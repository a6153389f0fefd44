//! Property tests: both FedAvg paths against the plain f64 reference, order independence of the
//! canonical path, and streaming (interleaved, with discards) equal to canonical on exact inputs.

use proptest::prelude::*;

use super::tests::{bits, canonical, model, naive, naive_sorted, streaming, ReadOnly};
use super::{FedAvgError, StreamingFedAvg};
use crate::model::ModelState;

/// A round: base, then per plant (delta, weight); tensors "a" (1-D) and "b" (2-D).
#[derive(Clone, Debug)]
struct Round {
    base: ModelState,
    plants: Vec<(String, u64, ModelState)>,
}

fn round_of(
    values: impl Strategy<Value = f32> + Clone,
    weights: impl Strategy<Value = u64> + Clone,
) -> impl Strategy<Value = Round> {
    (1usize..40, 1usize..6, 1usize..9).prop_flat_map(move |(la, rows, k)| {
        let numel = la + rows * 3;
        let m = prop::collection::vec(values.clone(), numel);
        (
            m.clone(),
            prop::collection::vec((m, weights.clone()), k),
            Just((la, rows)),
        )
            .prop_filter_map("some weight", |(b, ps, (la, rows))| {
                ps.iter().any(|p| p.1 > 0).then(|| {
                    let mk = |v: &[f32]| {
                        model(&[
                            ("a", vec![la], v[..la].to_vec()),
                            ("b", vec![rows, 3], v[la..].to_vec()),
                        ])
                    };
                    let plants = ps
                        .iter()
                        .enumerate()
                        // Ids out of id order, so that the input order is not the canonical one.
                        .map(|(k, (d, n))| (format!("plant-{:02}", (5 * k + 3) % 11), *n, mk(d)))
                        .collect();
                    Round {
                        base: mk(&b),
                        plants,
                    }
                })
            })
    })
}

fn any_value() -> impl Strategy<Value = f32> + Clone {
    (-1.0f32..1.0, -30i32..30).prop_map(|(m, e)| m * f32::powi(2.0, e))
}

/// Values whose sums depend on the order: huge terms (±2^40) that cancel, tiny ones (2^-40)
/// they absorb.
fn order_sensitive_value() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        any_value(),
        prop::sample::select(vec![
            1.0f32,
            -1.0,
            0.75,
            f32::powi(2.0, 40),
            -f32::powi(2.0, 40),
            f32::powi(2.0, -40),
            0.0,
        ]),
    ]
}

fn any_weight() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![0u64..4, 0u64..1 << 40]
}

/// Multiples of 2^-20 below 2^0 in magnitude: every product and sum below is exact.
fn exact_value() -> impl Strategy<Value = f32> + Clone {
    (-(1i32 << 20)..(1 << 20)).prop_map(|q| q as f32 / (1u32 << 20) as f32)
}

fn refs(r: &Round) -> Vec<(&str, u64, &ModelState)> {
    r.plants
        .iter()
        .map(|(id, n, d)| (id.as_str(), *n, d))
        .collect()
}

proptest! {
    #[test]
    fn canonical_equals_the_plain_formula(r in round_of(order_sensitive_value(), any_weight())) {
        let plants = refs(&r);
        prop_assert_eq!(bits(&canonical(&r.base, &plants).unwrap()), bits(&naive_sorted(&r.base, &plants)));
        prop_assert_eq!(bits(&streaming(&r.base, &plants).unwrap()), bits(&naive(&r.base, &plants)));
    }

    #[test]
    fn canonical_ignores_input_order(
        (r, order) in round_of(order_sensitive_value(), any_weight()).prop_flat_map(|r| {
            let idx: Vec<usize> = (0..r.plants.len()).collect();
            (Just(r), Just(idx).prop_shuffle())
        })
    ) {
        let plants = refs(&r);
        let shuffled: Vec<_> = order.iter().map(|&i| plants[i]).collect();
        prop_assert_eq!(bits(&canonical(&r.base, &shuffled).unwrap()), bits(&canonical(&r.base, &plants).unwrap()));
    }

    #[test]
    fn streaming_equals_canonical_on_exact_inputs(
        r in round_of(exact_value(), 0u64..5000),
        schedule in prop::collection::vec(any::<u32>(), 64),
        failing in prop::collection::vec(any::<bool>(), 8),
    ) {
        // Plants upload in interleaved pieces; some fail part-way and are discarded.
        let mut acc = StreamingFedAvg::begin(&r.base);
        let mut cursors = vec![(0usize, 0usize); r.plants.len()]; // (tensor, offset)
        let names = ["a", "b"];
        for (id, n, _) in &r.plants {
            acc.begin_plant(id, *n).unwrap();
        }
        let mut open: Vec<usize> = (0..r.plants.len()).collect();
        let mut step = 0;
        while !open.is_empty() {
            let pick = schedule[step % schedule.len()] as usize + step;
            step += 1;
            let slot = pick % open.len();
            let k = open[slot];
            let (id, _, d) = &r.plants[k];
            let (t, off) = cursors[k];
            let data = d.get(names[t]).unwrap().data();
            let len = 1 + pick % 7;
            let end = (off + len).min(data.len());
            acc.add_values(id, names[t], off, &data[off..end]).unwrap();
            cursors[k] = if end == data.len() { (t + 1, 0) } else { (t, end) };
            let half_way = t == 1 || end > data.len() / 2;
            if failing[k] && half_way {
                acc.discard_plant(id, &ReadOnly(d)).unwrap();
                open.remove(slot);
            } else if cursors[k].0 == names.len() {
                acc.commit_plant(id).unwrap();
                open.remove(slot);
            }
        }
        let kept: Vec<_> = refs(&r).into_iter().enumerate().filter(|(k, _)| !failing[*k]).map(|(_, p)| p).collect();
        match canonical(&r.base, &kept) {
            Ok(want) => prop_assert_eq!(bits(&acc.finish(&r.base).unwrap()), bits(&want)),
            Err(FedAvgError::NoPlants) => prop_assert!(matches!(acc.finish(&r.base), Err(FedAvgError::NoPlants))),
            Err(FedAvgError::ZeroTotalWeight) => prop_assert!(matches!(acc.finish(&r.base), Err(FedAvgError::ZeroTotalWeight))),
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
    }
}
