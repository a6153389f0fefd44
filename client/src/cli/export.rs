//! `client export`: a checkpoint's ONNX files, as bundles carry them: model-fp32.onnx
//! (BatchNorm folded) and, with `--int8`, the activation ranges measured on training images
//! (calibration-ranges.json) and model-int8-qdq.onnx; prints each file's export time and size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use fedinspect_common::fsutil;
use fedinspect_common::onnx::{self, ActivationRanges, ExportOptions};
use fedinspect_common::ModelState;

use super::eval_onnx::load_checkpoint;
use super::scoring_data::{deeppcb_split, eval_loader};
use crate::data::deeppcb::Split;
use crate::data::{Dataset, Preprocess};
use crate::detector::Detector;
use crate::eval::onnx_calibration::{self, RangeMethod};

pub const FP32_FILE: &str = "model-fp32.onnx";
pub const INT8_FILE: &str = "model-int8-qdq.onnx";
pub const RANGES_FILE: &str = "calibration-ranges.json";

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Folder to write the files to (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    int8: Int8Args,
}

/// The INT8 options, shared with `client bench --onnx`.
#[derive(Clone, Debug, Args)]
pub struct Int8Args {
    /// Also calibrate and write the INT8 QDQ model (needs --data).
    #[arg(long)]
    pub int8: bool,
    /// The DeepPCB PCBData folder whose training split (trainval.txt) calibrates.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Training images measured, spread evenly over trainval.txt.
    #[arg(long, default_value_t = 64)]
    pub calibration_images: usize,
    /// How ranges are taken: minmax (what plants send) or percentile:P (e.g. 99.99).
    #[arg(long, default_value = "minmax")]
    pub ranges: RangeMethod,
}

/// One written file.
#[derive(Clone, Debug)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    /// Building the bytes and writing them (fsynced).
    pub seconds: f64,
}

/// What [`export_models`] did.
#[derive(Clone, Debug)]
pub struct Exported {
    pub fp32: Written,
    /// Calibration images and seconds, then the INT8 file.
    pub int8: Option<(usize, f64, Written)>,
}

pub fn run(a: &ExportArgs) -> Result<()> {
    let (det, preprocess, _) = load_checkpoint(&a.checkpoint)?;
    let done = export_models(&det, &preprocess, &a.int8, &a.out)?;
    print_exported(&done);
    Ok(())
}

pub fn print_exported(done: &Exported) {
    let line = |w: &Written| {
        println!(
            "{}: {} bytes ({:.2} MiB), exported in {:.3} s",
            w.path.display(),
            w.bytes,
            w.bytes as f64 / (1024.0 * 1024.0),
            w.seconds
        )
    };
    line(&done.fp32);
    if let Some((images, seconds, w)) = &done.int8 {
        println!("calibration: {images} training images in {seconds:.1} s");
        line(w);
    }
}

/// Writes the FP32 model (and with `int8.int8` the ranges and the INT8 model) of `det` into
/// `out`.
pub fn export_models(
    det: &Detector,
    preprocess: &Preprocess,
    int8: &Int8Args,
    out: &Path,
) -> Result<Exported> {
    if int8.int8 && int8.data.is_none() {
        bail!("--int8 calibrates on training images: pass --data <DeepPCB PCBData folder>");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let state = det.state()?;
    let options = ExportOptions::for_arch(det.arch());
    let fp32 = write_timed(&out.join(FP32_FILE), || {
        Ok(onnx::export(det.arch(), &state, &options)?)
    })?;
    let Some(data) = int8.data.as_deref().filter(|_| int8.int8) else {
        return Ok(Exported { fp32, int8: None });
    };
    let started = Instant::now();
    let dataset = spread(
        deeppcb_split(data, Split::TrainVal, preprocess, &[])?,
        int8.calibration_images,
    )?;
    let images = dataset.items.len();
    let ranges = calibrate(det, &state, dataset, preprocess, int8.ranges)?;
    let cal_seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&ranges)?;
    fsutil::write_atomic(&out.join(RANGES_FILE), |w| w.write_all(&json))?;
    let written = write_timed(&out.join(INT8_FILE), || {
        Ok(onnx::export_qdq(det.arch(), &state, &ranges, &options)?)
    })?;
    Ok(Exported {
        fp32,
        int8: Some((images, cal_seconds, written)),
    })
}

fn calibrate(
    det: &Detector,
    state: &ModelState,
    dataset: Dataset,
    preprocess: &Preprocess,
    method: RangeMethod,
) -> Result<ActivationRanges> {
    let batch = 4;
    let batches = dataset.items.len().div_ceil(batch);
    let loader = eval_loader(dataset, preprocess.clone(), batch)?;
    let ranges = onnx_calibration::measure(det, state, &loader, batches, method)?;
    if let Some(s) = loader.skipped().first() {
        bail!("calibration image {} cannot be read: {}", s.id, s.reason);
    }
    Ok(ranges)
}

/// `n` items of `dataset` spread evenly over its list (trainval.txt is ordered by board group,
/// so the first `n` would all come from one or two boards).
fn spread(mut dataset: Dataset, n: usize) -> Result<Dataset> {
    let total = dataset.items.len();
    if n == 0 || total == 0 {
        bail!("--calibration-images {n} of {total} training images: calibrate on at least one");
    }
    let n = n.min(total);
    let items = std::mem::take(&mut dataset.items);
    dataset.items = (0..n).map(|i| items[i * total / n].clone()).collect();
    Ok(dataset)
}

fn write_timed(path: &Path, build: impl FnOnce() -> Result<Vec<u8>>) -> Result<Written> {
    let started = Instant::now();
    let bytes = build()?;
    fsutil::write_atomic(path, |w| w.write_all(&bytes))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Written {
        path: path.to_path_buf(),
        bytes: bytes.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}
