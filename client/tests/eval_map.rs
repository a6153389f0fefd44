//! AP, mAP and precision/recall/F1 on hand-worked cases, and against golden numbers that the
//! DeepPCB baseline's own `mean_ap` computed (`tests/fixtures/data/map_golden.py`).

use fedinspect_client::eval::{self, map, EvalError};
use fedinspect_common::detection::{Annotation, BBox, Detection};
use serde::Deserialize;

fn gt(class: u32, x1: f32, y1: f32, x2: f32, y2: f32) -> Annotation {
    Annotation {
        bbox: BBox::new(x1, y1, x2, y2),
        class,
    }
}

fn det(class: u32, score: f32, x1: f32, y1: f32, x2: f32, y2: f32) -> Detection {
    Detection {
        bbox: BBox::new(x1, y1, x2, y2),
        class,
        score,
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i}")).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// Two images, two classes, three objects.
fn scene() -> Vec<Vec<Annotation>> {
    vec![
        vec![gt(0, 0.0, 0.0, 10.0, 10.0), gt(1, 20.0, 20.0, 40.0, 30.0)],
        vec![gt(0, 5.0, 5.0, 25.0, 25.0)],
    ]
}

fn perfect(gts: &[Vec<Annotation>]) -> Vec<Vec<Detection>> {
    gts.iter()
        .map(|g| {
            g.iter()
                .map(|a| Detection {
                    bbox: a.bbox,
                    class: a.class,
                    score: 0.9,
                })
                .collect()
        })
        .collect()
}

#[test]
fn perfect_detections_score_one_everywhere() {
    let gts = scene();
    let r = eval::evaluate(&perfect(&gts), &gts, &names(2), 0.5, 1.5).unwrap();
    for v in [
        r.map_50,
        r.map_33,
        r.map_50_95,
        r.precision_33,
        r.recall_33,
        r.f1_33,
    ] {
        assert!(close(v, 1.0), "{r:?}");
    }
    assert_eq!(r.per_class["c0"], 1.0);
    assert_eq!((r.images, r.seconds, r.score_threshold), (2, 1.5, 0.5));
}

#[test]
fn no_detections_score_zero() {
    let gts = scene();
    let r = eval::evaluate(&[vec![], vec![]], &gts, &names(2), 0.5, 0.0).unwrap();
    for v in [
        r.map_50,
        r.map_33,
        r.map_50_95,
        r.precision_33,
        r.recall_33,
        r.f1_33,
    ] {
        assert_eq!(v, 0.0);
    }
}

#[test]
fn right_boxes_with_the_wrong_class_score_zero() {
    let gts = scene();
    let mut dets = perfect(&gts);
    dets.iter_mut()
        .flatten()
        .for_each(|d| d.class = 1 - d.class);
    let r = eval::evaluate(&dets, &gts, &names(2), 0.0, 0.0).unwrap();
    assert_eq!(
        (r.map_50, r.map_33, r.precision_33, r.recall_33),
        (0.0, 0.0, 0.0, 0.0)
    );
}

#[test]
fn duplicates_count_as_false_positives() {
    // One class, objects A and B. Detections by score: A (0.9, TP), A again (0.8, FP: A is
    // used), B (0.7, TP). Recall 0.5, 0.5, 1; precision 1, 0.5, 2/3. The envelope is 1 up to
    // recall 0.5 and 2/3 from 0.5 to 1, so AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    let gts = vec![vec![
        gt(0, 0.0, 0.0, 10.0, 10.0),
        gt(0, 50.0, 50.0, 60.0, 60.0),
    ]];
    let dets = vec![vec![
        det(0, 0.9, 0.0, 0.0, 10.0, 10.0),
        det(0, 0.8, 0.0, 0.0, 10.0, 10.0),
        det(0, 0.7, 50.0, 50.0, 60.0, 60.0),
    ]];
    let (m, aps) = map::mean_ap(&dets, &gts, 1, 0.5);
    assert!(close(m, 5.0 / 6.0) && close(aps[0], 5.0 / 6.0), "{m}");
    // At a score threshold of 0: 2 TP, 1 FP, 2 objects.
    let c = map::counts(&dets, &gts, 1, 0.33, 0.0);
    assert_eq!(
        (c.true_positives, c.false_positives, c.positives),
        (2, 1, 2)
    );
    assert!(close(c.precision(), 2.0 / 3.0) && close(c.recall(), 1.0) && close(c.f1(), 0.8));
}

#[test]
fn known_ap_of_one_half_and_three_quarters() {
    let gts = vec![vec![
        gt(0, 0.0, 0.0, 10.0, 10.0),
        gt(0, 50.0, 50.0, 60.0, 60.0),
    ]];
    // One of two objects found, nothing else: recall 0.5 at precision 1, AP = 0.5.
    let half = vec![vec![det(0, 0.9, 0.0, 0.0, 10.0, 10.0)]];
    assert!(close(map::mean_ap(&half, &gts, 1, 0.5).0, 0.5));
    // TP, FP, FP, TP: recall .5 .5 .5 1, precision 1 .5 .33 .5; envelope 1 to recall 0.5,
    // then 0.5: AP = 0.5 * 1 + 0.5 * 0.5 = 0.75.
    let three_quarters = vec![vec![
        det(0, 0.9, 0.0, 0.0, 10.0, 10.0),
        det(0, 0.8, 100.0, 100.0, 110.0, 110.0),
        det(0, 0.7, 200.0, 200.0, 210.0, 210.0),
        det(0, 0.6, 50.0, 50.0, 60.0, 60.0),
    ]];
    assert!(close(map::mean_ap(&three_quarters, &gts, 1, 0.5).0, 0.75));
}

#[test]
fn iou_must_be_strictly_above_the_threshold() {
    // IoU exactly 0.5 (50 / 100): no match at 0.5, a match at 0.33.
    let gts = vec![vec![gt(0, 0.0, 0.0, 10.0, 10.0)]];
    let dets = vec![vec![det(0, 0.9, 0.0, 0.0, 10.0, 5.0)]];
    let r = eval::evaluate(&dets, &gts, &names(1), 0.5, 0.0).unwrap();
    assert_eq!((r.map_50, r.map_33), (0.0, 1.0));
    // IoU exactly 0.8 matches at 0.5, 0.55, ..., 0.75 (6 of the 10 COCO thresholds).
    let dets = vec![vec![det(0, 0.9, 0.0, 0.0, 10.0, 8.0)]];
    assert!(close(map::map_50_95(&dets, &gts, 1), 0.6));
}

#[test]
fn a_used_best_match_makes_a_false_positive() {
    // Objects A and B overlap; both detections overlap A best. The second one is a false
    // positive even though it also overlaps B above the threshold (the VOC / baseline rule).
    let gts = vec![vec![
        gt(0, 0.0, 0.0, 10.0, 10.0),
        gt(0, 0.0, 4.0, 10.0, 14.0),
    ]];
    let dets = vec![vec![
        det(0, 0.9, 0.0, 0.0, 10.0, 10.0),
        det(0, 0.8, 0.0, 1.0, 10.0, 11.0),
    ]];
    let c = map::counts(&dets, &gts, 1, 0.33, 0.0);
    assert_eq!((c.true_positives, c.false_positives), (1, 1));
}

#[test]
fn classes_without_ground_truth_count_as_zero_like_the_baseline() {
    let gts = vec![vec![gt(0, 0.0, 0.0, 10.0, 10.0)]];
    let r = eval::evaluate(&perfect(&gts), &gts, &names(2), 0.5, 0.0).unwrap();
    assert_eq!(r.map_50, 0.5);
    assert_eq!(r.per_class["c1"], 0.0);
}

#[test]
fn score_threshold_only_affects_precision_recall_f1() {
    let gts = vec![vec![
        gt(0, 0.0, 0.0, 10.0, 10.0),
        gt(0, 50.0, 50.0, 60.0, 60.0),
    ]];
    let dets = vec![vec![
        det(0, 0.9, 0.0, 0.0, 10.0, 10.0),
        det(0, 0.2, 50.0, 50.0, 60.0, 60.0),
    ]];
    let r = eval::evaluate(&dets, &gts, &names(1), 0.5, 0.0).unwrap();
    assert_eq!((r.map_33, r.precision_33, r.recall_33), (1.0, 1.0, 0.5));
    assert!(close(r.f1_33, 2.0 / 3.0));
}

#[test]
fn mismatched_inputs_are_errors() {
    let gts = scene();
    let err = eval::evaluate(&[vec![]], &gts, &names(2), 0.5, 0.0).unwrap_err();
    assert_eq!(
        err,
        EvalError::LengthMismatch {
            detections: 1,
            ground_truth: 2
        }
    );
    let bad = vec![vec![det(5, 0.9, 0.0, 0.0, 1.0, 1.0)], vec![]];
    let err = eval::evaluate(&bad, &gts, &names(2), 0.5, 0.0).unwrap_err();
    assert!(matches!(
        err,
        EvalError::DetectionClass {
            image: 0,
            class: 5,
            classes: 2
        }
    ));
    let nan = vec![vec![det(0, f32::NAN, 0.0, 0.0, 1.0, 1.0)], vec![]];
    assert!(matches!(
        eval::evaluate(&nan, &gts, &names(2), 0.5, 0.0),
        Err(EvalError::Score { .. })
    ));
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    num_classes: usize,
    /// `[x1, y1, x2, y2, class]` per object.
    ground_truth: Vec<Vec<[f64; 5]>>,
    /// `[x1, y1, x2, y2, score, class]` per detection.
    detections: Vec<Vec<[f64; 6]>>,
    map_33: f64,
    aps_33: Vec<f64>,
    map_50: f64,
    aps_50: Vec<f64>,
    map_75: f64,
}

#[test]
fn matches_the_baseline_mean_ap_on_golden_cases() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/map_golden.json"
    );
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (i, case) in golden.cases.iter().enumerate() {
        let gts: Vec<Vec<Annotation>> = case
            .ground_truth
            .iter()
            .map(|g| {
                g.iter()
                    .map(|r| {
                        gt(
                            r[4] as u32,
                            r[0] as f32,
                            r[1] as f32,
                            r[2] as f32,
                            r[3] as f32,
                        )
                    })
                    .collect()
            })
            .collect();
        let dets: Vec<Vec<Detection>> = case
            .detections
            .iter()
            .map(|d| {
                d.iter()
                    .map(|r| {
                        det(
                            r[5] as u32,
                            r[4] as f32,
                            r[0] as f32,
                            r[1] as f32,
                            r[2] as f32,
                            r[3] as f32,
                        )
                    })
                    .collect()
            })
            .collect();
        let n = case.num_classes;
        let (m33, aps33) = map::mean_ap(&dets, &gts, n, 0.33);
        let (m50, aps50) = map::mean_ap(&dets, &gts, n, 0.5);
        let (m75, _) = map::mean_ap(&dets, &gts, n, 0.75);
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            near(m33, case.map_33) && near(m50, case.map_50) && near(m75, case.map_75),
            "case {i}"
        );
        assert!(
            aps33.iter().zip(&case.aps_33).all(|(a, b)| near(*a, *b)),
            "case {i}: {aps33:?}"
        );
        assert!(
            aps50.iter().zip(&case.aps_50).all(|(a, b)| near(*a, *b)),
            "case {i}: {aps50:?}"
        );
    }
}
