//! Tests of both FedAvg paths against a plain f64 reference, their refusals, and properties.

use std::io;

use proptest::prelude::*;

use super::{
    aggregate_canonical, DeltaSource, FedAvg, FedAvgError, PlantUpdate, StreamingFedAvg,
    Strategy as AggStrategy, TILE,
};
use crate::model::{ModelState, Tensor};

/// The FedAvg formula, written plainly: plants taken in the order given, zero weights skipped.
fn naive(base: &ModelState, plants: &[(&str, u64, &ModelState)]) -> ModelState {
    let total: u64 = plants.iter().map(|p| p.1).sum();
    let mut out = ModelState::new();
    for (name, b) in base.iter() {
        let mut data = Vec::new();
        for i in 0..b.numel() {
            let mut acc = 0.0f64;
            for (_, n, delta) in plants {
                if *n > 0 {
                    acc += (*n as f64) * (delta.get(name).unwrap().data()[i] as f64);
                }
            }
            data.push(((b.data()[i] as f64) + acc / (total as f64)) as f32);
        }
        out.insert(name, Tensor::new(b.shape().to_vec(), data).unwrap())
            .unwrap();
    }
    out
}

/// Same order as the canonical path: by plant id.
fn naive_sorted(base: &ModelState, plants: &[(&str, u64, &ModelState)]) -> ModelState {
    let mut sorted = plants.to_vec();
    sorted.sort_by_key(|p| p.0);
    naive(base, &sorted)
}

fn model(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> ModelState {
    let mut m = ModelState::new();
    for (name, shape, data) in tensors {
        m.insert(*name, Tensor::new(shape.clone(), data.clone()).unwrap())
            .unwrap();
    }
    m
}

fn two_tensor(w: [f32; 4], b: [f32; 2]) -> ModelState {
    model(&[("l.w", vec![2, 2], w.to_vec()), ("l.b", vec![2], b.to_vec())])
}

fn bits(m: &ModelState) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    m.iter()
        .map(|(n, t)| {
            let b = t.data().iter().map(|v| v.to_bits()).collect();
            (n.to_string(), t.shape().to_vec(), b)
        })
        .collect()
}

fn canonical(base: &ModelState, plants: &[(&str, u64, &ModelState)]) -> Result<ModelState, FedAvgError> {
    let ups: Vec<PlantUpdate> = plants
        .iter()
        .map(|&(id, n, d)| PlantUpdate::new(id, n, d))
        .collect();
    aggregate_canonical(base, &ups)
}

fn streaming(base: &ModelState, plants: &[(&str, u64, &ModelState)]) -> Result<ModelState, FedAvgError> {
    let mut acc = StreamingFedAvg::begin(base);
    for &(id, n, d) in plants {
        acc.add(id, d, n)?;
    }
    acc.finish(base)
}

/// A delta readable only through `read`, as a file-backed source would be.
struct ReadOnly<'a>(&'a ModelState);

impl DeltaSource for ReadOnly<'_> {
    fn tensors(&self) -> Vec<(&str, &[usize])> {
        self.0.tensors()
    }
    fn read(&self, name: &str, offset: usize, out: &mut [f32]) -> io::Result<()> {
        self.0.read(name, offset, out)
    }
}

/// A stored upload that cannot be read back.
struct Unreadable;

impl DeltaSource for Unreadable {
    fn tensors(&self) -> Vec<(&str, &[usize])> {
        Vec::new()
    }
    fn read(&self, _: &str, _: usize, _: &mut [f32]) -> io::Result<()> {
        Err(io::Error::other("disk gone"))
    }
}

#[test]
fn hand_checked_two_plants() {
    let base = two_tensor([1.0, 2.0, 3.0, 4.0], [0.5, -0.5]);
    let a = two_tensor([1.0, 0.0, 0.0, 0.0], [0.0, 1.0]);
    let b = two_tensor([0.0, 2.0, 0.0, -4.0], [0.0, 1.0]);
    // weights 1 and 3, N = 4: w += (1*a + 3*b) / 4
    let want = two_tensor([1.25, 3.5, 3.0, 1.0], [0.5, 0.5]);
    let plants = [("a", 1, &a), ("b", 3, &b)];
    assert_eq!(canonical(&base, &plants).unwrap(), want);
    assert_eq!(streaming(&base, &plants).unwrap(), want);
    assert_eq!(FedAvg.aggregate(&base, &[PlantUpdate::new("b", 3, &b), PlantUpdate::new("a", 1, &a)]).unwrap(), want);
    assert_eq!(FedAvg.name(), "fedavg");
}

#[test]
fn single_plant_gives_base_plus_delta_exactly() {
    let base = two_tensor([0.75, -1.5, 3.0, 1024.0], [0.0, -0.0]);
    let d = two_tensor([0.25, 0.125, -3.0, 0.5], [1.0 / 1024.0, 2.0]);
    let want = two_tensor([1.0, -1.375, 0.0, 1024.5], [1.0 / 1024.0, 2.0]);
    for n in [1, 7, 1000, u64::MAX] {
        assert_eq!(canonical(&base, &[("only", n, &d)]).unwrap(), want, "n = {n}");
        assert_eq!(streaming(&base, &[("only", n, &d)]).unwrap(), want, "n = {n}");
    }
}

#[test]
fn zero_weight_plant_contributes_nothing_and_is_not_read() {
    let base = two_tensor([1.0, 2.0, 3.0, 4.0], [5.0, 6.0]);
    let a = two_tensor([0.1, 0.2, 0.3, 0.4], [0.5, 0.6]);
    let nan = two_tensor([f32::NAN; 4], [f32::INFINITY; 2]);
    let alone = canonical(&base, &[("a", 3, &a)]).unwrap();
    assert_eq!(canonical(&base, &[("a", 3, &a), ("z", 0, &nan)]).unwrap(), alone);
    assert_eq!(streaming(&base, &[("z", 0, &nan), ("a", 3, &a)]).unwrap(), alone);
}

#[test]
fn refuses_empty_rounds_and_bad_weights() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let d = two_tensor([0.5; 4], [0.5; 2]);
    assert!(matches!(canonical(&base, &[]), Err(FedAvgError::NoPlants)));
    assert!(matches!(streaming(&base, &[]), Err(FedAvgError::NoPlants)));
    let zero = [("a", 0, &d), ("b", 0, &d)];
    assert!(matches!(canonical(&base, &zero), Err(FedAvgError::ZeroTotalWeight)));
    assert!(matches!(streaming(&base, &zero), Err(FedAvgError::ZeroTotalWeight)));
    let dup = [("a", 1, &d), ("b", 1, &d), ("a", 2, &d)];
    assert!(matches!(canonical(&base, &dup), Err(FedAvgError::DuplicatePlant(p)) if p == "a"));
    assert!(matches!(streaming(&base, &dup), Err(FedAvgError::DuplicatePlant(p)) if p == "a"));
    let huge = [("a", u64::MAX, &d), ("b", 1, &d)];
    assert!(matches!(canonical(&base, &huge), Err(FedAvgError::WeightOverflow { plant, .. }) if plant == "b"));
    assert!(matches!(streaming(&base, &huge), Err(FedAvgError::WeightOverflow { plant, .. }) if plant == "b"));
}

#[test]
fn refuses_mismatched_tensors_naming_plant_and_tensor() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let good = two_tensor([0.5; 4], [0.5; 2]);
    let missing = model(&[("l.w", vec![2, 2], vec![0.0; 4])]);
    let extra = model(&[
        ("l.w", vec![2, 2], vec![0.0; 4]),
        ("l.b", vec![2], vec![0.0; 2]),
        ("l.x", vec![1], vec![0.0]),
    ]);
    let reshaped = model(&[("l.w", vec![4], vec![0.0; 4]), ("l.b", vec![2], vec![0.0; 2])]);
    for (bad, want) in [(&missing, "missing"), (&extra, "extra"), (&reshaped, "shape")] {
        let plants = [("good", 1, &good), ("bad", 1, bad)];
        for r in [canonical(&base, &plants), streaming(&base, &plants)] {
            let e = r.unwrap_err();
            let ok = match (&e, want) {
                (FedAvgError::MissingTensor { plant, tensor }, "missing") => plant == "bad" && tensor == "l.b",
                (FedAvgError::UnexpectedTensor { plant, tensor }, "extra") => plant == "bad" && tensor == "l.x",
                (FedAvgError::ShapeMismatch { plant, tensor, expected, got }, "shape") => {
                    plant == "bad" && tensor == "l.w" && expected == &[2, 2] && got == &[4]
                }
                _ => false,
            };
            assert!(ok, "{want}: got {e}");
            assert!(e.to_string().contains("'bad'"), "{e}");
        }
    }
}

#[test]
fn refuses_non_finite_values_and_overflow() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let good = two_tensor([0.5; 4], [0.5; 2]);
    let bad = two_tensor([0.5, 0.5, f32::NAN, 0.5], [0.5; 2]);
    let plants = [("good", 1, &good), ("bad", 2, &bad)];
    for r in [canonical(&base, &plants), streaming(&base, &plants)] {
        assert!(
            matches!(&r, Err(FedAvgError::NonFinite { plant, tensor, index: 2 }) if plant == "bad" && tensor == "l.w"),
            "{r:?}"
        );
    }
    let big = two_tensor([f32::MAX; 4], [0.0; 2]);
    let plants = [("big", 1, &big)];
    for r in [canonical(&big, &plants), streaming(&big, &plants)] {
        assert!(matches!(&r, Err(FedAvgError::Overflow { tensor, index: 0 }) if tensor == "l.w"), "{r:?}");
    }
    let nan_base = two_tensor([1.0; 4], [1.0, f32::INFINITY]);
    let plants = [("good", 1, &good)];
    for r in [canonical(&nan_base, &plants), streaming(&nan_base, &plants)] {
        assert!(matches!(&r, Err(FedAvgError::NonFiniteBase { tensor, index: 1 }) if tensor == "l.b"), "{r:?}");
    }
}

#[test]
fn streaming_refuses_bad_pieces() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let mut acc = StreamingFedAvg::begin(&base);
    assert!(matches!(acc.add_values("p", "l.w", 0, &[1.0]), Err(FedAvgError::NotOpen(_))));
    acc.begin_plant("p", 2).unwrap();
    assert!(matches!(acc.begin_plant("p", 2), Err(FedAvgError::DuplicatePlant(_))));
    assert!(matches!(acc.add_values("p", "l.q", 0, &[1.0]), Err(FedAvgError::UnexpectedTensor { .. })));
    acc.add_values("p", "l.w", 0, &[1.0, 2.0]).unwrap();
    assert!(matches!(
        acc.add_values("p", "l.w", 1, &[1.0]),
        Err(FedAvgError::OutOfOrder { offset: 1, expected: 2, .. })
    ));
    assert!(matches!(
        acc.add_values("p", "l.w", 2, &[1.0; 3]),
        Err(FedAvgError::OutOfRange { end: 5, numel: 4, .. })
    ));
    acc.add_values("p", "l.w", 2, &[3.0, 4.0]).unwrap();
    assert!(matches!(
        acc.commit_plant("p"),
        Err(FedAvgError::Incomplete { received: 0, numel: 2, .. })
    ));
    assert!(matches!(acc.finish(&base), Err(FedAvgError::StillOpen(p)) if p == "p"));
}

#[test]
fn streaming_discard_then_retry_equals_clean_run() {
    let base = two_tensor([0.5, 1.5, -2.0, 8.0], [0.25, 0.0]);
    let a = two_tensor([0.125, 0.5, -1.0, 2.0], [1.0, -0.5]);
    let b = two_tensor([0.25, -0.75, 3.0, 0.0], [0.5, 0.5]);
    let mut acc = StreamingFedAvg::begin(&base);
    acc.begin_plant("b", 5).unwrap();
    acc.add_values("b", "l.w", 0, &b.get("l.w").unwrap().data()[..3]).unwrap();
    acc.add("a", &a, 3).unwrap();
    acc.discard_plant("b", &b).unwrap();
    assert_eq!(acc.total_samples(), 3);
    // The retry sends through the read path of a stored copy.
    acc.begin_plant("b", 5).unwrap();
    for (name, t) in b.iter() {
        for (c, piece) in t.data().chunks(1).enumerate() {
            acc.add_values("b", name, c, piece).unwrap();
        }
    }
    acc.commit_plant("b").unwrap();
    assert_eq!(acc.committed().collect::<Vec<_>>(), [("a", 3), ("b", 5)]);
    let want = canonical(&base, &[("a", 3, &a), ("b", 5, &b)]).unwrap();
    assert_eq!(bits(&acc.finish(&base).unwrap()), bits(&want));
}

#[test]
fn streaming_is_poisoned_when_an_upload_cannot_be_read_back() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let mut acc = StreamingFedAvg::begin(&base);
    acc.begin_plant("p", 1).unwrap();
    acc.add_values("p", "l.b", 0, &[1.0]).unwrap();
    assert!(matches!(acc.discard_plant("p", &Unreadable), Err(FedAvgError::Read { .. })));
    assert!(matches!(acc.begin_plant("q", 1), Err(FedAvgError::Poisoned { plant }) if plant == "p"));
    assert!(matches!(acc.finish(&base), Err(FedAvgError::Poisoned { .. })));
}

#[test]
fn streaming_finish_refuses_another_base() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let other = model(&[("l.w", vec![2, 2], vec![1.0; 4])]);
    let mut acc = StreamingFedAvg::begin(&base);
    acc.add("a", &base, 1).unwrap();
    assert!(matches!(acc.finish(&other), Err(FedAvgError::BaseChanged { tensor }) if tensor == "l.b"));
}

/// Deterministic pseudo-random values with varied exponents (not exactly summable).
fn noisy(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * f32::powi(2.0, (s % 24) as i32 - 12)
        })
        .collect()
}

#[test]
fn canonical_matches_naive_across_tiles_and_fused_groups() {
    let shapes = [vec![2 * TILE + 5], vec![3, 7]];
    let mk = |seed: u64| {
        let mut m = ModelState::new();
        for (j, s) in shapes.iter().enumerate() {
            let n = s.iter().product();
            m.insert(format!("t{j}"), Tensor::new(s.clone(), noisy(n, seed * 10 + j as u64)).unwrap())
                .unwrap();
        }
        m
    };
    let base = mk(99);
    let deltas: Vec<ModelState> = (0..6).map(mk).collect();
    let ids = ["p5", "p3", "p0", "p4", "p1", "p2"];
    let plants: Vec<(&str, u64, &ModelState)> = ids
        .iter()
        .zip(&deltas)
        .enumerate()
        .map(|(k, (id, d))| (*id, 17 + 1000 * k as u64, d))
        .collect();
    let want = bits(&naive_sorted(&base, &plants));
    assert_eq!(bits(&canonical(&base, &plants).unwrap()), want);
    let readers: Vec<ReadOnly> = deltas.iter().map(ReadOnly).collect();
    let ups: Vec<PlantUpdate> = plants
        .iter()
        .zip(&readers)
        .map(|(p, r)| PlantUpdate::new(p.0, p.1, r))
        .collect();
    assert_eq!(bits(&aggregate_canonical(&base, &ups).unwrap()), want, "read path");
    // Streaming follows arrival order, and equals the plain formula in that order.
    assert_eq!(bits(&streaming(&base, &plants).unwrap()), bits(&naive(&base, &plants)));
}

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
                        model(&[("a", vec![la], v[..la].to_vec()), ("b", vec![rows, 3], v[la..].to_vec())])
                    };
                    let plants = ps
                        .iter()
                        .enumerate()
                        .map(|(k, (d, n))| (format!("plant-{k:02}"), *n, mk(d)))
                        .collect();
                    Round { base: mk(&b), plants }
                })
            })
    })
}

fn any_value() -> impl Strategy<Value = f32> + Clone {
    (-1.0f32..1.0, -30i32..30).prop_map(|(m, e)| m * f32::powi(2.0, e))
}

/// Values whose sums depend on the order: huge terms that cancel, tiny ones they absorb.
fn order_sensitive_value() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        any_value(),
        prop::sample::select(vec![1.0f32, -1.0, 0.75, 0x1p40, -0x1p40, 0x1p-40, -0x1p-40, 0.0]),
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
    r.plants.iter().map(|(id, n, d)| (id.as_str(), *n, d)).collect()
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
