//! `client eval` and `client detect`: a checkpoint (or an installed bundle's weights) run on
//! the DeepPCB test split for mAP, or on given images for detections JSON and annotated PNGs.
//! Both fold BatchNorm into the convolutions first (`Detector::fold_batchnorm_for_inference`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedinspect_common::detection::Detection;
use image::{ImageDecoder, ImageReader};
use tch::Device;

use super::scoring_data::{deeppcb_split, eval_loader};
use super::{device, require_data_folder};
use crate::data::deeppcb::Split;
use crate::data::loader::Skipped;
use crate::data::{Channels, Dataset, Item, Preprocess};
use crate::detector::{CheckpointInfo, DecodeParams, Detector};
use crate::eval::{self, export, EvalReport};

/// Score threshold of precision/recall in `eval` and of drawn boxes in `detect`.
const SCORE_THRESHOLD: f64 = 0.3;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The DeepPCB PCBData folder (holding test.txt).
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    checkpoint: PathBuf,
    /// Print the report as one JSON object on one line (and nothing else on stdout).
    #[arg(long)]
    json: bool,
    /// Evaluate only the first N test images (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Only the test images of these board groups (e.g. the four never in trainval.txt:
    /// group12000,group12100,group12300,group90100); default all.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// LibTorch CPU threads (0: LibTorch's default, all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Network input side, a multiple of 32 [default: the checkpoint's].
    #[arg(long)]
    input_size: Option<u32>,
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    bundle: super::bundle::DetectBundle,
    #[arg(long)]
    out: PathBuf,
    /// Boxes scoring below this are not drawn (all are written to the JSON).
    #[arg(long, default_value_t = SCORE_THRESHOLD as f32)]
    min_score: f32,
    /// Network input side, a multiple of 32 [default: the checkpoint's].
    #[arg(long)]
    input_size: Option<u32>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images; with a two-channel model, DeepPCB `*_test.jpg` files next to their
    /// `*_temp.jpg` templates.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// The checkpoint's detector (weights only: inference needs no optimizer state) with BatchNorm
/// folded for inference, and the preprocessing to feed it, at `input_size` when given.
fn load_for_inference(
    path: &Path,
    device: Device,
    input_size: Option<u32>,
) -> Result<(Detector, Preprocess)> {
    let (mut det, info): (Detector, CheckpointInfo) =
        Detector::load_checkpoint_weights(path, device)
            .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    det.fold_batchnorm_for_inference()?;
    let mut preprocess = match info.preprocess {
        Some(p) => p,
        None => Preprocess {
            input_size: det.arch().input_size,
            channels: Channels::from_count(det.arch().in_channels as usize)
                .context("the checkpoint's model takes an unsupported number of channels")?,
            clahe: None,
        },
    };
    if let Some(size) = input_size {
        preprocess.input_size = size;
    }
    Ok((det, preprocess))
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    require_data_folder(&a.data)?;
    if a.threads > 0 {
        tch::set_num_threads(i32::try_from(a.threads)?);
    }
    let (det, preprocess) = load_for_inference(&a.checkpoint, device(&a.device)?, a.input_size)?;
    let mut dataset = deeppcb_split(&a.data, Split::Test, &preprocess, &a.groups)?;
    if a.limit > 0 {
        dataset.items.truncate(a.limit);
    }
    let (report, _, skipped) = evaluate(&det, dataset, preprocess)?;
    for s in &skipped {
        eprintln!("skipped {}: {}", s.id, s.reason);
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}

/// Detections for every item of `dataset`, in item order, their evaluation, and the items that
/// could not be read (their detection lists are empty).
fn evaluate(
    det: &Detector,
    dataset: Dataset,
    preprocess: Preprocess,
) -> Result<(EvalReport, Vec<Vec<Detection>>, Vec<Skipped>)> {
    let loader = eval_loader(dataset, preprocess, 4)?;
    let started = Instant::now();
    let mut by_id = Vec::new();
    for batch in loader.eval_batches() {
        let dets = det.detect(&batch, &DecodeParams::default())?;
        by_id.extend(batch.ids.iter().cloned().zip(dets));
    }
    let seconds = started.elapsed().as_secs_f64();
    let data = loader.dataset();
    let dets = eval::align_detections(data, by_id);
    let report = eval::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        SCORE_THRESHOLD,
        seconds,
    )?;
    Ok((report, dets, loader.skipped()))
}

pub fn detect(a: &DetectArgs) -> Result<()> {
    let checkpoint = super::bundle::detect_checkpoint(a.checkpoint.as_deref(), &a.bundle)?;
    let (det, preprocess) = load_for_inference(&checkpoint, device(&a.device)?, a.input_size)?;
    let mut items = Vec::new();
    let mut ids = BTreeMap::new();
    for image in &a.images {
        let id = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name", image.display()))?;
        if ids.insert(id.clone(), image.clone()).is_some() {
            bail!("two images are named {id}; pass files with distinct names");
        }
        check_channels(image, preprocess.channels)?;
        let template = match preprocess.channels {
            Channels::GrayTemplate => {
                let template = template_of(image)?;
                check_channels(&template, preprocess.channels)?;
                Some(template)
            }
            Channels::Gray | Channels::Rgb => None,
        };
        items.push(Item {
            id,
            group: String::new(),
            image: image.clone(),
            template,
            annotations: Vec::new(),
        });
    }
    let class_names = det.class_names().to_vec();
    let dataset = Dataset {
        class_names: class_names.clone(),
        items,
    };
    let order: Vec<String> = dataset.items.iter().map(|i| i.id.clone()).collect();
    let (_, dets, skipped) = evaluate(&det, dataset, preprocess)?;
    let unread: BTreeMap<&str, &str> = skipped
        .iter()
        .map(|s| (s.id.as_str(), s.reason.as_str()))
        .collect();
    let (order, dets): (Vec<String>, Vec<Vec<Detection>>) = order
        .into_iter()
        .zip(dets)
        .filter(|(id, _)| !unread.contains_key(id.as_str()))
        .unzip();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let file = export::detections_file(&order, &dets, &class_names)?;
    export::write_detections_json(&a.out.join("detections.json"), &file)?;
    for (id, d) in order.iter().zip(&dets) {
        let png = a.out.join(format!("{id}.png"));
        export::save_annotated(&ids[id], &[], d, &class_names, a.min_score, &png)?;
    }
    println!(
        "{} images: {} detections (score >= {}); wrote {}",
        order.len(),
        dets.iter()
            .flatten()
            .filter(|d| d.score >= a.min_score)
            .count(),
        a.min_score,
        a.out.display()
    );
    if !unread.is_empty() {
        let list: Vec<String> = unread
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        bail!(
            "{} of {} images could not be read and are missing from {}: {}",
            unread.len(),
            ids.len(),
            a.out.display(),
            list.join("; ")
        );
    }
    Ok(())
}

/// Refuses a file whose stored colour channels are not what the model reads (a colour photo
/// for a grey model, or a grey image for an RGB one), instead of converting it silently.
fn check_channels(path: &Path, channels: Channels) -> Result<()> {
    let decoder = ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .into_decoder()
        .with_context(|| {
            format!(
                "{} is not an image this build decodes; pass 8-bit jpg or png files",
                path.display()
            )
        })?;
    let color = decoder.color_type();
    let (got, wanted) = (color.channel_count(), channels.count());
    match (color.has_color(), channels) {
        (true, Channels::Gray | Channels::GrayTemplate) => bail!(
            "{}: {got}-channel colour image, but the model reads grayscale images ({wanted} input channels{}); pass grayscale images like the ones it was trained on, or use a model trained on RGB",
            path.display(),
            if channels == Channels::GrayTemplate { ": image + template" } else { "" }
        ),
        (false, Channels::Rgb) => bail!(
            "{}: {got}-channel grayscale image, but the model reads 3-channel RGB images; pass colour images like the ones it was trained on, or use a grayscale model",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// DeepPCB's template of `x_test.jpg`: `x_temp.jpg` in the same folder.
fn template_of(image: &Path) -> Result<PathBuf> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(prefix) = name
        .rsplit_once("_test.")
        .map(|(p, ext)| format!("{p}_temp.{ext}"))
    else {
        bail!(
            "{}: the model compares each image with its defect-free template; pass DeepPCB *_test.jpg files next to their *_temp.jpg",
            image.display()
        );
    };
    let template = image.with_file_name(prefix);
    if !template.is_file() {
        bail!(
            "{}: its template {} does not exist",
            image.display(),
            template.display()
        );
    }
    Ok(template)
}
