//! The data every scoring command reads: a DeepPCB split, validated and optionally cut to some
//! board groups, and its letterboxed, unaugmented loader. `client eval`, `eval-onnx`, `export`
//! (calibration and the parity check) and `bench --onnx` take both from here, so they score the
//! same images the same way.

use std::path::Path;

use anyhow::{bail, Result};

use super::require_data_folder;
use crate::data::deeppcb::{self, DeepPcbOptions, Split};
use crate::data::{
    validate, Augment, Channels, Dataset, Loader, LoaderOptions, OnInvalid, Preprocess,
    ValidateOptions,
};

/// A DeepPCB split, validated (unreadable items skipped), optionally restricted to `groups`.
pub fn deeppcb_split(
    data: &Path,
    split: Split,
    preprocess: &Preprocess,
    groups: &[String],
) -> Result<Dataset> {
    require_data_folder(data)?;
    let loaded = deeppcb::load(
        data,
        split,
        &DeepPcbOptions {
            template: preprocess.channels == Channels::GrayTemplate,
        },
    )?;
    let checked = validate(
        loaded,
        &ValidateOptions {
            channels: preprocess.channels,
            decode: false,
            on_invalid: OnInvalid::Skip,
        },
    )?;
    let dataset = checked.dataset;
    if groups.is_empty() {
        return Ok(dataset);
    }
    let available = dataset.groups();
    let unknown: Vec<&String> = groups.iter().filter(|g| !available.contains(g)).collect();
    if !unknown.is_empty() {
        bail!(
            "--groups {unknown:?}: not board groups of this split; {} has {available:?}",
            split.file_name()
        );
    }
    let wanted: Vec<&str> = groups.iter().map(String::as_str).collect();
    Ok(dataset.with_groups(&wanted))
}

/// Letterboxed, unaugmented batches of `dataset`, in item order.
pub fn eval_loader(dataset: Dataset, preprocess: Preprocess, batch: usize) -> Result<Loader> {
    let input = preprocess.input_size;
    let options = LoaderOptions {
        batch_size: batch.max(1),
        prefetch: 2,
        ..LoaderOptions::default()
    };
    Ok(Loader::new(
        dataset,
        preprocess,
        Augment::none(input),
        options,
    )?)
}
