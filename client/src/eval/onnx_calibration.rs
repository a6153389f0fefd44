//! Activation ranges for the INT8 (QDQ) export: the plant's calibration after each round
//! (`agent::calibration`, min/max) and `client export --int8` (a chosen number of training
//! images, min/max ranges exactly as the plants measure them or, to study the INT8 error,
//! percentile ranges that ignore the rarest extreme values).

use std::str::FromStr;

use fedinspect_common::onnx::{qdq, ActivationRange, ActivationRanges};
use fedinspect_common::ModelState;
use tch::{nn, Kind};

use crate::data::Loader;
use crate::detector::{Detector, DetectorError, GraphModule};
use crate::varstore::load_state_into_var_store;

/// How a calibration point's range is taken from its values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RangeMethod {
    /// The union of every batch's minimum and maximum (what plants send).
    MinMax,
    /// Per batch, the values at this percentile from each end (e.g. 99.99: the 0.01% most
    /// extreme values on each side clip); batches averaged.
    Percentile(f64),
}

impl FromStr for RangeMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "minmax" {
            return Ok(Self::MinMax);
        }
        let p = s
            .strip_prefix("percentile:")
            .and_then(|p| p.parse::<f64>().ok());
        match p {
            Some(p) if p > 50.0 && p <= 100.0 => Ok(Self::Percentile(p)),
            _ => Err(format!(
                "'{s}': use minmax or percentile:P with 50 < P <= 100 (e.g. percentile:99.99)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error("calibration forward pass: {0}")]
    Tch(#[from] tch::TchError),
    #[error("the detector's graph: {0}")]
    Graph(String),
    #[error("no calibration batch was read; give training images the loader can read")]
    NoBatch,
}

/// Ranges of every calibration point of `det`'s graph with weights `state`, over the first
/// `max_batches` evaluation batches of `loader` (images with the plants' eval preprocessing).
pub fn measure(
    det: &Detector,
    state: &ModelState,
    loader: &Loader,
    max_batches: usize,
    method: RangeMethod,
) -> Result<ActivationRanges, CalibrationError> {
    let graph = det
        .arch()
        .graph()
        .map_err(|e| CalibrationError::Graph(e.to_string()))?;
    let cal = qdq::calibration_graph(&graph);
    let mut vs = nn::VarStore::new(det.device());
    let module = GraphModule::new(&vs.root(), &cal)?;
    load_state_into_var_store(state, &mut vs).map_err(DetectorError::from)?;
    // Per point: (sum of lows, sum of highs, batches) for percentiles; min/max otherwise.
    let mut sums: Vec<(f64, f64, usize)> = vec![(0.0, 0.0, 0); cal.outputs.len()];
    let mut ranges = ActivationRanges::new();
    let mut batches = 0;
    for batch in loader.eval_batches().take(max_batches) {
        batches += 1;
        let images = det.images_tensor(&batch)?;
        let outs = tch::no_grad(|| module.forward(&images, false))?;
        let points = cal.outputs.iter().zip(&outs).enumerate();
        for (i, (name, t)) in points.skip(graph.outputs.len()) {
            let (lo, hi) = extent(t, method)?;
            if !(lo.is_finite() && hi.is_finite()) {
                continue;
            }
            match method {
                RangeMethod::MinMax => {
                    let r = ranges.entry(name.clone()).or_insert(ActivationRange {
                        min: lo as f32,
                        max: hi as f32,
                    });
                    r.min = r.min.min(lo as f32);
                    r.max = r.max.max(hi as f32);
                }
                RangeMethod::Percentile(_) => {
                    let s = &mut sums[i];
                    *s = (s.0 + lo, s.1 + hi, s.2 + 1);
                    let n = s.2 as f64;
                    ranges.insert(
                        name.clone(),
                        ActivationRange {
                            min: (s.0 / n) as f32,
                            max: (s.1 / n) as f32,
                        },
                    );
                }
            }
        }
    }
    if batches == 0 {
        return Err(CalibrationError::NoBatch);
    }
    Ok(ranges)
}

/// The low and high ends of `t`'s values under `method`.
fn extent(t: &tch::Tensor, method: RangeMethod) -> Result<(f64, f64), tch::TchError> {
    let flat = t.f_to_kind(Kind::Float)?.f_flatten(0, -1)?;
    let n = flat.size()[0];
    match method {
        RangeMethod::MinMax => Ok((
            flat.f_min()?.f_double_value(&[])?,
            flat.f_max()?.f_double_value(&[])?,
        )),
        RangeMethod::Percentile(p) => {
            // kthvalue is 1-based; k values are clipped from each end.
            let clipped = ((100.0 - p) / 100.0 * n as f64 + 1e-9).floor() as i64;
            let k_lo = (clipped + 1).clamp(1, n);
            let k_hi = (n - clipped).clamp(1, n);
            let (lo, _) = flat.f_kthvalue(k_lo, 0, false)?;
            let (hi, _) = flat.f_kthvalue(k_hi, 0, false)?;
            Ok((lo.f_double_value(&[])?, hi.f_double_value(&[])?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_clips_the_extremes_and_minmax_keeps_them() {
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32 / 1000.0).collect();
        v[0] = -50.0;
        v[999] = 80.0;
        let t = tch::Tensor::from_slice(&v).view([10, 100]);
        assert_eq!(extent(&t, RangeMethod::MinMax).unwrap(), (-50.0, 80.0));
        let (lo, hi) = extent(&t, RangeMethod::Percentile(99.8)).unwrap();
        assert!(
            (lo - 0.002).abs() < 1e-6 && (hi - 0.997).abs() < 1e-6,
            "{lo} {hi}"
        );
    }

    #[test]
    fn range_methods_parse_and_refuse_nonsense() {
        assert_eq!("minmax".parse::<RangeMethod>(), Ok(RangeMethod::MinMax));
        assert_eq!(
            "percentile:99.99".parse::<RangeMethod>(),
            Ok(RangeMethod::Percentile(99.99))
        );
        for bad in ["percentile:30", "percentile:x", "max", "percentile:101"] {
            assert!(bad.parse::<RangeMethod>().is_err(), "{bad}");
        }
    }
}
