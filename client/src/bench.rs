//! `client bench`: how fast the detector trains and infers on this plant's hardware, printed
//! as figures. A plant engineer runs it before joining a federation (is the line PC fast
//! enough?); the project runs it for the benchmarks in docs/benchmarks.md, on the CPU and on a
//! lent GPU.
//!
//! Training: optimizer steps of the real training loop ([`train`]) on fixed synthetic batches
//! (so data loading does not count), after warmup steps. Inference: [`Detector::detect`] on
//! synthetic images, which is what the line runs per image: host-to-device copy, forward
//! (autocast float16 on CUDA), peak decoding and the copy of the detections back; each call's
//! wall time is one sample, so CUDA work is complete when it is read.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use fedinspect_common::arch::ArchConfig;
use serde::Serialize;
use tch::Device;

use crate::detector::synthetic::rectangles;
use crate::detector::{train, DecodeParams, Detector, DetectorError, FixedBatches, Stop};
use crate::detector::{TrainConfig, TrainError};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub arch: ArchConfig,
    pub device: Device,
    /// Training batch size and square crop side.
    pub train_batch: usize,
    pub train_crop: usize,
    /// Timed training steps, after `train_warmup` untimed ones (0: skip training).
    pub train_steps: u64,
    pub train_warmup: u64,
    /// Autocast float16 in training when on CUDA.
    pub mixed_precision: bool,
    /// Square inference input side.
    pub infer_size: usize,
    /// Inference batch sizes, each timed `infer_iters` times after `infer_warmup` calls.
    pub infer_batches: Vec<usize>,
    pub infer_iters: usize,
    pub infer_warmup: usize,
    /// Time inference with BatchNorm folded into the convolutions, as `eval`, `detect` and
    /// installed bundles run it ([`Detector::fold_batchnorm_for_inference`]).
    pub fold_batchnorm: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            arch: ArchConfig::default(),
            device: Device::Cpu,
            train_batch: 8,
            train_crop: 320,
            train_steps: 20,
            train_warmup: 3,
            mixed_precision: true,
            infer_size: 640,
            infer_batches: vec![1, 8],
            infer_iters: 50,
            infer_warmup: 5,
            fold_batchnorm: true,
        }
    }
}

/// Training throughput.
#[derive(Clone, Debug, Serialize)]
pub struct TrainFigures {
    pub batch: usize,
    pub crop: usize,
    pub steps: u64,
    pub seconds: f64,
    pub images_per_sec: f64,
    /// Of the median step, which hides one-off stalls.
    pub median_step_images_per_sec: f64,
    pub mixed_precision: bool,
    pub last_loss: f64,
}

/// Latency of one `detect` call at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct InferFigures {
    pub batch: usize,
    pub size: usize,
    pub calls: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    /// Median call time over the batch size.
    pub median_ms_per_image: f64,
    pub images_per_sec: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub threads: i32,
    pub params: usize,
    pub gmac_per_crop: f64,
    pub train: Option<TrainFigures>,
    pub infer: Vec<InferFigures>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("invalid benchmark options: {0}")]
    Options(String),
}

/// Runs the benchmark, calling `log` with a line per finished part.
pub fn run(opts: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    let stride = 32;
    if opts.train_crop % stride != 0 || opts.infer_size % stride != 0 {
        return Err(BenchError::Options(format!(
            "crop {} and inference size {} must be multiples of {stride}",
            opts.train_crop, opts.infer_size
        )));
    }
    if opts.infer_batches.contains(&0) || opts.train_batch == 0 {
        return Err(BenchError::Options("batch sizes must be at least 1".into()));
    }
    let arch = &opts.arch;
    let graph = arch.graph().map_err(DetectorError::from)?;
    let names: Vec<String> = (0..arch.num_classes).map(|c| format!("class{c}")).collect();
    let mut det = Detector::seeded(arch.clone(), names, opts.device, 0)?;
    let channels = arch.in_channels as usize;
    let classes = arch.num_classes;

    let train = if opts.train_steps > 0 {
        let figures = train_throughput(&mut det, opts, channels, classes)?;
        log(&format!(
            "training: {} steps of {} at {}x{} in {:.2} s: {:.1} images/s (median step {:.1}){}",
            figures.steps,
            figures.batch,
            figures.crop,
            figures.crop,
            figures.seconds,
            figures.images_per_sec,
            figures.median_step_images_per_sec,
            if figures.mixed_precision {
                ", autocast float16"
            } else {
                ""
            }
        ));
        Some(figures)
    } else {
        None
    };

    if opts.fold_batchnorm && !opts.infer_batches.is_empty() {
        det.fold_batchnorm_for_inference()?;
    }
    let mut infer = Vec::new();
    for &batch in &opts.infer_batches {
        let figures = inference_latency(&det, opts, batch, channels, classes)?;
        log(&format!(
            "inference{}: batch {batch} at {s}x{s}: median {:.2} ms, p99 {:.2} ms per call \
             ({:.2} ms per image, {:.1} images/s) over {} calls",
            if opts.fold_batchnorm {
                " (BatchNorm folded)"
            } else {
                ""
            },
            figures.median_ms,
            figures.p99_ms,
            figures.median_ms_per_image,
            figures.images_per_sec,
            figures.calls,
            s = figures.size,
        ));
        infer.push(figures);
    }
    Ok(BenchReport {
        device: describe(opts.device),
        threads: tch::get_num_threads(),
        params: graph.num_trainable(),
        gmac_per_crop: graph.macs(opts.train_crop as u32, opts.train_crop as u32) as f64 / 1e9,
        train,
        infer,
    })
}

fn train_throughput(
    det: &mut Detector,
    opts: &BenchOptions,
    channels: usize,
    classes: u32,
) -> Result<TrainFigures, BenchError> {
    let batches = (0..4)
        .map(|s| rectangles(opts.train_batch, channels, opts.train_crop, 6, classes, s))
        .collect();
    let mut data = FixedBatches(batches);
    let warmup = opts.train_warmup.max(1);
    let cfg = TrainConfig {
        stop: Stop::Steps(warmup + opts.train_steps),
        mixed_precision: opts.mixed_precision,
        ..TrainConfig::default()
    };
    let mut marks: Vec<Duration> = Vec::new();
    let mut last_loss = 0.0;
    train(det, &mut data, &cfg, &mut |p| {
        // The loss is read back to the host every step, so each mark follows finished work.
        marks.push(p.elapsed);
        last_loss = p.loss;
        ControlFlow::Continue(())
    })?;
    let first = warmup as usize - 1;
    let window = (marks[marks.len() - 1] - marks[first]).as_secs_f64();
    let mut steps: Vec<f64> = marks[first..]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    steps.sort_by(f64::total_cmp);
    let images = (opts.train_steps as usize * opts.train_batch) as f64;
    Ok(TrainFigures {
        batch: opts.train_batch,
        crop: opts.train_crop,
        steps: opts.train_steps,
        seconds: window,
        images_per_sec: images / window,
        median_step_images_per_sec: opts.train_batch as f64 / percentile(&steps, 0.5),
        mixed_precision: opts.mixed_precision && opts.device.is_cuda(),
        last_loss,
    })
}

fn inference_latency(
    det: &Detector,
    opts: &BenchOptions,
    batch: usize,
    channels: usize,
    classes: u32,
) -> Result<InferFigures, BenchError> {
    let images = rectangles(batch, channels, opts.infer_size, 4, classes, 7);
    let params = DecodeParams::default();
    for _ in 0..opts.infer_warmup {
        det.detect(&images, &params)?;
    }
    let mut times = Vec::with_capacity(opts.infer_iters);
    for _ in 0..opts.infer_iters.max(1) {
        let start = Instant::now();
        det.detect(&images, &params)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 0.5);
    Ok(InferFigures {
        batch,
        size: opts.infer_size,
        calls: times.len(),
        median_ms: median,
        p99_ms: percentile(&times, 0.99),
        min_ms: times[0],
        median_ms_per_image: median / batch as f64,
        images_per_sec: batch as f64 * 1e3 / median,
    })
}

/// The value at fraction `q` of sorted `values` (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }

    #[test]
    fn a_tiny_run_reports_every_part() {
        tch::set_num_threads(1);
        let opts = BenchOptions {
            arch: ArchConfig {
                width: 0.25,
                ..ArchConfig::default()
            },
            train_batch: 2,
            train_crop: 64,
            train_steps: 2,
            train_warmup: 1,
            infer_size: 64,
            infer_batches: vec![1, 2],
            infer_iters: 3,
            infer_warmup: 1,
            ..BenchOptions::default()
        };
        let mut lines = Vec::new();
        let report = run(&opts, &mut |l| lines.push(l.to_string())).unwrap();
        let t = report.train.unwrap();
        assert_eq!(t.steps, 2);
        assert!(t.images_per_sec > 0.0 && t.last_loss.is_finite());
        assert_eq!(report.infer.len(), 2);
        assert_eq!(report.infer[1].batch, 2);
        assert!(report
            .infer
            .iter()
            .all(|f| f.min_ms <= f.median_ms && f.median_ms <= f.p99_ms));
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn sizes_off_the_stride_are_refused() {
        let opts = BenchOptions {
            infer_size: 100,
            ..BenchOptions::default()
        };
        let err = run(&opts, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("multiples of 32"), "{err}");
    }
}
