//! The COCO data folder of `simulate run`: what each plant (and the global and unseen test
//! sets) of a COCO source is given, and how the rest of the simulation (the plant's
//! `plant.toml` in [`crate::site`], the evaluation, the baselines) recognises and reads one.
//! It exists so that a prepared folder says by itself how to read it, as a DeepPCB-layout
//! folder does with its `trainval.txt`: everything else passes a folder's path only.
//!
//! ```text
//! <folder>/train.json   COCO detection JSON: the training images (the source's categories)
//! <folder>/test.json    COCO detection JSON: the test images
//! <folder>/images    -> the source's image root (the JSONs' file_names are relative to it)
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_client::config::DataSource;
use fedinspect_client::data::coco::{self, CocoError, CocoOptions};
use fedinspect_client::data::validate::Loaded;
use fedinspect_client::data::Channels;

/// The training images of a folder.
pub const TRAIN_JSON: &str = "train.json";
/// The test images of a folder.
pub const TEST_JSON: &str = "test.json";
/// The link to the source's image root.
pub const IMAGES_LINK: &str = "images";
/// The input of a COCO plant's detector: the client's default for COCO data (RGB).
pub const CHANNELS: Channels = Channels::Rgb;
/// [`CHANNELS`] as `plant.toml`'s `data.channels` names it.
pub const CHANNELS_NAME: &str = "rgb";

/// Whether `root` is a COCO data folder (rather than a DeepPCB-layout one).
pub fn is_coco_folder(root: &Path) -> bool {
    root.join(TRAIN_JSON).is_file() && !root.join("trainval.txt").exists()
}

/// The folder the JSONs' `file_name`s are relative to: where the `images` link points.
pub fn image_root(root: &Path) -> PathBuf {
    let link = root.join(IMAGES_LINK);
    fs::canonicalize(&link).unwrap_or(link)
}

/// The client's data source for the folder's training images (what `plant.toml` names).
pub fn train_source(root: &Path) -> DataSource {
    DataSource::Coco {
        json: root.join(TRAIN_JSON),
        images: Some(image_root(root)),
    }
}

/// `root`'s `file` (`train.json` or `test.json`) read by the client's COCO loader, every
/// item in group `group`.
pub fn load(root: &Path, file: &str, group: &str) -> Result<Loaded, CocoError> {
    coco::load(
        &root.join(file),
        &CocoOptions {
            image_root: Some(image_root(root)),
            group: Some(group.to_string()),
        },
    )
}
