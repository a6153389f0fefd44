//! Datasets a plant trains on: loaders for DeepPCB and COCO detection JSON, validation before
//! training, deterministic augmentation, and a prefetching batch loader.
//!
//! The types below are the contract with the detector (`crate::detector`) and evaluation
//! (`crate::eval`); loaders and augmentation live in submodules.

use std::path::PathBuf;

use fedinspect_common::detection::{Annotation, Letterbox};

/// One labelled image (and, for reference-based inspection, its aligned defect-free template).
#[derive(Clone, Debug)]
pub struct Item {
    /// Stable id, e.g. `group00041/00041/00041000` for DeepPCB.
    pub id: String,
    /// Board group / source the image belongs to (DeepPCB: `group00041`), for non-IID splits.
    pub group: String,
    pub image: PathBuf,
    pub template: Option<PathBuf>,
    /// Ground truth in original image pixel coordinates; class is an index into `class_names`.
    pub annotations: Vec<Annotation>,
}

/// A labelled dataset: items plus class names (index = class id).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub class_names: Vec<String>,
    pub items: Vec<Item>,
}

/// One batch ready for the network: `images` is `[batch, channels, size, size]` row-major f32,
/// normalised; `annotations[i]` are in network input coordinates; `letterboxes[i]` maps them
/// back to item `ids[i]`'s original coordinates.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub annotations: Vec<Vec<Annotation>>,
    pub letterboxes: Vec<Letterbox>,
    pub ids: Vec<String>,
}
