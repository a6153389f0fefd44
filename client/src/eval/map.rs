//! Average precision exactly as the DeepPCB baseline's `mean_ap` computes it: per class,
//! detections sorted by descending score (ties keep image then detection order), each matched
//! greedily to the ground truth of its image and class with the highest IoU, a match counting
//! only if that IoU is strictly greater than the threshold and the ground truth is still
//! unused; then VOC all-point interpolation of the precision/recall curve.
//!
//! The mean runs over every class of the dataset, including classes with no ground truth
//! (their AP is 0), as the baseline does. IoU is computed in f64 from the f32 corners, like
//! the Python floats the baseline uses.

use fedinspect_common::detection::{Annotation, BBox, Detection};
use serde::{Deserialize, Serialize};

/// The ten IoU thresholds of COCO's mAP@[.5:.95].
pub const COCO_THRESHOLDS: [f64; 10] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95];

/// One class's precision/recall curve: point `k` is after the `k + 1` highest-scoring
/// detections.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrCurve {
    pub class: u32,
    pub iou_threshold: f64,
    pub scores: Vec<f64>,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub ap: f64,
    /// Ground-truth boxes of this class.
    pub positives: usize,
}

/// Matching totals over all classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counts {
    pub true_positives: usize,
    pub false_positives: usize,
    pub positives: usize,
}

/// Intersection over union in f64, with the baseline's unclamped areas.
pub fn iou(a: &BBox, b: &BBox) -> f64 {
    let (a, b) = (corners(a), corners(b));
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy matching of one class: `(score, is_true_positive)` in descending score order, and
/// the number of ground-truth boxes. Detections below `min_score` are ignored.
pub fn match_class(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    class: u32,
    iou_threshold: f64,
    min_score: f64,
) -> (Vec<(f64, bool)>, usize) {
    let mut dets: Vec<(f64, usize, &BBox)> = detections
        .iter()
        .enumerate()
        .flat_map(|(i, ds)| ds.iter().map(move |d| (i, d)))
        .filter(|(_, d)| d.class == class && f64::from(d.score) >= min_score)
        .map(|(i, d)| (f64::from(d.score), i, &d.bbox))
        .collect();
    // Stable, like Python's sorted(): equal scores keep image, then detection, order.
    dets.sort_by(|a, b| b.0.total_cmp(&a.0));
    let gts: Vec<Vec<&BBox>> = ground_truth
        .iter()
        .map(|g| {
            g.iter()
                .filter(|a| a.class == class)
                .map(|a| &a.bbox)
                .collect()
        })
        .collect();
    let positives = gts.iter().map(Vec::len).sum();
    let mut used: Vec<Vec<bool>> = gts.iter().map(|g| vec![false; g.len()]).collect();
    let empty = Vec::new();
    let matched = dets
        .into_iter()
        .map(|(score, image, bbox)| {
            let candidates = gts.get(image).unwrap_or(&empty);
            let (mut best, mut best_j) = (0.0, None);
            for (j, g) in candidates.iter().enumerate() {
                let o = iou(bbox, g);
                if o > best {
                    (best, best_j) = (o, Some(j));
                }
            }
            let hit = match best_j {
                Some(j) if best > iou_threshold && !used[image][j] => {
                    used[image][j] = true;
                    true
                }
                _ => false,
            };
            (score, hit)
        })
        .collect();
    (matched, positives)
}

/// The precision/recall curve and AP of one class.
pub fn class_curve(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    class: u32,
    iou_threshold: f64,
) -> PrCurve {
    let (matched, positives) = match_class(
        detections,
        ground_truth,
        class,
        iou_threshold,
        f64::NEG_INFINITY,
    );
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut curve = PrCurve {
        class,
        iou_threshold,
        scores: Vec::with_capacity(matched.len()),
        precision: Vec::with_capacity(matched.len()),
        recall: Vec::with_capacity(matched.len()),
        ap: 0.0,
        positives,
    };
    for (score, hit) in matched {
        if hit {
            tp += 1;
        } else {
            fp += 1;
        }
        curve.scores.push(score);
        curve.recall.push(tp as f64 / positives.max(1) as f64);
        curve
            .precision
            .push(tp as f64 / ((tp + fp) as f64).max(1e-9));
    }
    curve.ap = average_precision(&curve.recall, &curve.precision);
    curve
}

/// VOC all-point interpolated AP: the area under the precision envelope (precision made
/// non-increasing from the right), sentinels `(0, 0)` before and `(1, 0)` after.
pub fn average_precision(recall: &[f64], precision: &[f64]) -> f64 {
    let mrec: Vec<f64> = std::iter::once(0.0)
        .chain(recall.iter().copied())
        .chain([1.0])
        .collect();
    let mut mpre: Vec<f64> = std::iter::once(0.0)
        .chain(precision.iter().copied())
        .chain([0.0])
        .collect();
    for k in (0..mpre.len() - 1).rev() {
        mpre[k] = mpre[k].max(mpre[k + 1]);
    }
    (0..mrec.len() - 1)
        .filter(|&i| mrec[i + 1] != mrec[i])
        .map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1])
        .sum()
}

/// Per-class curves for classes `0..num_classes`.
pub fn curves(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    num_classes: usize,
    iou_threshold: f64,
) -> Vec<PrCurve> {
    (0..num_classes as u32)
        .map(|c| class_curve(detections, ground_truth, c, iou_threshold))
        .collect()
}

/// Mean AP over `num_classes` classes and the per-class APs.
pub fn mean_ap(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    num_classes: usize,
    iou_threshold: f64,
) -> (f64, Vec<f64>) {
    let aps: Vec<f64> = curves(detections, ground_truth, num_classes, iou_threshold)
        .into_iter()
        .map(|c| c.ap)
        .collect();
    (mean(&aps), aps)
}

/// COCO-style mAP@[.5:.95]: the mean of [`mean_ap`] over [`COCO_THRESHOLDS`] (with this
/// module's VOC interpolation and strict IoU, not pycocotools' 101-point one).
pub fn map_50_95(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    num_classes: usize,
) -> f64 {
    let maps: Vec<f64> = COCO_THRESHOLDS
        .iter()
        .map(|&t| mean_ap(detections, ground_truth, num_classes, t).0)
        .collect();
    mean(&maps)
}

/// True/false positives among detections scoring at least `min_score`, matched per class at
/// IoU strictly above `iou_threshold` (the DeepPCB F-score protocol uses 0.33).
pub fn counts(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    num_classes: usize,
    iou_threshold: f64,
    min_score: f64,
) -> Counts {
    let mut total = Counts::default();
    for c in 0..num_classes as u32 {
        let (matched, positives) =
            match_class(detections, ground_truth, c, iou_threshold, min_score);
        let tp = matched.iter().filter(|(_, hit)| *hit).count();
        total.true_positives += tp;
        total.false_positives += matched.len() - tp;
        total.positives += positives;
    }
    total
}

impl Counts {
    /// TP / (TP + FP); 0 when there are no detections.
    pub fn precision(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        )
    }

    /// TP / ground truth; 0 when there is no ground truth.
    pub fn recall(&self) -> f64 {
        ratio(self.true_positives, self.positives)
    }

    /// Harmonic mean of precision and recall; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn corners(b: &BBox) -> [f64; 4] {
    [b.x1, b.y1, b.x2, b.y2].map(f64::from)
}
