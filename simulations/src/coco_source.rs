//! A COCO detection JSON as a source of plants' data: each image's group (the first folder of
//! its `file_name`, or a field of its image record) and its most frequent class, as the
//! partitioners need them, and the subset of the file a plant gets (only its images and
//! their annotations, every other key, `categories` included, kept as in the source so class
//! indices agree across plants). The file is checked and its classes mapped by the client's
//! own COCO loader, so a plant reading its subset sees the same classes.

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use fedinspect_client::data::coco::{self, CocoError, CocoOptions};
use fedinspect_common::fsutil;
use serde_json::{Map, Value};

use crate::experiment::GROUP_BY_FOLDER;

/// The group of an image directly in the image root (`group_by = "folder"`).
pub const ROOT_GROUP: &str = ".";

#[derive(Debug, thiserror::Error)]
pub enum CocoSourceError {
    #[error(transparent)]
    Load(#[from] CocoError),
    #[error("{} holds no images; export the COCO file with its images", path.display())]
    NoImages { path: PathBuf },
    #[error("{missing} of the {total} images of {} have no field '{field}' to group them by (first: '{first}'); add it to every image record or set data.group_by = \"folder\"", path.display())]
    NoGroupField {
        path: PathBuf,
        field: String,
        missing: usize,
        total: usize,
        first: String,
    },
    #[error("the categories of the test file {} ({}) differ from those of the training file {} ({}); class indices would not agree: export both files with the same label set", test.display(), test_names.join(", "), train.display(), train_names.join(", "))]
    CategoryMismatch {
        train: PathBuf,
        test: PathBuf,
        train_names: Vec<String>,
        test_names: Vec<String>,
    },
    #[error("cannot write {}: {source}; check that the run folder is writable and the disk has room", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One image of the file, as the partitioners see it.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoImage {
    pub file_name: String,
    pub group: String,
    /// Its most frequent class (an index in the loader's class order; 0 when it has none).
    pub class: usize,
}

/// A COCO file read for partitioning.
pub struct CocoFile {
    pub path: PathBuf,
    /// The file's images, in the file's order.
    pub images: Vec<CocoImage>,
    /// `(category id, name)` in ascending id order: class i is the i-th.
    pub categories: Vec<(i64, String)>,
    /// The file's top level, for writing subsets.
    raw: Map<String, Value>,
}

impl CocoFile {
    /// Reads `path` (images relative to `image_root`), grouping its images by `group_by`:
    /// [`GROUP_BY_FOLDER`] or the name of an image field.
    pub fn read(path: &Path, image_root: &Path, group_by: &str) -> Result<Self, CocoSourceError> {
        let loaded = coco::load(
            path,
            &CocoOptions {
                image_root: Some(image_root.to_path_buf()),
                group: None,
            },
        )?;
        // The loader parsed the same text, so this parse succeeds; the raw value keeps every
        // field the loader does not read, for the plants' subsets.
        let text = fs::read_to_string(path).map_err(|source| CocoError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: Map<String, Value> =
            serde_json::from_str(&text).map_err(|source| CocoError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        let records = array(&raw, "images");
        if records.is_empty() {
            return Err(CocoSourceError::NoImages {
                path: path.to_path_buf(),
            });
        }
        let groups = groups(records, group_by, path)?;
        // The loader keeps one item per image record, in the file's order.
        let images = loaded
            .dataset
            .items
            .iter()
            .zip(groups)
            .map(|(item, group)| CocoImage {
                file_name: item.id.clone(),
                group,
                class: dominant_class(item.annotations.iter().map(|a| a.class as usize)),
            })
            .collect();
        let mut categories: Vec<(i64, String)> = array(&raw, "categories")
            .iter()
            .filter_map(|c| Some((c["id"].as_i64()?, c["name"].as_str()?.to_string())))
            .collect();
        categories.sort_by_key(|(id, _)| *id);
        Ok(Self {
            path: path.to_path_buf(),
            images,
            categories,
            raw,
        })
    }

    /// The class names in class-index order.
    pub fn class_names(&self) -> Vec<String> {
        self.categories.iter().map(|(_, n)| n.clone()).collect()
    }

    pub fn groups(&self) -> Vec<String> {
        self.images.iter().map(|i| i.group.clone()).collect()
    }

    pub fn classes(&self) -> Vec<usize> {
        self.images.iter().map(|i| i.class).collect()
    }

    /// Writes the file with only the images at `indices` (and their annotations) to `dest`,
    /// atomically; every other key as in the source.
    pub fn write_subset(&self, indices: &[usize], dest: &Path) -> Result<(), CocoSourceError> {
        let records = array(&self.raw, "images");
        let mut wanted = vec![false; records.len()];
        for &i in indices {
            wanted[i] = true;
        }
        let images: Vec<Value> = records
            .iter()
            .zip(&wanted)
            .filter(|(_, &w)| w)
            .map(|(r, _)| r.clone())
            .collect();
        let ids: HashSet<i64> = images.iter().filter_map(|r| r["id"].as_i64()).collect();
        let annotations: Vec<Value> = array(&self.raw, "annotations")
            .iter()
            .filter(|a| a["image_id"].as_i64().is_some_and(|id| ids.contains(&id)))
            .cloned()
            .collect();
        let mut out = self.raw.clone();
        out.insert("images".into(), Value::Array(images));
        out.insert("annotations".into(), Value::Array(annotations));
        let bytes = serde_json::to_vec(&out).expect("a JSON value serialises");
        fsutil::write_bytes_atomic(dest, &bytes).map_err(|source| CocoSourceError::Write {
            path: dest.to_path_buf(),
            source,
        })
    }
}

/// Refuses a test file whose categories (ids and names) are not the training file's.
pub fn check_same_categories(train: &CocoFile, test: &CocoFile) -> Result<(), CocoSourceError> {
    if train.categories == test.categories {
        return Ok(());
    }
    let names = |f: &CocoFile| {
        f.categories
            .iter()
            .map(|(id, n)| format!("{id}:{n}"))
            .collect()
    };
    Err(CocoSourceError::CategoryMismatch {
        train: train.path.clone(),
        test: test.path.clone(),
        train_names: names(train),
        test_names: names(test),
    })
}

/// The group of each image record.
fn groups(records: &[Value], group_by: &str, path: &Path) -> Result<Vec<String>, CocoSourceError> {
    if group_by == GROUP_BY_FOLDER {
        return Ok(records
            .iter()
            .map(|r| folder_group(r["file_name"].as_str().unwrap_or_default()))
            .collect());
    }
    let field = |r: &Value| match &r[group_by] {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let missing: Vec<&Value> = records.iter().filter(|r| field(r).is_none()).collect();
    if let Some(first) = missing.first() {
        return Err(CocoSourceError::NoGroupField {
            path: path.to_path_buf(),
            field: group_by.to_string(),
            missing: missing.len(),
            total: records.len(),
            first: first["file_name"].as_str().unwrap_or("?").to_string(),
        });
    }
    Ok(records.iter().filter_map(field).collect())
}

/// The first folder of `file_name`; [`ROOT_GROUP`] for an image directly in the root.
pub fn folder_group(file_name: &str) -> String {
    let mut parts = Path::new(file_name).components().filter_map(|c| match c {
        Component::Normal(s) => Some(s),
        _ => None,
    });
    match (parts.next(), parts.next()) {
        (Some(first), Some(_)) => first.to_string_lossy().into_owned(),
        _ => ROOT_GROUP.to_string(),
    }
}

/// The most frequent class (the lowest on a tie); 0 for an image without annotations.
fn dominant_class(classes: impl Iterator<Item = usize>) -> usize {
    let mut counts: Vec<usize> = Vec::new();
    for c in classes {
        if counts.len() <= c {
            counts.resize(c + 1, 0);
        }
        counts[c] += 1;
    }
    (0..counts.len())
        .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
        .unwrap_or(0)
}

fn array<'a>(raw: &'a Map<String, Value>, key: &str) -> &'a [Value] {
    raw.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_groups() {
        assert_eq!(folder_group("line-a/img1.png"), "line-a");
        assert_eq!(folder_group("./line-a/sub/img1.png"), "line-a");
        assert_eq!(folder_group("img1.png"), ROOT_GROUP);
    }

    #[test]
    fn dominant_class_prefers_the_most_frequent_then_the_lowest() {
        assert_eq!(dominant_class([1, 2, 2].into_iter()), 2);
        assert_eq!(dominant_class([2, 1].into_iter()), 1);
        assert_eq!(dominant_class(std::iter::empty()), 0);
    }
}
