//! Training throughput of the default detector (batch 8, 320x320, 2 channels), printed, not
//! asserted; the PyTorch twin is scripts/bench_train_pytorch.py. Ignored by default:
//!
//! ```text
//! scripts/cargo test --release -p fedinspect-client --test detector_throughput -- --ignored --nocapture
//! ```
//!
//! Environment: FEDINSPECT_BENCH_THREADS (2), FEDINSPECT_BENCH_STEPS (20, after 3 warmup
//! steps), FEDINSPECT_PARITY_OUT (a path: also writes the weights, an input and the eval-mode
//! outputs there, for `bench_train_pytorch.py --parity`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use fedinspect_client::detector::synthetic::rectangles;
use fedinspect_client::detector::{train, Detector, FixedBatches, Stop, TrainConfig};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::model::Tensor as StateTensor;
use tch::{Device, Kind, Tensor};

const WARMUP: u64 = 3;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn training_throughput_default_arch() {
    let threads = env_or("FEDINSPECT_BENCH_THREADS", 2);
    let steps = env_or("FEDINSPECT_BENCH_STEPS", 20);
    tch::set_num_threads(threads as i32);
    let arch = ArchConfig::default();
    let names: Vec<String> = (0..arch.num_classes).map(|c| format!("c{c}")).collect();
    let mut det = Detector::seeded(arch.clone(), names, Device::Cpu, 0).unwrap();
    let batches = (0..4).map(|s| rectangles(8, 2, 320, 6, 6, s)).collect();
    let mut data = FixedBatches(batches);
    let cfg = TrainConfig {
        stop: Stop::Steps(WARMUP + steps),
        ..TrainConfig::default()
    };
    let mut marks: Vec<Duration> = Vec::new();
    let mut cpu_marks: Vec<(f64, u64)> = Vec::new();
    let mut last_loss = 0.0;
    train(&mut det, &mut data, &cfg, &mut |p| {
        marks.push(p.elapsed);
        cpu_marks.push(process_cpu_and_faults());
        last_loss = p.loss;
        ControlFlow::Continue(())
    })
    .unwrap();

    let window = marks[marks.len() - 1] - marks[WARMUP as usize - 1];
    let (cpu_end, faults_end) = cpu_marks[cpu_marks.len() - 1];
    let (cpu_start, faults_start) = cpu_marks[WARMUP as usize - 1];
    let cpu = cpu_end - cpu_start;
    let faults_per_step = (faults_end - faults_start) / steps;
    let mut step_times: Vec<f64> = marks
        .windows(2)
        .skip(WARMUP as usize - 1)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    step_times.sort_by(f64::total_cmp);
    let median = step_times[step_times.len() / 2];
    let graph = arch.graph().unwrap();
    println!(
        "tch {} threads, {} params, {:.2} GMAC/crop: {steps} steps of 8 at 320x320 in {:.2} s, \
         {:.1} images/s (median step {:.1} images/s; {:.2} cores busy; {faults_per_step} page \
         faults/step; last loss {last_loss:.3})",
        threads,
        graph.num_trainable(),
        graph.macs(320, 320) as f64 / 1e9,
        window.as_secs_f64(),
        (steps * 8) as f64 / window.as_secs_f64(),
        8.0 / median,
        cpu / window.as_secs_f64(),
    );
    if let Ok(path) = std::env::var("FEDINSPECT_PARITY_OUT") {
        write_parity(&det, Path::new(&path));
    }
}

/// User + system CPU seconds (all threads) and minor page faults of this process, from
/// /proc/self/stat (clock ticks of 1/100 s). Cores busy (CPU time over wall time) below the
/// thread count means the run shared its cores with other processes and its images/s
/// understate the code; page faults per step show whether memory is recycled.
fn process_cpu_and_faults() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name: minflt, utime and stime are fields 10, 14
    // and 15 of the line.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    ((field(11) + field(12)) as f64 / 100.0, field(7))
}

/// The detector's state plus `parity.input` and its eval-mode `parity.heatmap` and
/// `parity.box`, as one safetensors file.
fn write_parity(det: &Detector, path: &Path) {
    let batch = rectangles(2, 2, 320, 6, 6, 99);
    let images = det.images_tensor(&batch).unwrap();
    let out = tch::no_grad(|| det.forward(&images, false)).unwrap();
    let mut state = det.state().unwrap();
    for (name, t) in [
        ("parity.input", &images),
        ("parity.heatmap", &out.heatmap),
        ("parity.box", &out.boxes),
    ] {
        state.insert(name, to_state_tensor(t)).unwrap();
    }
    state.save_safetensors(path, &BTreeMap::new()).unwrap();
    println!("parity file written to {}", path.display());
}

fn to_state_tensor(t: &Tensor) -> StateTensor {
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let t = t.to_kind(Kind::Float).contiguous();
    let n = t.numel();
    let mut data = vec![0f32; n];
    t.copy_data(&mut data, n);
    StateTensor::new(shape, data).unwrap()
}
