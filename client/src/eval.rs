//! Evaluation of detections against ground truth: per-class AP and mAP at IoU 0.5, COCO
//! mAP@[.5:.95], and the DeepPCB protocol (IoU > 0.33, same class) with precision, recall and
//! F-score at a score threshold; plus PR-curve plots, detections JSON and annotated images.
//!
//! `EvalReport` is the contract with the CLI (`client eval --json`) and the federation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
