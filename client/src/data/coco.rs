//! The MS COCO detection JSON loader (what CVAT and Label Studio export): `images`,
//! `categories` mapped to contiguous class indices in ascending id order (names kept), and
//! `annotations` whose `bbox` `[x, y, w, h]` becomes corners.
//!
//! `iscrowd` is ignored: a crowd box is used as an ordinary box, because the detector has no
//! notion of ignore regions; the report notes how many there were. Segmentations, keypoints
//! and areas are not read. Problems become findings for
//! [`validate`](super::validate::validate); only an unreadable or malformed file fails.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_common::detection::{Annotation, BBox};
use serde::Deserialize;

use super::validate::{Finding, Issue, Loaded};
use super::{Dataset, Item};

#[derive(Clone, Debug, Default)]
pub struct CocoOptions {
    /// Folder that `file_name`s are relative to; default: the JSON file's folder.
    pub image_root: Option<PathBuf>,
    /// Group of every item; default: the JSON file's stem.
    pub group: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    #[error("cannot read annotation file {path}: {source}; check the path")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("annotation file {path} is empty; export the annotations again in COCO format")]
    Empty { path: PathBuf },
    #[error("annotation file {path} is not COCO detection JSON ({source}); export it again in COCO format")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "annotation file {path} defines category id {id} twice; give every category its own id"
    )]
    DuplicateCategory { path: PathBuf, id: i64 },
    #[error("annotation file {path} defines no categories; export it with its label set")]
    NoCategories { path: PathBuf },
}

#[derive(Deserialize)]
struct RawCoco {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    #[serde(default)]
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: i64,
    file_name: String,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: Option<i64>,
    image_id: i64,
    category_id: i64,
    bbox: Option<Vec<f64>>,
    /// 0/1 in most exports, `true`/`false` in some.
    iscrowd: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawCategory {
    id: i64,
    name: String,
}

/// Loads a COCO detection JSON file.
pub fn load(json: &Path, options: &CocoOptions) -> Result<Loaded, CocoError> {
    let text = fs::read_to_string(json).map_err(|source| CocoError::Read {
        path: json.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Err(CocoError::Empty {
            path: json.to_path_buf(),
        });
    }
    let raw: RawCoco = serde_json::from_str(&text).map_err(|source| CocoError::Parse {
        path: json.to_path_buf(),
        source,
    })?;
    let root = options
        .image_root
        .clone()
        .unwrap_or_else(|| json.parent().map(Path::to_path_buf).unwrap_or_default());
    let group = options.group.clone().unwrap_or_else(|| {
        json.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    convert(raw, json, &root, &group)
}

fn convert(raw: RawCoco, json: &Path, root: &Path, group: &str) -> Result<Loaded, CocoError> {
    let classes = class_map(&raw.categories, json)?;
    let mut b = Builder::from_images(&raw.images, root, group);
    let crowd = b.attach(&raw.annotations, &classes, json);
    let mut notes = Vec::new();
    if crowd > 0 {
        notes.push(format!(
            "{crowd} annotations are marked iscrowd; they are used as ordinary boxes (no ignore regions)"
        ));
    }
    let mut class_names: Vec<(i64, String)> =
        raw.categories.into_iter().map(|c| (c.id, c.name)).collect();
    class_names.sort_by_key(|(id, _)| *id);
    b.findings.sort_by_key(|f| f.item.unwrap_or(usize::MAX));
    Ok(Loaded {
        dataset: Dataset {
            class_names: class_names.into_iter().map(|(_, name)| name).collect(),
            items: b.items,
        },
        findings: b.findings,
        notes,
        declared_sizes: b.declared_sizes,
    })
}

/// Items under construction, and the image id -> item index map annotations are attached by.
struct Builder {
    items: Vec<Item>,
    declared_sizes: Vec<Option<(u32, u32)>>,
    findings: Vec<Finding>,
    by_image: HashMap<i64, usize>,
}

impl Builder {
    /// One item per image entry; a repeated image id is flagged and gets no annotations.
    fn from_images(images: &[RawImage], root: &Path, group: &str) -> Self {
        let mut b = Builder {
            items: Vec::with_capacity(images.len()),
            declared_sizes: Vec::with_capacity(images.len()),
            findings: Vec::new(),
            by_image: HashMap::new(),
        };
        for image in images {
            let index = b.items.len();
            if let Some(&first) = b.by_image.get(&image.id) {
                let first = images[first].file_name.clone();
                b.flag(index, &image.file_name, Issue::DuplicateId { first });
            } else {
                b.by_image.insert(image.id, index);
            }
            b.items.push(Item {
                id: image.file_name.clone(),
                group: group.to_string(),
                image: root.join(&image.file_name),
                template: None,
                annotations: Vec::new(),
            });
            b.declared_sizes.push(image.width.zip(image.height));
        }
        b
    }

    /// Attaches the usable annotations to their items, flagging the rest; returns how many
    /// were crowd boxes.
    fn attach(
        &mut self,
        annotations: &[RawAnnotation],
        classes: &BTreeMap<i64, u32>,
        json: &Path,
    ) -> usize {
        let mut seen_ids = HashSet::new();
        let mut crowd = 0;
        for a in annotations {
            let Some(&index) = self.by_image.get(&a.image_id) else {
                self.findings.push(Finding {
                    item: None,
                    id: json.display().to_string(),
                    issue: Issue::UnknownImage {
                        image_id: a.image_id,
                    },
                });
                continue;
            };
            let id = self.items[index].id.clone();
            if let Some(dup) = a.id.filter(|id| !seen_ids.insert(*id)) {
                self.flag(index, &id, Issue::DuplicateAnnotationId { annotation: dup });
            }
            let Some(&class) = classes.get(&a.category_id) else {
                self.flag(
                    index,
                    &id,
                    Issue::UnknownCategory {
                        category: a.category_id,
                    },
                );
                continue;
            };
            match corners(a.bbox.as_deref()) {
                Ok(bbox) => self.items[index]
                    .annotations
                    .push(Annotation { bbox, class }),
                Err(reason) => {
                    self.flag(
                        index,
                        &id,
                        Issue::BadBbox {
                            annotation: a.id,
                            reason,
                        },
                    );
                    continue;
                }
            }
            if a.iscrowd.as_ref().is_some_and(is_truthy) {
                crowd += 1;
            }
        }
        crowd
    }

    fn flag(&mut self, index: usize, id: &str, issue: Issue) {
        self.findings.push(Finding {
            item: Some(index),
            id: id.to_string(),
            issue,
        });
    }
}

/// Category id -> contiguous class index, in ascending id order.
fn class_map(categories: &[RawCategory], json: &Path) -> Result<BTreeMap<i64, u32>, CocoError> {
    if categories.is_empty() {
        return Err(CocoError::NoCategories {
            path: json.to_path_buf(),
        });
    }
    let mut ids: Vec<i64> = categories.iter().map(|c| c.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(CocoError::DuplicateCategory {
            path: json.to_path_buf(),
            id: w[0],
        });
    }
    Ok(ids.into_iter().zip(0u32..).collect())
}

/// `[x, y, w, h]` -> corners; degenerate sizes are left for validation to report.
fn corners(bbox: Option<&[f64]>) -> Result<BBox, String> {
    match bbox {
        None => Err("no bbox".into()),
        Some(&[x, y, w, h]) if [x, y, w, h].iter().all(|v| v.is_finite()) => Ok(BBox::new(
            x as f32,
            y as f32,
            (x + w) as f32,
            (y + h) as f32,
        )),
        Some(&[_, _, _, _]) => Err("bbox has a non-finite number".into()),
        Some(other) => Err(format!(
            "bbox has {} numbers, expected [x, y, width, height]",
            other.len()
        )),
    }
}

fn is_truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Loaded, CocoError> {
        let raw: RawCoco = serde_json::from_str(json).expect("test json parses");
        convert(raw, Path::new("/data/set.json"), Path::new("/data"), "set")
    }

    #[test]
    fn maps_ids_and_boxes() {
        let loaded = parse(
            r#"{"images":[{"id":7,"file_name":"a.png","width":64,"height":48}],
                "categories":[{"id":5,"name":"scratch"},{"id":2,"name":"dent"}],
                "annotations":[{"id":1,"image_id":7,"category_id":5,"bbox":[1,2,10,20],"iscrowd":1}]}"#,
        )
        .unwrap();
        assert_eq!(loaded.dataset.class_names, vec!["dent", "scratch"]);
        let item = &loaded.dataset.items[0];
        assert_eq!(item.image, Path::new("/data/a.png"));
        assert_eq!(item.annotations[0].class, 1);
        assert_eq!(item.annotations[0].bbox, BBox::new(1.0, 2.0, 11.0, 22.0));
        assert_eq!(loaded.declared_sizes, vec![Some((64, 48))]);
        assert_eq!(loaded.notes.len(), 1);
        assert!(loaded.findings.is_empty());
    }

    #[test]
    fn duplicate_category_is_fatal() {
        let err = parse(r#"{"images":[],"categories":[{"id":1,"name":"a"},{"id":1,"name":"b"}]}"#);
        assert!(matches!(
            err,
            Err(CocoError::DuplicateCategory { id: 1, .. })
        ));
    }

    #[test]
    fn bad_annotations_become_findings() {
        let loaded = parse(
            r#"{"images":[{"id":1,"file_name":"a.png"},{"id":1,"file_name":"b.png"}],
                "categories":[{"id":1,"name":"a"}],
                "annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[0,0,1]},
                               {"id":1,"image_id":1,"category_id":1,"bbox":[0,0,1,1]},
                               {"id":3,"image_id":9,"category_id":1,"bbox":[0,0,1,1]}]}"#,
        )
        .unwrap();
        let issues: Vec<_> = loaded
            .findings
            .iter()
            .map(|f| (f.item, f.issue.clone()))
            .collect();
        assert_eq!(issues.len(), 4, "{issues:?}");
        assert!(matches!(issues[0], (Some(0), Issue::BadBbox { .. })));
        assert!(matches!(
            issues[1],
            (Some(0), Issue::DuplicateAnnotationId { annotation: 1 })
        ));
        assert!(matches!(issues[2], (Some(1), Issue::DuplicateId { .. })));
        assert!(matches!(
            issues[3],
            (None, Issue::UnknownImage { image_id: 9 })
        ));
    }
}
