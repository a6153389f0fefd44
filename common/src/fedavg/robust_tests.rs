//! Tests of the robust strategies (coordinate-wise median and trimmed mean): hand-checked
//! values, the outlier that moves FedAvg but barely moves them, sample-count lies, identical
//! deltas, trim fraction validation, refusals, and parts, tiles and the read path agreeing.

use super::tests::{bits, model, ReadOnly};
use super::{
    aggregate_canonical, BadTrimFraction, CoordinateMedian, FedAvgError, PlantUpdate,
    Strategy as AggStrategy, TrimmedMean,
};
use crate::model::ModelState;

fn one(values: &[f32]) -> ModelState {
    model(&[("w", vec![values.len()], values.to_vec())])
}

fn ups<'a>(plants: &'a [(&str, u64, ModelState)]) -> Vec<PlantUpdate<'a>> {
    plants
        .iter()
        .map(|(id, n, d)| PlantUpdate::new(*id, *n, d))
        .collect()
}

fn values(m: &ModelState) -> Vec<f32> {
    m.get("w").unwrap().data().to_vec()
}

fn l2_diff(a: &ModelState, b: &ModelState) -> f64 {
    let (a, b) = (values(a), values(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn median_by_hand_odd_and_even() {
    let base = one(&[1.0, 10.0]);
    let odd = [
        ("c", 1, one(&[3.0, -1.0])),
        ("a", 5, one(&[1.0, 100.0])),
        ("b", 9, one(&[2.0, 0.5])),
    ];
    let out = CoordinateMedian.aggregate(&base, &ups(&odd)).unwrap();
    assert_eq!(
        values(&out),
        [3.0, 10.5],
        "median of {{3,1,2}} and {{-1,100,0.5}}"
    );
    let even = [
        ("a", 1, one(&[1.0, -4.0])),
        ("b", 1, one(&[2.0, 0.0])),
        ("c", 1, one(&[4.0, 2.0])),
        ("d", 1, one(&[8.0, 1e6])),
    ];
    let out = CoordinateMedian.aggregate(&base, &ups(&even)).unwrap();
    assert_eq!(
        values(&out),
        [1.0 + 3.0, 10.0 + 1.0],
        "means of the middle pairs"
    );
}

#[test]
fn trimmed_mean_by_hand() {
    let base = one(&[0.0, 1.0]);
    let plants = [
        ("a", 1, one(&[1.0, -100.0])),
        ("b", 1, one(&[2.0, 0.0])),
        ("c", 1, one(&[3.0, 1.0])),
        ("d", 1, one(&[4.0, 2.0])),
        ("e", 1, one(&[1000.0, 3.0])),
    ];
    let tm = TrimmedMean::new(0.2).unwrap();
    assert_eq!(tm.trimmed_per_side(5), 1);
    let out = tm.aggregate(&base, &ups(&plants)).unwrap();
    assert_eq!(
        values(&out),
        [3.0, 1.0 + 1.0],
        "mean of {{2,3,4}} and {{0,1,2}}"
    );
    // Fraction 0 is the unweighted mean.
    let out = TrimmedMean::new(0.0)
        .unwrap()
        .aggregate(&base, &ups(&plants))
        .unwrap();
    assert_eq!(values(&out), [202.0, 1.0 - 94.0 / 5.0]);
}

#[test]
fn identical_deltas_give_that_delta() {
    let base = one(&[0.1, -3.0, 7.5, 1e-8, 0.0]);
    let d = one(&[0.013, 2.0, -0.7, 3e-9, -0.0]);
    let want: Vec<u32> = values(&base)
        .iter()
        .zip(values(&d))
        .map(|(b, x)| ((f64::from(*b) + f64::from(x)) as f32).to_bits())
        .collect();
    for k in 1..=6 {
        let ids = ["p1", "p2", "p3", "p4", "p5", "p6"];
        let plants: Vec<(&str, u64, ModelState)> =
            (0..k).map(|i| (ids[i], 10 + i as u64, d.clone())).collect();
        let strategies: [Box<dyn AggStrategy>; 3] = [
            Box::new(CoordinateMedian),
            Box::new(TrimmedMean::new(0.2).unwrap()),
            Box::new(TrimmedMean::new(0.45).unwrap()),
        ];
        for s in &strategies {
            let out = s.aggregate(&base, &ups(&plants)).unwrap();
            let got: Vec<u32> = values(&out).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{} with {k} identical deltas", s.name());
        }
    }
}

/// Six honest plants near a common step, and the seventh's delta as the attack makes it.
fn seven_plants(attack: impl Fn(&ModelState) -> ModelState) -> Vec<(String, u64, ModelState)> {
    let n = 200;
    let honest_step: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 1e-3).collect();
    let mut plants: Vec<(String, u64, ModelState)> = (0..6)
        .map(|k| {
            let v: Vec<f32> = honest_step
                .iter()
                .enumerate()
                .map(|(i, s)| s + (((i * 7 + k * 31) % 17) as f32 - 8.0) * 1e-4)
                .collect();
            (format!("plant-{k}"), 100, one(&v))
        })
        .collect();
    let evil = attack(&plants[0].2);
    plants.push(("plant-evil".into(), 100, evil));
    plants
}

fn scaled(d: &ModelState, by: f32) -> ModelState {
    one(&values(d).iter().map(|v| v * by).collect::<Vec<_>>())
}

fn aggregate_owned(
    s: &dyn AggStrategy,
    base: &ModelState,
    plants: &[(String, u64, ModelState)],
) -> ModelState {
    let u: Vec<PlantUpdate> = plants
        .iter()
        .map(|(id, n, d)| PlantUpdate::new(id.clone(), *n, d))
        .collect();
    s.aggregate(base, &u).unwrap()
}

#[test]
fn one_huge_outlier_among_seven_barely_moves_median_and_trimmed_mean() {
    let base = one(&[0.5; 200]);
    let honest = seven_plants(|d| d.clone());
    for (attack, plants) in [
        ("boosted x1000", seven_plants(|d| scaled(d, 1000.0))),
        ("sign flipped x100", seven_plants(|d| scaled(d, -100.0))),
    ] {
        let fedavg_moved = l2_diff(
            &aggregate_canonical(&base, &ups_owned(&plants)).unwrap(),
            &aggregate_canonical(&base, &ups_owned(&honest)).unwrap(),
        );
        let honest_norm = l2_diff(&honest[0].2, &one(&[0.0; 200]));
        assert!(
            fedavg_moved > honest_norm,
            "{attack}: FedAvg moved by {fedavg_moved}, less than one honest delta ({honest_norm})"
        );
        let robust: [Box<dyn AggStrategy>; 2] = [
            Box::new(CoordinateMedian),
            Box::new(TrimmedMean::new(0.15).unwrap()),
        ];
        for s in &robust {
            let moved = l2_diff(
                &aggregate_owned(s.as_ref(), &base, &plants),
                &aggregate_owned(s.as_ref(), &base, &honest),
            );
            assert!(
                moved < 0.05 * fedavg_moved && moved < 0.5 * honest_norm,
                "{attack}: {} moved by {moved}, FedAvg by {fedavg_moved}, an honest delta is {honest_norm}",
                s.name()
            );
        }
    }
}

fn ups_owned(plants: &[(String, u64, ModelState)]) -> Vec<PlantUpdate<'_>> {
    plants
        .iter()
        .map(|(id, n, d)| PlantUpdate::new(id.clone(), *n, d))
        .collect()
}

#[test]
fn a_lie_about_the_sample_count_moves_fedavg_but_not_the_robust_strategies() {
    let base = one(&[0.5; 200]);
    let honest = seven_plants(|d| scaled(d, -1.0));
    let mut lying = honest.clone();
    lying[6].1 *= 10;
    let fedavg =
        |p: &[(String, u64, ModelState)]| aggregate_canonical(&base, &ups_owned(p)).unwrap();
    assert!(l2_diff(&fedavg(&lying), &fedavg(&honest)) > 0.0);
    let robust: [Box<dyn AggStrategy>; 2] = [
        Box::new(CoordinateMedian),
        Box::new(TrimmedMean::new(0.15).unwrap()),
    ];
    for s in &robust {
        assert_eq!(
            bits(&aggregate_owned(s.as_ref(), &base, &lying)),
            bits(&aggregate_owned(s.as_ref(), &base, &honest)),
            "{}: one vote per plant, whatever its sample count",
            s.name()
        );
    }
}

#[test]
fn trim_fraction_is_validated() {
    for bad in [-0.1, 0.5, 0.7, 1.0, f64::NAN, f64::INFINITY, -0.0 - 1e-9] {
        let err = TrimmedMean::new(bad).unwrap_err();
        assert!(err == BadTrimFraction(bad) || bad.is_nan(), "{bad}");
        assert!(err.to_string().contains("below 0.5"), "{err}");
    }
    for good in [0.0, 0.1, 0.2, 0.49] {
        let tm = TrimmedMean::new(good).unwrap();
        assert_eq!(tm.trim_fraction(), good);
        assert_eq!(tm.name(), format!("trimmed_mean({good})"));
    }
    let tm = TrimmedMean::new(0.49).unwrap();
    for k in 1..50 {
        assert!(2 * tm.trimmed_per_side(k) < k, "{k} plants keep a value");
    }
    assert_eq!(TrimmedMean::new(0.1).unwrap().trimmed_per_side(9), 0);
    assert_eq!(TrimmedMean::new(0.1).unwrap().trimmed_per_side(10), 1);
}

#[test]
fn refusals_name_the_problem() {
    let base = one(&[1.0, 2.0]);
    let s = CoordinateMedian;
    assert!(matches!(
        s.aggregate(&base, &[]),
        Err(FedAvgError::NoPlants)
    ));
    let zero = [("a", 0, one(&[1.0, 1.0])), ("b", 0, one(&[2.0, 2.0]))];
    assert!(matches!(
        s.aggregate(&base, &ups(&zero)),
        Err(FedAvgError::ZeroTotalWeight)
    ));
    let dup = [("a", 1, one(&[1.0, 1.0])), ("a", 2, one(&[2.0, 2.0]))];
    assert!(
        matches!(s.aggregate(&base, &ups(&dup)), Err(FedAvgError::DuplicatePlant(p)) if p == "a")
    );
    let shape = [("a", 1, one(&[1.0, 1.0, 1.0]))];
    assert!(matches!(
        s.aggregate(&base, &ups(&shape)),
        Err(FedAvgError::ShapeMismatch { .. })
    ));
    let nan = [("a", 1, one(&[1.0, 1.0])), ("b", 1, one(&[0.0, f32::NAN]))];
    assert!(matches!(
        s.aggregate(&base, &ups(&nan)),
        Err(FedAvgError::NonFinite { plant, index: 1, .. }) if plant == "b"
    ));
    let big = one(&[f32::MAX, 0.0]);
    let over = [("a", 1, big.clone()), ("b", 1, big)];
    assert!(matches!(
        s.aggregate(&one(&[f32::MAX, 0.0]), &ups(&over)),
        Err(FedAvgError::Overflow { index: 0, .. })
    ));
}

#[test]
fn zero_sample_plants_do_not_vote() {
    let base = one(&[0.0]);
    let plants = [
        ("a", 1, one(&[1.0])),
        ("b", 0, one(&[100.0])),
        ("c", 0, one(&[200.0])),
        ("d", 3, one(&[3.0])),
        ("e", 1, one(&[2.0])),
    ];
    let out = CoordinateMedian.aggregate(&base, &ups(&plants)).unwrap();
    assert_eq!(values(&out), [2.0]);
}

#[test]
fn tiles_parts_and_the_read_path_give_the_same_bits() {
    let base = model(&[
        ("a", vec![37], (0..37).map(|i| i as f32 * 0.1).collect()),
        ("b", vec![5, 3], (0..15).map(|i| 1.0 - i as f32).collect()),
        ("c", vec![1], vec![0.25]),
    ]);
    let delta = |k: usize| {
        model(&[
            (
                "a",
                vec![37],
                (0..37)
                    .map(|i| ((i * 5 + k * 11) % 23) as f32 * 0.03 - 0.3)
                    .collect(),
            ),
            (
                "b",
                vec![5, 3],
                (0..15).map(|i| ((i + k * 3) % 7) as f32 - 3.0).collect(),
            ),
            ("c", vec![1], vec![k as f32]),
        ])
    };
    let deltas: Vec<ModelState> = (0..6).map(delta).collect();
    let ids = ["f", "b", "d", "a", "e", "c"];
    let mem: Vec<PlantUpdate> = deltas
        .iter()
        .zip(ids)
        .map(|(d, id)| PlantUpdate::new(id, 1, d))
        .collect();
    let readers: Vec<ReadOnly> = deltas.iter().map(ReadOnly).collect();
    let read: Vec<PlantUpdate> = readers
        .iter()
        .zip(ids)
        .map(|(r, id)| PlantUpdate::new(id, 1, r))
        .collect();
    let tm = TrimmedMean::new(0.2).unwrap();
    let want_m = bits(&CoordinateMedian.aggregate(&base, &mem).unwrap());
    let want_t = bits(&tm.aggregate(&base, &mem).unwrap());
    for tile in [1, 2, 5, 16, 37, 1000] {
        for u in [&mem, &read] {
            assert_eq!(
                bits(
                    &CoordinateMedian
                        .aggregate_with_tile(&base, u, tile)
                        .unwrap()
                ),
                want_m,
                "median, tile {tile}"
            );
            assert_eq!(
                bits(&tm.aggregate_with_tile(&base, u, tile).unwrap()),
                want_t,
                "trimmed, tile {tile}"
            );
        }
    }
    for parts in 1..=4 {
        let s: [&dyn AggStrategy; 2] = [&CoordinateMedian, &tm];
        for (s, want) in s.iter().zip([&want_m, &want_t]) {
            let mut all = Vec::new();
            for p in 0..parts {
                all.extend(s.aggregate_part(&base, &read, p, parts).unwrap());
            }
            assert_eq!(
                &bits(&ModelState::from_tensors(all).unwrap()),
                want,
                "{} in {parts} parts",
                s.name()
            );
        }
    }
}
