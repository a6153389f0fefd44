//! Detections and mAP of an ONNX model run by onnxruntime ([`super::onnx::OrtWorker`]) on a
//! loader's images: the same letterboxed batches as `client eval`, the same
//! `detector::decode` and the same [`super::evaluate`], so FP32, INT8 and tch figures differ
//! only by the network's outputs.

use std::time::Instant;

use fedinspect_common::detection::Detection;
use fedinspect_common::onnx::{BOXES_OUTPUT, HEATMAP_OUTPUT};

use super::onnx::{OrtError, OrtWorker};
use super::{EvalError, EvalReport};
use crate::data::{Batch, Loader};
use crate::detector::decode::decode;
use crate::detector::{DecodeParams, DetectorError};

#[derive(Debug, thiserror::Error)]
pub enum OnnxEvalError {
    #[error(transparent)]
    Runtime(#[from] OrtError),
    #[error("decoding onnxruntime's outputs: {0}")]
    Decode(#[from] DetectorError),
    #[error("onnxruntime's output '{name}' cannot become a tensor: {source}")]
    Output { name: String, source: tch::TchError },
    #[error(transparent)]
    Eval(#[from] EvalError),
}

/// Detections per image of `batch` (original image coordinates, best first) from the worker's
/// model.
pub fn detect_batch(
    worker: &mut OrtWorker,
    batch: &Batch,
    params: &DecodeParams,
) -> Result<Vec<Vec<Detection>>, OnnxEvalError> {
    let shape = [batch.batch, batch.channels, batch.height, batch.width];
    let run = worker.run(&batch.images, shape)?;
    let tensor = |name: &str| -> Result<tch::Tensor, OnnxEvalError> {
        run.output(name)?
            .to_tch()
            .map_err(|source| OnnxEvalError::Output {
                name: name.to_string(),
                source,
            })
    };
    let (heatmap, boxes) = (tensor(HEATMAP_OUTPUT)?, tensor(BOXES_OUTPUT)?);
    Ok(decode(&heatmap, &boxes, &batch.letterboxes, params)?)
}

/// Every item of `loader`'s dataset through the worker, in item order (an item the loader
/// could not read gets no detections), scored like `client eval` with precision/recall at
/// `score_threshold`; `seconds` in the report is the wall time of the whole pass.
pub fn evaluate(
    worker: &mut OrtWorker,
    loader: &Loader,
    score_threshold: f64,
) -> Result<(EvalReport, Vec<Vec<Detection>>), OnnxEvalError> {
    let params = DecodeParams::default();
    let started = Instant::now();
    let mut by_id = Vec::new();
    for batch in loader.eval_batches() {
        let dets = detect_batch(worker, &batch, &params)?;
        by_id.extend(batch.ids.iter().cloned().zip(dets));
    }
    let seconds = started.elapsed().as_secs_f64();
    let data = loader.dataset();
    let dets = super::align_detections(data, by_id);
    let report = super::evaluate(
        &dets,
        &data.ground_truth(),
        &data.class_names,
        score_threshold,
        seconds,
    )?;
    Ok((report, dets))
}
