//! Inference latency of the tch detector and onnxruntime models on one input, timed in turns
//! (each round runs every contender once, starting with a different one each round) so that
//! load from other processes falls on all of them alike. Figures only; nothing here decides.

use std::time::Instant;

use super::onnx::{OrtError, OrtWorker};
use crate::detector::{Detector, DetectorError};

/// The times of one contender, in milliseconds.
#[derive(Clone, Debug)]
pub struct Latency {
    pub name: String,
    /// tch: the forward pass; onnxruntime: `session.run` inside the worker.
    pub run_ms: Vec<f64>,
    /// onnxruntime only: the whole call from the client (input and outputs through pipes).
    pub round_trip_ms: Option<Vec<f64>>,
}

/// The `q`-quantile (0..=1) of `samples` by the nearest-rank rule; NaN when empty.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (q * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The median (mean of the two middle values for an even count); NaN when empty.
pub fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error(transparent)]
    Tch(#[from] DetectorError),
    #[error(transparent)]
    Runtime(#[from] OrtError),
}

/// `warmup` untimed then `iters` timed rounds; in each, `det` (folded for inference, on the
/// CPU) runs `images` and every worker runs the same values. Results in contender order: tch
/// first, then the workers.
pub fn alternate(
    det: &Detector,
    images: &tch::Tensor,
    workers: &mut [(String, &mut OrtWorker)],
    warmup: usize,
    iters: usize,
) -> Result<Vec<Latency>, LatencyError> {
    let dims = images.size();
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let shape = [shape[0], shape[1], shape[2], shape[3]];
    let numel = images.numel();
    let mut flat = vec![0f32; numel];
    images.copy_data(&mut flat, numel);
    let mut results: Vec<Latency> = std::iter::once(Latency {
        name: "tch".to_string(),
        run_ms: Vec::new(),
        round_trip_ms: None,
    })
    .chain(workers.iter().map(|(name, _)| Latency {
        name: name.clone(),
        run_ms: Vec::new(),
        round_trip_ms: Some(Vec::new()),
    }))
    .collect();
    let contenders = results.len();
    let _guard = tch::no_grad_guard();
    for round in 0..warmup + iters {
        for turn in 0..contenders {
            let who = (round + turn) % contenders;
            let started = Instant::now();
            let run_seconds = if who == 0 {
                det.forward(images, false)?;
                started.elapsed().as_secs_f64()
            } else {
                workers[who - 1].1.run(&flat, shape)?.runtime_seconds
            };
            let total = started.elapsed().as_secs_f64();
            if round < warmup {
                continue;
            }
            let r = &mut results[who];
            r.run_ms.push(run_seconds * 1e3);
            if let Some(rt) = r.round_trip_ms.as_mut() {
                rt.push(total * 1e3);
            }
        }
    }
    Ok(results)
}

/// The table `client bench --onnx` prints: median and p90 per contender and the ratio of each
/// median to tch's.
pub fn table(results: &[Latency]) -> String {
    let base = results.first().map_or(f64::NAN, |r| median(&r.run_ms));
    let mut out = format!(
        "{:<10} {:>5} {:>11} {:>11} {:>9} {:>17}\n",
        "runtime", "runs", "median ms", "p90 ms", "vs tch", "round trip ms"
    );
    for r in results {
        let m = median(&r.run_ms);
        let trip = r
            .round_trip_ms
            .as_ref()
            .map_or("-".to_string(), |t| format!("{:.1}", median(t)));
        out.push_str(&format!(
            "{:<10} {:>5} {:>11.1} {:>11.1} {:>8.2}x {:>17}\n",
            r.name,
            r.run_ms.len(),
            m,
            quantile(&r.run_ms, 0.9),
            m / base,
            trip
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p90_by_nearest_rank() {
        let v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(median(&v), 5.5);
        assert_eq!(quantile(&v, 0.9), 9.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.9), 3.0);
        assert!(median(&[]).is_nan());
    }
}
