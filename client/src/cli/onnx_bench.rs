//! `client bench --onnx`: in one run, a checkpoint's ONNX export (time and size of the FP32
//! and INT8 QDQ files) and the batch-1 CPU latency of tch, onnxruntime FP32 and onnxruntime
//! INT8 on one DeepPCB test image, timed in turns (`eval::onnx_bench::alternate`).

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::eval_onnx::{load_checkpoint, start_worker};
use super::export::{export_models, print_exported, Int8Args};
use super::scoring_data::{deeppcb_split, eval_loader};
use crate::data::deeppcb::Split;
use crate::eval::onnx::OrtWorker;
use crate::eval::onnx_bench::{alternate, table};

/// What `client bench --onnx` was given.
#[derive(Clone, Debug)]
pub struct OnnxBench {
    pub checkpoint: PathBuf,
    pub int8: Int8Args,
    /// Where the ONNX files go; a temporary folder (removed afterwards) when `None`.
    pub out: Option<PathBuf>,
    pub python: Option<PathBuf>,
    /// LibTorch and onnxruntime threads.
    pub threads: usize,
    pub warmup: usize,
    pub iters: usize,
}

pub fn run(b: &OnnxBench) -> Result<()> {
    println!("load before: {}", load_average());
    let (mut det, preprocess, hash) = load_checkpoint(&b.checkpoint)?;
    let temp = std::env::temp_dir().join(format!("fedinspect-onnx-bench-{}", std::process::id()));
    let out = b.out.clone().unwrap_or_else(|| temp.clone());
    let result = (|| -> Result<()> {
        let exported = export_models(&det, &preprocess, &b.int8, &out)?;
        print_exported(&exported);
        det.fold_batchnorm_for_inference()?;
        let images = match &b.int8.data {
            Some(data) => {
                let mut test = deeppcb_split(data, Split::Test, &preprocess, &[])?;
                test.items.truncate(1);
                let id = test.items.first().map(|i| i.id.clone()).unwrap_or_default();
                let loader = eval_loader(test, preprocess.clone(), 1)?;
                let batch = loader
                    .eval_batches()
                    .next()
                    .with_context(|| format!("test image {id} cannot be read"))?;
                println!("input: DeepPCB test image {id}");
                det.images_tensor(&batch)?
            }
            None => {
                let side = i64::from(preprocess.input_size);
                let c = i64::from(det.arch().in_channels);
                println!("input: random values (no --data)");
                tch::Tensor::rand([1, c, side, side], (tch::Kind::Float, tch::Device::Cpu))
            }
        };
        let mut fp32 = start_worker(&exported.fp32.path, b.python.as_deref(), b.threads, &hash)?;
        let mut int8: Option<OrtWorker> = match &exported.int8 {
            Some((_, _, w)) => Some(start_worker(
                &w.path,
                b.python.as_deref(),
                b.threads,
                &hash,
            )?),
            None => None,
        };
        println!(
            "latency: batch 1, {:?}, CPU, {} threads (LibTorch {}, onnxruntime {}), {} warm-up + {} timed rounds in turns",
            images.size(),
            b.threads,
            tch::get_num_threads(),
            fp32.info().onnxruntime,
            b.warmup,
            b.iters
        );
        let mut workers: Vec<(String, &mut OrtWorker)> = vec![("ORT FP32".to_string(), &mut fp32)];
        if let Some(w) = int8.as_mut() {
            workers.push(("ORT INT8".to_string(), w));
        }
        let results = alternate(&det, &images, &mut workers, b.warmup, b.iters)?;
        print!("{}", table(&results));
        println!("load after: {}", load_average());
        Ok(())
    })();
    if b.out.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

/// `/proc/loadavg`'s three load averages (other processes share the machine).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown (no /proc/loadavg)".to_string())
}
