//! Property tests of the robust strategies: equal to a plain per-coordinate reference, bit for
//! bit whatever the order of the updates, the tile size or whether deltas are read from a
//! source; a median always lies between the smallest and largest value of its coordinate.

use proptest::prelude::*;

use super::tests::{bits, model, ReadOnly};
use super::{CoordinateMedian, PlantUpdate, Strategy as AggStrategy, TrimmedMean};
use crate::model::ModelState;

#[derive(Clone, Debug)]
struct Round {
    base: ModelState,
    plants: Vec<(String, u64, ModelState)>,
}

fn any_value() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        (-1.0f32..1.0, -30i32..30).prop_map(|(m, e)| m * f32::powi(2.0, e)),
        prop::sample::select(vec![0.0f32, -0.0, 1.0, -1.0, f32::powi(2.0, 40)]),
    ]
}

fn any_round() -> impl Strategy<Value = Round> {
    (1usize..30, 1usize..4, 1usize..10).prop_flat_map(|(la, rows, k)| {
        let numel = la + rows * 2;
        let m = prop::collection::vec(any_value(), numel);
        (m.clone(), prop::collection::vec((m, 1u64..1000), k)).prop_map(move |(b, ps)| {
            let mk = |v: &[f32]| {
                model(&[
                    ("a", vec![la], v[..la].to_vec()),
                    ("b", vec![rows, 2], v[la..].to_vec()),
                ])
            };
            Round {
                base: mk(&b),
                plants: ps
                    .iter()
                    .enumerate()
                    .map(|(k, (d, n))| (format!("plant-{:02}", (5 * k + 3) % 11), *n, mk(d)))
                    .collect(),
            }
        })
    })
}

fn ups(plants: &[(String, u64, ModelState)]) -> Vec<PlantUpdate<'_>> {
    plants
        .iter()
        .map(|(id, n, d)| PlantUpdate::new(id.clone(), *n, d))
        .collect()
}

/// The robust formulas written plainly, coordinate by coordinate.
fn reference(r: &Round, trim: Option<f64>) -> ModelState {
    let mut out = r.base.zeros_like();
    for (name, t) in out.iter_mut() {
        let base = r.base.get(name).unwrap().data();
        for (i, o) in t.data_mut().iter_mut().enumerate() {
            let mut col: Vec<f32> = r
                .plants
                .iter()
                .map(|p| p.2.get(name).unwrap().data()[i])
                .collect();
            col.sort_by(f32::total_cmp);
            let k = col.len();
            let step = match trim {
                None if k % 2 == 1 => f64::from(col[k / 2]),
                None => (f64::from(col[k / 2 - 1]) + f64::from(col[k / 2])) / 2.0,
                Some(f) => {
                    let t = (f * k as f64).floor() as usize;
                    let kept = &col[t..k - t];
                    kept.iter().map(|v| f64::from(*v)).sum::<f64>() / kept.len() as f64
                }
            };
            *o = (f64::from(base[i]) + step) as f32;
        }
    }
    out
}

proptest! {
    #[test]
    fn robust_strategies_equal_the_plain_formulas(r in any_round(), f in 0.0f64..0.5) {
        let tm = TrimmedMean::new(f).unwrap();
        prop_assert_eq!(bits(&CoordinateMedian.aggregate(&r.base, &ups(&r.plants)).unwrap()), bits(&reference(&r, None)));
        prop_assert_eq!(bits(&tm.aggregate(&r.base, &ups(&r.plants)).unwrap()), bits(&reference(&r, Some(f))));
    }

    #[test]
    fn robust_strategies_ignore_order_tile_and_source(
        (r, order) in any_round().prop_flat_map(|r| {
            let idx: Vec<usize> = (0..r.plants.len()).collect();
            (Just(r), Just(idx).prop_shuffle())
        }),
        tile in 1usize..40,
        f in 0.0f64..0.5,
    ) {
        let tm = TrimmedMean::new(f).unwrap();
        let shuffled: Vec<(String, u64, ModelState)> = order.iter().map(|&i| r.plants[i].clone()).collect();
        let readers: Vec<ReadOnly> = shuffled.iter().map(|p| ReadOnly(&p.2)).collect();
        let read: Vec<PlantUpdate> = shuffled.iter().zip(&readers).map(|(p, d)| PlantUpdate::new(p.0.clone(), p.1, d)).collect();
        let want_m = bits(&CoordinateMedian.aggregate(&r.base, &ups(&r.plants)).unwrap());
        let want_t = bits(&tm.aggregate(&r.base, &ups(&r.plants)).unwrap());
        prop_assert_eq!(bits(&CoordinateMedian.aggregate_with_tile(&r.base, &read, tile).unwrap()), want_m);
        prop_assert_eq!(bits(&tm.aggregate_with_tile(&r.base, &read, tile).unwrap()), want_t);
    }

    #[test]
    fn the_median_step_lies_within_each_coordinate_range(r in any_round()) {
        let out = CoordinateMedian.aggregate(&r.base, &ups(&r.plants)).unwrap();
        for (name, t) in out.iter() {
            let base = r.base.get(name).unwrap().data();
            for (i, v) in t.data().iter().enumerate() {
                let col = r.plants.iter().map(|p| p.2.get(name).unwrap().data()[i]);
                let lo = col.clone().fold(f32::INFINITY, f32::min);
                let hi = col.fold(f32::NEG_INFINITY, f32::max);
                let (lo, hi) = ((f64::from(base[i]) + f64::from(lo)) as f32, (f64::from(base[i]) + f64::from(hi)) as f32);
                prop_assert!(lo <= *v && *v <= hi, "{} {}: {} not in {}..={}", name, i, v, lo, hi);
            }
        }
    }
}
