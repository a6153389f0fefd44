//! Evaluation of detections against ground truth: per-class AP and mAP at IoU 0.5, COCO
//! mAP@[.5:.95], and the DeepPCB protocol (IoU > 0.33, same class) with precision, recall and
//! F-score at a score threshold; plus PR-curve plots, detections JSON and annotated images.
//!
//! `EvalReport` is the contract with the CLI (`client eval --json`) and the federation;
//! [`evaluate`] fills it. The AP arithmetic lives in [`map`] and matches the DeepPCB baseline
//! script (VOC all-point AP, IoU strictly above the threshold), so numbers are comparable.

pub mod draw;
pub mod export;
pub mod font;
pub mod map;
pub mod onnx;
pub mod onnx_bench;
pub mod onnx_calibration;
pub mod onnx_eval;
pub mod plot;

use std::collections::BTreeMap;

use fedinspect_common::detection::{Annotation, Detection};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;

/// IoU threshold of the DeepPCB protocol (a detection counts if IoU > 0.33, same class).
pub const DEEPPCB_IOU: f64 = 0.33;

/// Everything `client eval --json` prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub map_50: f64,
    pub map_50_95: f64,
    pub map_33: f64,
    pub precision_33: f64,
    pub recall_33: f64,
    pub f1_33: f64,
    /// AP at IoU 0.5 by class name.
    pub per_class: BTreeMap<String, f64>,
    pub images: usize,
    pub seconds: f64,
    /// Score threshold at which precision/recall/F1 were computed.
    pub score_threshold: f64,
}

impl EvalReport {
    /// The human-readable report `client eval` and `client eval-onnx` print: one line of
    /// figures, then AP@0.5 per class, one class a line.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} images in {:.1} s: mAP@0.5 {:.4}, mAP@[.5:.95] {:.4}, DeepPCB mAP@0.33 {:.4}, P/R/F1@0.33 {:.3}/{:.3}/{:.3} (score >= {})",
            self.images,
            self.seconds,
            self.map_50,
            self.map_50_95,
            self.map_33,
            self.precision_33,
            self.recall_33,
            self.f1_33,
            self.score_threshold
        );
        for (class, ap) in &self.per_class {
            out.push_str(&format!("\n  {class:<16} AP@0.5 {ap:.4}"));
        }
        out
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    #[error("got detections for {detections} images but ground truth for {ground_truth}; pass one list per evaluated image, in the same order")]
    LengthMismatch {
        detections: usize,
        ground_truth: usize,
    },
    #[error("no class names given; pass the dataset's class names")]
    NoClasses,
    #[error("image {image}: detection class {class} is out of range for {classes} classes; check that the model was trained on this dataset's classes")]
    DetectionClass {
        image: usize,
        class: u32,
        classes: usize,
    },
    #[error("image {image}: ground-truth class {class} is out of range for {classes} classes; validate the dataset first")]
    GroundTruthClass {
        image: usize,
        class: u32,
        classes: usize,
    },
    #[error("image {image}: detection score {score} is not a finite number; check the detector's output")]
    Score { image: usize, score: f32 },
}

/// Scores `detections[i]` against `ground_truth[i]` (both in original image coordinates) for
/// every image `i`: mAP at IoU 0.5, 0.33 and [.5:.95], AP@0.5 per class, and precision,
/// recall and F1 at IoU > 0.33 over detections scoring at least `score_threshold`.
/// `seconds` is the inference wall time the caller measured; it is copied into the report.
pub fn evaluate(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    class_names: &[String],
    score_threshold: f64,
    seconds: f64,
) -> Result<EvalReport, EvalError> {
    check(detections, ground_truth, class_names.len())?;
    let n = class_names.len();
    let (map_50, ap_50) = map::mean_ap(detections, ground_truth, n, 0.5);
    let (map_33, _) = map::mean_ap(detections, ground_truth, n, DEEPPCB_IOU);
    let counts = map::counts(detections, ground_truth, n, DEEPPCB_IOU, score_threshold);
    Ok(EvalReport {
        map_50,
        map_50_95: map::map_50_95(detections, ground_truth, n),
        map_33,
        precision_33: counts.precision(),
        recall_33: counts.recall(),
        f1_33: counts.f1(),
        per_class: class_names.iter().cloned().zip(ap_50).collect(),
        images: ground_truth.len(),
        seconds,
        score_threshold,
    })
}

/// Orders detections keyed by item id like `dataset.items`; an item with no entry (e.g. one
/// the loader skipped) gets no detections, so its defects count as missed.
pub fn align_detections(
    dataset: &Dataset,
    by_id: impl IntoIterator<Item = (String, Vec<Detection>)>,
) -> Vec<Vec<Detection>> {
    let mut map: BTreeMap<String, Vec<Detection>> = by_id.into_iter().collect();
    dataset
        .items
        .iter()
        .map(|item| map.remove(&item.id).unwrap_or_default())
        .collect()
}

fn check(
    detections: &[Vec<Detection>],
    ground_truth: &[Vec<Annotation>],
    classes: usize,
) -> Result<(), EvalError> {
    if detections.len() != ground_truth.len() {
        return Err(EvalError::LengthMismatch {
            detections: detections.len(),
            ground_truth: ground_truth.len(),
        });
    }
    if classes == 0 {
        return Err(EvalError::NoClasses);
    }
    for (image, (dets, gts)) in detections.iter().zip(ground_truth).enumerate() {
        if let Some(d) = dets.iter().find(|d| d.class as usize >= classes) {
            return Err(EvalError::DetectionClass {
                image,
                class: d.class,
                classes,
            });
        }
        if let Some(d) = dets.iter().find(|d| !d.score.is_finite()) {
            return Err(EvalError::Score {
                image,
                score: d.score,
            });
        }
        if let Some(a) = gts.iter().find(|a| a.class as usize >= classes) {
            return Err(EvalError::GroundTruthClass {
                image,
                class: a.class,
                classes,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_every_figure_and_one_line_per_class() {
        let report = EvalReport {
            map_50: 0.9512,
            map_50_95: 0.6021,
            map_33: 0.9744,
            precision_33: 0.91,
            recall_33: 0.88,
            f1_33: 0.895,
            per_class: [("open".to_string(), 0.93), ("short".to_string(), 0.97)]
                .into_iter()
                .collect(),
            images: 500,
            seconds: 21.5,
            score_threshold: 0.3,
        };
        let text = report.summary();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "500 images in 21.5 s: mAP@0.5 0.9512, mAP@[.5:.95] 0.6021, DeepPCB mAP@0.33 0.9744, P/R/F1@0.33 0.910/0.880/0.895 (score >= 0.3)"
        );
        assert_eq!(
            &lines[1..],
            [
                "  open             AP@0.5 0.9300",
                "  short            AP@0.5 0.9700"
            ]
        );
    }
}
