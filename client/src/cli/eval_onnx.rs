//! `client eval-onnx`: an exported ONNX model (FP32 or INT8 QDQ) run by onnxruntime on the
//! DeepPCB test split and scored like `client eval` (same loader, decoder and mAP), plus the
//! checkpoint and worker helpers that `client export` and `client bench --onnx` share.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tch::Device;

use super::scoring_data::{deeppcb_split, eval_loader};
use crate::data::deeppcb::Split;
use crate::data::{Channels, Preprocess};
use crate::detector::{CheckpointInfo, Detector};
use crate::eval::onnx::{OrtOptions, OrtWorker};
use crate::eval::onnx_eval;

/// Score threshold of precision/recall, as in `client eval`.
const SCORE_THRESHOLD: f64 = 0.3;

#[derive(Debug, Args)]
pub struct EvalOnnxArgs {
    /// The DeepPCB PCBData folder (holding test.txt).
    #[arg(long)]
    data: PathBuf,
    /// The ONNX file to run (`client export` writes model-fp32.onnx and model-int8-qdq.onnx).
    #[arg(long)]
    onnx: PathBuf,
    /// The checkpoint the model was exported from: its preprocessing and class names are used,
    /// and its weights' hash must equal the model's `fedinspect.model_hash`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// A Python with onnxruntime and numpy [default: $FEDINSPECT_PYTHON, else python3].
    #[arg(long)]
    runtime_python: Option<PathBuf>,
    /// onnxruntime intra-op threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Images per onnxruntime call.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Print the report as one JSON object on one line (and nothing else on stdout).
    #[arg(long)]
    json: bool,
    /// Evaluate only the first N test images (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Only the test images of these board groups; default all.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
}

/// The checkpoint's detector (unfolded, on the CPU), its preprocessing and the hash of its
/// weights.
pub fn load_checkpoint(path: &Path) -> Result<(Detector, Preprocess, String)> {
    let (det, info): (Detector, CheckpointInfo) =
        Detector::load_checkpoint_weights(path, Device::Cpu)
            .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    let preprocess = match info.preprocess {
        Some(p) => p,
        None => Preprocess {
            input_size: det.arch().input_size,
            channels: Channels::from_count(det.arch().in_channels as usize)
                .context("the checkpoint's model takes an unsupported number of channels")?,
            clahe: None,
        },
    };
    let hash = det.state()?.content_hash().to_hex();
    Ok((det, preprocess, hash))
}

/// Starts an onnxruntime worker on `model` and checks that it holds `expected_hash`'s weights.
pub fn start_worker(
    model: &Path,
    python: Option<&Path>,
    threads: usize,
    expected_hash: &str,
) -> Result<OrtWorker> {
    let mut options = OrtOptions::from_env(threads);
    if let Some(p) = python {
        options.python = p.to_path_buf();
    }
    let worker = OrtWorker::start(model, &options)
        .with_context(|| format!("cannot run {} in onnxruntime", model.display()))?;
    let found = worker
        .info()
        .metadata
        .get(fedinspect_common::onnx::META_MODEL_HASH);
    if found.map(String::as_str) != Some(expected_hash) {
        bail!(
            "{} holds model {} but the checkpoint's weights hash to {expected_hash}; pass the checkpoint it was exported from",
            model.display(),
            found.map_or("(no fedinspect.model_hash)", String::as_str)
        );
    }
    Ok(worker)
}

pub fn run(a: &EvalOnnxArgs) -> Result<()> {
    let (det, preprocess, hash) = load_checkpoint(&a.checkpoint)?;
    let mut dataset = deeppcb_split(&a.data, Split::Test, &preprocess, &a.groups)?;
    if a.limit > 0 {
        dataset.items.truncate(a.limit);
    }
    if dataset.class_names != det.class_names() {
        bail!(
            "the checkpoint's classes {:?} differ from the dataset's {:?}",
            det.class_names(),
            dataset.class_names
        );
    }
    let mut worker = start_worker(&a.onnx, a.runtime_python.as_deref(), a.threads, &hash)?;
    let loader = eval_loader(dataset, preprocess, a.batch)?;
    let (report, _) = onnx_eval::evaluate(&mut worker, &loader, SCORE_THRESHOLD)?;
    for s in loader.skipped() {
        eprintln!("skipped {}: {}", s.id, s.reason);
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let precision = worker
        .info()
        .metadata
        .get(fedinspect_common::onnx::META_PRECISION)
        .cloned()
        .unwrap_or_default();
    println!(
        "{} ({precision}, onnxruntime {}): {}",
        a.onnx.display(),
        worker.info().onnxruntime,
        report.summary()
    );
    Ok(())
}
