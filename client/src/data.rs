//! Datasets a plant trains on: loaders for DeepPCB and COCO detection JSON, validation before
//! training, deterministic augmentation, and a prefetching batch loader.
//!
//! The types below are the contract with the detector (`crate::detector`) and evaluation
//! (`crate::eval`); loaders and augmentation live in submodules. The usual sequence is
//! [`deeppcb::load`] or [`coco::load`], then [`validate::validate`], then
//! [`loader::Loader::new`] and [`loader::Loader::train_epoch`] /
//! [`loader::Loader::eval_batches`].

pub mod augment;
pub mod clahe;
pub mod coco;
pub mod deeppcb;
pub mod geometry;
pub mod loader;
pub mod planes;
pub mod validate;

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedinspect_common::detection::{Annotation, Letterbox};

pub use augment::{Augment, Channels, Preprocess};
pub use loader::{Batches, Loader, LoaderOptions};
pub use validate::{validate, Loaded, OnInvalid, ValidateOptions, Validated, ValidationReport};

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
///
/// Normalisation is `pixel / 255`, so values lie in `[0, 1]`; no mean or std is subtracted.
/// Evaluation batches map exactly through `letterboxes`. Training batches are crops: their
/// letterbox includes the crop offset as a negative pad, which is exact only when the sample
/// was not flipped or rotated, so use it for bookkeeping, not for mapping training boxes back.
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

impl Dataset {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Distinct groups, sorted.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.items.iter().map(|i| i.group.clone()).collect();
        groups.sort();
        groups.dedup();
        groups
    }

    /// One dataset per group (a natural non-IID split into plants), class names shared and
    /// item order kept.
    pub fn split_by_group(&self) -> BTreeMap<String, Dataset> {
        let mut out: BTreeMap<String, Dataset> = BTreeMap::new();
        for item in &self.items {
            out.entry(item.group.clone())
                .or_insert_with(|| Dataset {
                    class_names: self.class_names.clone(),
                    items: Vec::new(),
                })
                .items
                .push(item.clone());
        }
        out
    }

    /// The items whose group is one of `groups`, in their original order.
    pub fn with_groups(&self, groups: &[&str]) -> Dataset {
        Dataset {
            class_names: self.class_names.clone(),
            items: self
                .items
                .iter()
                .filter(|i| groups.contains(&i.group.as_str()))
                .cloned()
                .collect(),
        }
    }

    /// Ground truth per item, in item order, as evaluation wants it.
    pub fn ground_truth(&self) -> Vec<Vec<Annotation>> {
        self.items.iter().map(|i| i.annotations.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, group: &str) -> Item {
        Item {
            id: id.into(),
            group: group.into(),
            image: PathBuf::from(id),
            template: None,
            annotations: Vec::new(),
        }
    }

    #[test]
    fn groups_split_and_filter() {
        let ds = Dataset {
            class_names: vec!["a".into()],
            items: vec![item("1", "g2"), item("2", "g1"), item("3", "g2")],
        };
        assert_eq!(ds.groups(), vec!["g1", "g2"]);
        let split = ds.split_by_group();
        assert_eq!(split["g2"].items.len(), 2);
        assert_eq!(split["g2"].items[1].id, "3");
        assert_eq!(ds.with_groups(&["g1"]).items[0].id, "2");
        assert_eq!(split["g1"].class_names, ds.class_names);
    }
}
