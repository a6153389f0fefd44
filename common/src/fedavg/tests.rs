//! Tests of both FedAvg paths against a plain f64 reference, and of their refusals; the
//! helpers here are shared with the property tests.

use std::io;

use super::{
    aggregate_canonical, DeltaSource, FedAvg, FedAvgError, PlantUpdate, Strategy as AggStrategy,
    StreamingFedAvg, TILE,
};
use crate::model::{ModelState, Tensor};

/// The FedAvg formula, written plainly: plants taken in the order given, zero weights skipped.
pub(super) fn naive(base: &ModelState, plants: &[(&str, u64, &ModelState)]) -> ModelState {
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
pub(super) fn naive_sorted(base: &ModelState, plants: &[(&str, u64, &ModelState)]) -> ModelState {
    let mut sorted = plants.to_vec();
    sorted.sort_by_key(|p| p.0);
    naive(base, &sorted)
}

pub(super) fn model(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> ModelState {
    let mut m = ModelState::new();
    for (name, shape, data) in tensors {
        m.insert(*name, Tensor::new(shape.clone(), data.clone()).unwrap())
            .unwrap();
    }
    m
}

fn two_tensor(w: [f32; 4], b: [f32; 2]) -> ModelState {
    model(&[
        ("l.w", vec![2, 2], w.to_vec()),
        ("l.b", vec![2], b.to_vec()),
    ])
}

pub(super) fn bits(m: &ModelState) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    m.iter()
        .map(|(n, t)| {
            let b = t.data().iter().map(|v| v.to_bits()).collect();
            (n.to_string(), t.shape().to_vec(), b)
        })
        .collect()
}

pub(super) fn canonical(
    base: &ModelState,
    plants: &[(&str, u64, &ModelState)],
) -> Result<ModelState, FedAvgError> {
    let ups: Vec<PlantUpdate> = plants
        .iter()
        .map(|&(id, n, d)| PlantUpdate::new(id, n, d))
        .collect();
    aggregate_canonical(base, &ups)
}

pub(super) fn streaming(
    base: &ModelState,
    plants: &[(&str, u64, &ModelState)],
) -> Result<ModelState, FedAvgError> {
    let mut acc = StreamingFedAvg::begin(base);
    for &(id, n, d) in plants {
        acc.add(id, d, n)?;
    }
    acc.finish(base)
}

/// A delta readable only through `read`, as a file-backed source would be.
pub(super) struct ReadOnly<'a>(pub(super) &'a ModelState);

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
    assert_eq!(
        FedAvg
            .aggregate(
                &base,
                &[PlantUpdate::new("b", 3, &b), PlantUpdate::new("a", 1, &a)]
            )
            .unwrap(),
        want
    );
    assert_eq!(FedAvg.name(), "fedavg");
}

#[test]
fn single_plant_gives_base_plus_delta_exactly() {
    let base = two_tensor([0.75, -1.5, 3.0, 1024.0], [0.0, -0.0]);
    let d = two_tensor([0.25, 0.125, -3.0, 0.5], [1.0 / 1024.0, 2.0]);
    let want = two_tensor([1.0, -1.375, 0.0, 1024.5], [1.0 / 1024.0, 2.0]);
    for n in [1, 7, 1000, u64::MAX] {
        assert_eq!(
            canonical(&base, &[("only", n, &d)]).unwrap(),
            want,
            "n = {n}"
        );
        assert_eq!(
            streaming(&base, &[("only", n, &d)]).unwrap(),
            want,
            "n = {n}"
        );
    }
}

#[test]
fn zero_weight_plant_contributes_nothing_and_is_not_read() {
    let base = two_tensor([1.0, 2.0, 3.0, 4.0], [5.0, 6.0]);
    let a = two_tensor([0.1, 0.2, 0.3, 0.4], [0.5, 0.6]);
    let nan = two_tensor([f32::NAN; 4], [f32::INFINITY; 2]);
    let alone = canonical(&base, &[("a", 3, &a)]).unwrap();
    assert_eq!(
        canonical(&base, &[("a", 3, &a), ("z", 0, &nan)]).unwrap(),
        alone
    );
    assert_eq!(
        streaming(&base, &[("z", 0, &nan), ("a", 3, &a)]).unwrap(),
        alone
    );
}

#[test]
fn refuses_empty_rounds_and_bad_weights() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let d = two_tensor([0.5; 4], [0.5; 2]);
    assert!(matches!(canonical(&base, &[]), Err(FedAvgError::NoPlants)));
    assert!(matches!(streaming(&base, &[]), Err(FedAvgError::NoPlants)));
    let zero = [("a", 0, &d), ("b", 0, &d)];
    assert!(matches!(
        canonical(&base, &zero),
        Err(FedAvgError::ZeroTotalWeight)
    ));
    assert!(matches!(
        streaming(&base, &zero),
        Err(FedAvgError::ZeroTotalWeight)
    ));
    let dup = [("a", 1, &d), ("b", 1, &d), ("a", 2, &d)];
    assert!(matches!(canonical(&base, &dup), Err(FedAvgError::DuplicatePlant(p)) if p == "a"));
    assert!(matches!(streaming(&base, &dup), Err(FedAvgError::DuplicatePlant(p)) if p == "a"));
    let huge = [("a", u64::MAX, &d), ("b", 1, &d)];
    assert!(
        matches!(canonical(&base, &huge), Err(FedAvgError::WeightOverflow { plant, .. }) if plant == "b")
    );
    assert!(
        matches!(streaming(&base, &huge), Err(FedAvgError::WeightOverflow { plant, .. }) if plant == "b")
    );
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
    let reshaped = model(&[
        ("l.w", vec![4], vec![0.0; 4]),
        ("l.b", vec![2], vec![0.0; 2]),
    ]);
    for (bad, want) in [
        (&missing, "missing"),
        (&extra, "extra"),
        (&reshaped, "shape"),
    ] {
        let plants = [("good", 1, &good), ("bad", 1, bad)];
        for r in [canonical(&base, &plants), streaming(&base, &plants)] {
            let e = r.unwrap_err();
            let ok = match (&e, want) {
                (FedAvgError::MissingTensor { plant, tensor }, "missing") => {
                    plant == "bad" && tensor == "l.b"
                }
                (FedAvgError::UnexpectedTensor { plant, tensor }, "extra") => {
                    plant == "bad" && tensor == "l.x"
                }
                (
                    FedAvgError::ShapeMismatch {
                        plant,
                        tensor,
                        expected,
                        got,
                    },
                    "shape",
                ) => plant == "bad" && tensor == "l.w" && expected == &[2, 2] && got == &[4],
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
        assert!(
            matches!(&r, Err(FedAvgError::Overflow { tensor, index: 0 }) if tensor == "l.w"),
            "{r:?}"
        );
    }
    let nan_base = two_tensor([1.0; 4], [1.0, f32::INFINITY]);
    let plants = [("good", 1, &good)];
    for r in [canonical(&nan_base, &plants), streaming(&nan_base, &plants)] {
        assert!(
            matches!(&r, Err(FedAvgError::NonFiniteBase { tensor, index: 1 }) if tensor == "l.b"),
            "{r:?}"
        );
    }
}

#[test]
fn streaming_refuses_bad_pieces() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let mut acc = StreamingFedAvg::begin(&base);
    assert!(matches!(
        acc.add_values("p", "l.w", 0, &[1.0]),
        Err(FedAvgError::NotOpen(_))
    ));
    acc.begin_plant("p", 2).unwrap();
    assert!(matches!(
        acc.begin_plant("p", 2),
        Err(FedAvgError::DuplicatePlant(_))
    ));
    assert!(matches!(
        acc.add_values("p", "l.q", 0, &[1.0]),
        Err(FedAvgError::UnexpectedTensor { .. })
    ));
    acc.add_values("p", "l.w", 0, &[1.0, 2.0]).unwrap();
    assert!(matches!(
        acc.add_values("p", "l.w", 1, &[1.0]),
        Err(FedAvgError::OutOfOrder {
            offset: 1,
            expected: 2,
            ..
        })
    ));
    assert!(matches!(
        acc.add_values("p", "l.w", 2, &[1.0; 3]),
        Err(FedAvgError::OutOfRange {
            end: 5,
            numel: 4,
            ..
        })
    ));
    acc.add_values("p", "l.w", 2, &[3.0, 4.0]).unwrap();
    assert!(matches!(
        acc.commit_plant("p"),
        Err(FedAvgError::Incomplete {
            received: 0,
            numel: 2,
            ..
        })
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
    acc.add_values("b", "l.w", 0, &b.get("l.w").unwrap().data()[..3])
        .unwrap();
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
    assert!(matches!(
        acc.discard_plant("p", &Unreadable),
        Err(FedAvgError::Read { .. })
    ));
    assert!(
        matches!(acc.begin_plant("q", 1), Err(FedAvgError::Poisoned { plant }) if plant == "p")
    );
    assert!(matches!(
        acc.finish(&base),
        Err(FedAvgError::Poisoned { .. })
    ));
}

#[test]
fn streaming_finish_refuses_another_base() {
    let base = two_tensor([1.0; 4], [1.0; 2]);
    let other = model(&[("l.w", vec![2, 2], vec![1.0; 4])]);
    let mut acc = StreamingFedAvg::begin(&base);
    acc.add("a", &base, 1).unwrap();
    assert!(
        matches!(acc.finish(&other), Err(FedAvgError::BaseChanged { tensor }) if tensor == "l.b")
    );
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
            m.insert(
                format!("t{j}"),
                Tensor::new(s.clone(), noisy(n, seed * 10 + j as u64)).unwrap(),
            )
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
    assert_eq!(
        bits(&aggregate_canonical(&base, &ups).unwrap()),
        want,
        "read path"
    );
    // Streaming follows arrival order, and equals the plain formula in that order.
    assert_eq!(
        bits(&streaming(&base, &plants).unwrap()),
        bits(&naive(&base, &plants))
    );
}

#[test]
fn streaming_reset_starts_a_clean_round_on_the_same_memory() {
    let base = two_tensor([0.5, 1.5, -2.0, 8.0], [0.25, 0.0]);
    let a = two_tensor([0.125, 0.5, -1.0, 2.0], [1.0, -0.5]);
    let b = two_tensor([0.25, -0.75, 3.0, 0.0], [0.5, 0.5]);
    let mut acc = StreamingFedAvg::begin(&base);
    acc.add("a", &a, 3).unwrap();
    let first = acc.average(&base).unwrap();
    assert_eq!(first, canonical(&base, &[("a", 3, &a)]).unwrap());
    acc.begin_plant("p", 1).unwrap();
    acc.add_values("p", "l.b", 0, &[1.0]).unwrap();
    assert!(acc.discard_plant("p", &Unreadable).is_err());
    // The next round: new base, same layout; nothing of the last round (nor the poison) stays.
    acc.reset(&first);
    acc.add("a", &b, 2).unwrap();
    assert_eq!(acc.committed().collect::<Vec<_>>(), [("a", 2)]);
    let second = acc.average(&first).unwrap();
    assert_eq!(
        bits(&second),
        bits(&canonical(&first, &[("a", 2, &b)]).unwrap())
    );
    // A different layout gets a fresh accumulator.
    let small = model(&[("x", vec![3], vec![1.0, 2.0, 3.0])]);
    acc.reset(&small);
    acc.add("z", &small, 1).unwrap();
    assert_eq!(
        acc.finish(&small).unwrap(),
        model(&[("x", vec![3], vec![2.0, 4.0, 6.0])])
    );
}

#[test]
fn compare_average_counts_what_average_would_differ_in() {
    let n = TILE + 77; // more than one tile
    let base = model(&[("w", vec![n], noisy(n, 1)), ("b", vec![3], noisy(3, 2))]);
    let d = model(&[("w", vec![n], noisy(n, 3)), ("b", vec![3], noisy(3, 4))]);
    let mut acc = StreamingFedAvg::begin(&base);
    assert!(matches!(
        acc.compare_average(&base, &base),
        Err(FedAvgError::ZeroTotalWeight)
    ));
    acc.add("a", &d, 7).unwrap();
    let avg = acc.average(&base).unwrap();
    assert_eq!(acc.compare_average(&base, &avg).unwrap(), (0, 0.0));
    let mut other = avg.clone();
    let w = other.iter_mut().find(|(name, _)| *name == "w").unwrap().1;
    w.data_mut()[TILE + 5] += 0.5;
    w.data_mut()[3] -= 0.25;
    let (differing, max_abs) = acc.compare_average(&base, &other).unwrap();
    assert_eq!(differing, 2);
    assert!((max_abs - 0.5).abs() < 1e-6, "{max_abs}");
    acc.begin_plant("open", 1).unwrap();
    assert!(matches!(
        acc.compare_average(&base, &avg),
        Err(FedAvgError::StillOpen(_))
    ));
}

#[test]
fn the_parts_of_a_canonical_aggregation_are_the_whole_bit_for_bit() {
    let shapes = [
        ("a", 5usize),
        ("b", TILE + 9),
        ("c", 3 * TILE),
        ("d", 1),
        ("e", 700),
    ];
    let model_of = |seed: u64| {
        let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, (n, len))| (*n, vec![*len], noisy(*len, seed * 10 + i as u64)))
            .collect();
        model(&tensors)
    };
    let base = model_of(1);
    let deltas: Vec<ModelState> = (0..6).map(|k| model_of(k + 2)).collect();
    let updates: Vec<PlantUpdate<'_>> = deltas
        .iter()
        .enumerate()
        .map(|(k, d)| PlantUpdate::new(format!("p{k}"), 10 + k as u64, d))
        .collect();
    let whole = aggregate_canonical(&base, &updates).unwrap();
    for parts in 1..=7 {
        let mut all = Vec::new();
        for part in 0..parts {
            all.extend(FedAvg.aggregate_part(&base, &updates, part, parts).unwrap());
        }
        assert_eq!(all.len(), shapes.len(), "{parts} parts");
        let joined = ModelState::from_tensors(all).unwrap();
        assert_eq!(bits(&joined), bits(&whole), "{parts} parts");
    }
    // A bad round is refused by every part alike.
    let short = model(&[("a", vec![5], noisy(5, 1))]);
    let bad = [PlantUpdate::new("x", 1, &short)];
    for part in 0..2 {
        assert!(matches!(
            FedAvg.aggregate_part(&base, &bad, part, 2),
            Err(FedAvgError::MissingTensor { .. })
        ));
    }
}
