//! `client bench`: the detector's training images/s and inference latency on this machine,
//! printed as lines and optionally as one JSON object (see `crate::bench`).

use anyhow::Result;
use clap::Args;
use fedinspect_common::arch::ArchConfig;

use super::device;
use crate::bench;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "auto")]
    device: String,
    /// LibTorch CPU threads (0: LibTorch's default, all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Channel width multiplier of the detector.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    #[arg(long, default_value_t = 8)]
    train_batch: usize,
    #[arg(long, default_value_t = 320)]
    train_crop: usize,
    /// Timed training steps (0: inference only).
    #[arg(long, default_value_t = 20)]
    train_steps: u64,
    /// Train in float32 on CUDA too (default: autocast float16 there).
    #[arg(long)]
    no_mixed_precision: bool,
    /// Time inference with BatchNorm as separate operators (default: folded into the
    /// convolutions, as eval, detect and bundles run it).
    #[arg(long)]
    no_fold: bool,
    #[arg(long, default_value_t = 640)]
    infer_size: usize,
    /// Inference batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    infer_batches: Vec<usize>,
    /// Timed inference calls per batch size.
    #[arg(long, default_value_t = 50)]
    infer_iters: usize,
    /// Also print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Instead: export --checkpoint to ONNX (time, sizes) and time tch, onnxruntime FP32 and
    /// (with --int8 --data) onnxruntime INT8 at batch 1 on the CPU, in turns.
    #[arg(long, requires = "checkpoint")]
    onnx: bool,
    /// The checkpoint for --onnx.
    #[arg(long)]
    checkpoint: Option<std::path::PathBuf>,
    #[command(flatten)]
    int8: super::export::Int8Args,
    /// Keep --onnx's files in this folder [default: a temporary one]. --int8, --data,
    /// --calibration-images and --ranges above also apply to --onnx only.
    #[arg(long)]
    onnx_out: Option<std::path::PathBuf>,
    /// A Python with onnxruntime [default: $FEDINSPECT_PYTHON, else python3].
    #[arg(long)]
    runtime_python: Option<std::path::PathBuf>,
    /// Untimed rounds before --onnx's timed ones.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.threads > 0 {
        tch::set_num_threads(i32::try_from(a.threads)?);
    }
    if let (true, Some(checkpoint)) = (a.onnx, a.checkpoint.clone()) {
        return super::onnx_bench::run(&super::onnx_bench::OnnxBench {
            checkpoint,
            int8: a.int8,
            out: a.onnx_out,
            python: a.runtime_python,
            threads: usize::try_from(tch::get_num_threads())?,
            warmup: a.warmup,
            iters: a.infer_iters,
        });
    }
    if a.int8.int8 || a.int8.data.is_some() || a.onnx_out.is_some() {
        anyhow::bail!(
            "--int8, --data and --onnx-out belong to the ONNX comparison: add --onnx --checkpoint <file>"
        );
    }
    let opts = bench::BenchOptions {
        arch: ArchConfig {
            width: a.width,
            ..ArchConfig::default()
        },
        device: device(&a.device)?,
        train_batch: a.train_batch,
        train_crop: a.train_crop,
        train_steps: a.train_steps,
        mixed_precision: !a.no_mixed_precision,
        infer_size: a.infer_size,
        infer_batches: a.infer_batches,
        infer_iters: a.infer_iters,
        fold_batchnorm: !a.no_fold,
        ..bench::BenchOptions::default()
    };
    if opts.device.is_cuda() {
        println!(
            "device: CUDA ({} GPU(s) visible)",
            tch::Cuda::device_count()
        );
    } else {
        println!("device: CPU, {} LibTorch threads", tch::get_num_threads());
    }
    let report = bench::run(&opts, &mut |line| println!("{line}"))?;
    println!(
        "detector: {} parameters, {:.3} GMAC per {}x{} crop",
        report.params, report.gmac_per_crop, opts.train_crop, opts.train_crop
    );
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
