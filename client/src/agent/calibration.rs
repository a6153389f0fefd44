//! Calibration statistics for the INT8 (QDQ) bundle: after training in a round, the plant runs
//! its trained model in eval mode on a few batches of its own training images through
//! `onnx::qdq::calibration_graph` (the detector with every quantised activation as an extra
//! output) and keeps each activation's minimum and maximum. Only these numbers leave the
//! plant (`ReportCalibration`); the coordinator merges the round's contributors' ranges into
//! the QDQ export of the version the round publishes.

use fedinspect_common::onnx::ActivationRanges;
use fedinspect_common::ModelState;

use super::local::LocalError;
use crate::data::Loader;
use crate::detector::{Detector, DetectorError};
use crate::eval::onnx_calibration::{self, CalibrationError, RangeMethod};

/// Batches of training images measured per round (a few suffice for min/max ranges).
pub const CALIBRATION_BATCHES: usize = 4;

/// The min/max ranges of every calibration point of `det`'s graph with weights `state`, over
/// up to `max_batches` evaluation batches of `loader` (`eval::onnx_calibration`, which
/// `client export --int8` uses too). Empty when the loader yields no batch.
pub fn measure(
    det: &Detector,
    state: &ModelState,
    loader: &Loader,
    max_batches: usize,
) -> Result<ActivationRanges, LocalError> {
    match onnx_calibration::measure(det, state, loader, max_batches, RangeMethod::MinMax) {
        Ok(ranges) => Ok(ranges),
        Err(CalibrationError::NoBatch) => Ok(ActivationRanges::new()),
        Err(CalibrationError::Detector(e)) => Err(LocalError::Detector(e)),
        Err(CalibrationError::Tch(e)) => Err(LocalError::Detector(DetectorError::Tch(e))),
        Err(CalibrationError::Graph(e)) => {
            Err(LocalError::Data(format!("the detector's graph: {e}")))
        }
    }
}
