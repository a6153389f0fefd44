//! Calibration statistics for the INT8 (QDQ) bundle: after training in a round, the plant runs
//! its trained model in eval mode on a few batches of its own training images through
//! `onnx::qdq::calibration_graph` (the detector with every quantised activation as an extra
//! output) and keeps each activation's minimum and maximum. Only these numbers leave the
//! plant (`ReportCalibration`); the coordinator merges the round's contributors' ranges into
//! the QDQ export of the version the round publishes.

use fedinspect_common::onnx::{qdq, ActivationRange, ActivationRanges};
use fedinspect_common::ModelState;
use tch::nn;

use super::local::LocalError;
use crate::data::Loader;
use crate::detector::{Detector, DetectorError, GraphModule};
use crate::varstore::load_state_into_var_store;

/// Batches of training images measured per round (a few suffice for min/max ranges).
pub const CALIBRATION_BATCHES: usize = 4;

/// The ranges of every calibration point of `det`'s graph with weights `state`, over up to
/// `max_batches` evaluation batches of `loader`. Empty when the loader yields no batch.
pub fn measure(
    det: &Detector,
    state: &ModelState,
    loader: &Loader,
    max_batches: usize,
) -> Result<ActivationRanges, LocalError> {
    let err = |e: tch::TchError| LocalError::Detector(DetectorError::Tch(e));
    let graph = det
        .arch()
        .graph()
        .map_err(|e| LocalError::Data(format!("the detector's graph: {e}")))?;
    let cal = qdq::calibration_graph(&graph);
    let mut vs = nn::VarStore::new(det.device());
    let module = GraphModule::new(&vs.root(), &cal).map_err(err)?;
    load_state_into_var_store(state, &mut vs).map_err(|e| LocalError::Detector(e.into()))?;
    let mut ranges = ActivationRanges::new();
    for batch in loader.eval_batches().take(max_batches) {
        let images = det.images_tensor(&batch)?;
        let outs = tch::no_grad(|| module.forward(&images, false)).map_err(err)?;
        for (name, t) in cal.outputs.iter().zip(&outs).skip(graph.outputs.len()) {
            let (min, max) = (
                t.min().double_value(&[]) as f32,
                t.max().double_value(&[]) as f32,
            );
            if !(min.is_finite() && max.is_finite()) {
                continue;
            }
            ranges
                .entry(name.clone())
                .and_modify(|r: &mut ActivationRange| {
                    r.min = r.min.min(min);
                    r.max = r.max.max(max);
                })
                .or_insert(ActivationRange { min, max });
        }
    }
    Ok(ranges)
}
