//! Each plant's data for one run of a COCO source (`[data] source = "coco"`): the training
//! JSON (`data.path`) divided among the plants by the same partitioners as DeepPCB
//! ([`plant_data::partition_items`]: by group, Dirichlet over each image's most frequent
//! class, or IID), and the test JSON (`data.test_path`, the global test set) divided the same
//! way DeepPCB's `test.txt` is. Each plant gets a COCO folder ([`coco_layout`]) with its own
//! subsets of the two files and a link to the source's image root, so no image is copied.
//!
//! ```text
//! RUN/plant-data/source/    train.json, test.json -> the source files; images -> image root
//! RUN/plant-data/<plant>/   train.json, test.json (the plant's images only); images -> image root
//! RUN/plant-data/unseen/    test.json of the test images of groups no plant trains on
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::coco_layout::{self, IMAGES_LINK, TEST_JSON, TRAIN_JSON};
use crate::coco_source::{check_same_categories, CocoFile};
use crate::experiment::{Settings, SplitKind, GROUP_BY_FOLDER};
use crate::partition;
use crate::plant_data::{partition_items, PlantFolder, PreparedData};

/// Prepares the plants' COCO folders under `run_dir/plant-data`.
pub fn prepare(s: &Settings, run_dir: &Path) -> Result<PreparedData> {
    let d = &s.data;
    let train_path = existing_file(d.path.as_deref(), "path")?;
    let test_path = existing_file(d.test_path.as_deref(), "test_path")?;
    let image_root = match &d.images {
        Some(dir) => dir.clone(),
        None => train_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let image_root = fs::canonicalize(&image_root)
        .ok()
        .filter(|p| p.is_dir())
        .with_context(|| {
            format!(
                "data.images: {} is not a folder; set it to the folder the file_names of {} are relative to",
                image_root.display(),
                train_path.display()
            )
        })?;
    let train = CocoFile::read(&train_path, &image_root, &d.group_by)
        .context("data.path: cannot use the training COCO file")?;
    let test = CocoFile::read(&test_path, &image_root, &d.group_by)
        .context("data.test_path: cannot use the test COCO file")?;
    check_same_categories(&train, &test)?;
    let (train_groups, classes) = (train.groups(), train.classes());
    let (train_parts, test_parts) = partition_items(
        s,
        (&train_groups, &classes),
        (&test.groups(), &test.classes()),
    )
    .with_context(|| grouping_hint(s, &train_groups))?;
    let class_skew = partition::class_skew(&classes, &train_parts);

    let base = run_dir.join("plant-data");
    if base.exists() {
        fs::remove_dir_all(&base)
            .with_context(|| format!("cannot remove {} of an earlier run", base.display()))?;
    }
    let source = base.join("source");
    fs::create_dir_all(&source).with_context(|| format!("cannot create {}", source.display()))?;
    for (name, target) in [
        (TRAIN_JSON, train_path.as_path()),
        (TEST_JSON, test_path.as_path()),
        (IMAGES_LINK, image_root.as_path()),
    ] {
        symlink(target, source.join(name))
            .with_context(|| format!("cannot link {} into {}", name, source.display()))?;
    }

    let width = train_parts.len().to_string().len().max(2);
    let mut folders = Vec::with_capacity(train_parts.len());
    for (p, (tr, te)) in train_parts.iter().zip(&test_parts).enumerate() {
        let id = format!("plant-{:0width$}", p + 1);
        let root = base.join(&id);
        write_folder(&root, &image_root, (&train, tr), (&test, te))?;
        let groups: BTreeSet<&String> = tr.iter().map(|&i| &train.images[i].group).collect();
        folders.push(PlantFolder {
            id,
            root,
            groups: groups.into_iter().cloned().collect(),
            train_images: tr.len(),
            test_images: te.len(),
        });
    }
    let trained: BTreeSet<&String> = train_groups.iter().collect();
    let unseen: Vec<usize> = (0..test.images.len())
        .filter(|&i| !trained.contains(&test.images[i].group))
        .collect();
    let unseen_test = if unseen.is_empty() {
        None
    } else {
        let root = base.join("unseen");
        write_folder(&root, &image_root, (&train, &[]), (&test, &unseen))?;
        Some(root)
    };
    Ok(PreparedData {
        source,
        plants: folders,
        unseen_test,
        class_skew,
        drift: Vec::new(),
        class_names: train.class_names(),
        channels: coco_layout::CHANNELS,
    })
}

/// `path` (the experiment's `data.<key>`) canonicalised, or why it cannot be used.
fn existing_file(path: Option<&Path>, key: &str) -> Result<PathBuf> {
    let path = path.with_context(|| format!("data.{key} is not set; name a COCO JSON file"))?;
    if !path.is_file() {
        bail!(
            "data.{key}: {} is not a file; give the path of a COCO detection JSON",
            path.display()
        );
    }
    Ok(fs::canonicalize(path)?)
}

/// A COCO folder at `root`: the subsets of the training and test files and the image link.
fn write_folder(
    root: &Path,
    image_root: &Path,
    (train, train_items): (&CocoFile, &[usize]),
    (test, test_items): (&CocoFile, &[usize]),
) -> Result<()> {
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    symlink(image_root, root.join(IMAGES_LINK))
        .with_context(|| format!("cannot link the image root into {}", root.display()))?;
    train.write_subset(train_items, &root.join(TRAIN_JSON))?;
    test.write_subset(test_items, &root.join(TEST_JSON))?;
    Ok(())
}

/// What a partition failure means for this source: how its groups were found.
fn grouping_hint(s: &Settings, groups: &[String]) -> String {
    let distinct: BTreeSet<&String> = groups.iter().collect();
    let how = if s.data.group_by == GROUP_BY_FOLDER {
        "the first folder of each file_name (data.group_by = \"folder\")".to_string()
    } else {
        format!("the image field '{}' (data.group_by)", s.data.group_by)
    };
    match s.data.split {
        SplitKind::Group => format!(
            "cannot give {} plants whole groups: the {} images of {} fall in {} group(s) by {how}",
            s.data.plants,
            groups.len(),
            s.data.path.as_deref().unwrap_or(Path::new("?")).display(),
            distinct.len()
        ),
        _ => format!(
            "cannot divide the {} training images among {} plants",
            groups.len(),
            s.data.plants
        ),
    }
}
