//! The ONNX export (fedinspect_common::onnx) against onnxruntime, the acceptance test:
//! on real DeepPCB images letterboxed by the client's own loader, the exported FP32 model run
//! by onnxruntime matches the tch module in eval mode within 1e-4 (max absolute difference)
//! and decodes to the same detections; the INT8 QDQ variant, calibrated with tch on the same
//! images, runs and stays close.
//!
//! onnxruntime runs in `scripts/onnx_check.py` under `$FEDINSPECT_PYTHON`, the torch venv that
//! `scripts/install-torch.sh` manages (and `scripts/cargo` sets up). Without it these tests
//! fail, saying how to install it: a parity test that skips proves nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split, CLASS_NAMES};
use fedinspect_client::data::{Augment, Batch, Channels, Loader, LoaderOptions, Preprocess};
use fedinspect_client::detector::decode::decode;
use fedinspect_client::detector::{DecodeParams, Detector, GraphModule};
use fedinspect_client::varstore::load_state_into_var_store;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::detection::Detection;
use fedinspect_common::onnx::{self, qdq, ActivationRange, ActivationRanges, ExportOptions};
use fedinspect_common::{fsutil, ModelState, Tensor};
use std::io::Write;
use tch::{nn, Device, Kind};

/// The acceptance bound on FP32 outputs (heatmap logits and boxes).
const FP32_MAX_ABS_DIFF: f32 = 1e-4;
const INPUT_SIZE: u32 = 320;

fn arch() -> ArchConfig {
    ArchConfig {
        input_size: INPUT_SIZE,
        ..ArchConfig::default()
    }
}

fn class_names() -> Vec<String> {
    CLASS_NAMES.iter().map(|s| s.to_string()).collect()
}

/// Both fixture pairs (real DeepPCB test images and templates) as one eval batch.
fn deeppcb_batch() -> Batch {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/deeppcb");
    let ds = deeppcb::load(&root, Split::Test, &DeepPcbOptions::default())
        .unwrap()
        .dataset;
    assert_eq!(ds.items.len(), 2, "fixtures list two image pairs");
    let pre = Preprocess {
        input_size: INPUT_SIZE,
        channels: Channels::GrayTemplate,
        clahe: None,
    };
    let options = LoaderOptions {
        batch_size: 2,
        prefetch: 1,
        ..LoaderOptions::default()
    };
    let loader = Loader::new(ds, pre, Augment::none(INPUT_SIZE), options).unwrap();
    let batch = loader.eval_batches().next().unwrap();
    assert!(loader.skipped().is_empty(), "{:?}", loader.skipped());
    batch
}

/// A detector whose folding has work to do: BatchNorm running statistics measured on the
/// fixture images (train-mode forward passes), BatchNorm affine parameters and the
/// zero-initialised attention projection randomised.
fn calibrated_detector(batch: &Batch) -> Detector {
    let det = seeded_detector(21);
    tch::no_grad(|| {
        let rng_guard = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(22);
        // Name order: the store is a HashMap, and draws must go to the same tensors each run.
        let mut vars: Vec<_> = det.var_store().variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let n = var.size();
            let u = tch::Tensor::rand(n.as_slice(), (Kind::Float, Device::Cpu));
            if name.ends_with(".bn.weight") {
                var.copy_(&(u * 1.0 + 0.5));
            } else if name.ends_with(".bn.bias") || name.starts_with("backbone.attn.proj.") {
                var.copy_(&((u - 0.5) * 0.4));
            }
        }
        drop(rng_guard);
        let images = det.images_tensor(batch).unwrap();
        for _ in 0..20 {
            det.forward(&images, true).unwrap();
        }
    });
    det
}

/// LibTorch's generator is global and the tests run in parallel: whoever seeds and draws
/// holds this, so every test gets the same weights on every run.
static TORCH_RNG: Mutex<()> = Mutex::new(());

fn seeded_detector(seed: u64) -> Detector {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    Detector::seeded(arch(), class_names(), Device::Cpu, seed).unwrap()
}

/// The interpreter with onnxruntime, or a failure that says how to get it.
fn python() -> PathBuf {
    match std::env::var_os("FEDINSPECT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "FEDINSPECT_PYTHON is not set, so onnxruntime cannot be found: run the tests through \
             scripts/cargo or scripts/test.sh, or `eval \"$(scripts/install-torch.sh)\"` first \
             (it installs onnxruntime into the torch venv and sets FEDINSPECT_PYTHON)"
        ),
    }
}

/// Runs `model` on `images` (`[N, C, H, W]`) in onnxruntime; returns the outputs by name and
/// the script's JSON summary.
fn run_onnxruntime(
    dir: &Path,
    model: &[u8],
    images: &tch::Tensor,
) -> (ModelState, serde_json::Value) {
    let model_path = dir.join("model.onnx");
    fsutil::write_atomic(&model_path, |w| w.write_all(model)).unwrap();
    let input = dir.join("input.safetensors");
    let output = dir.join("output.safetensors");
    let mut inputs = ModelState::new();
    inputs.insert("images", to_tensor(images)).unwrap();
    inputs
        .save_safetensors(&input, &Default::default())
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/onnx_check.py");
    let python = python();
    let out = Command::new(&python)
        .arg(&script)
        .arg(&model_path)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); run scripts/install-torch.sh to create the torch venv \
                 with onnxruntime",
                python.display()
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "onnx_check.py failed ({}): {stderr}",
        out.status
    );
    let summary = serde_json::from_slice(&out.stdout).unwrap();
    (ModelState::load_safetensors(&output).unwrap().0, summary)
}

fn to_tensor(t: &tch::Tensor) -> Tensor {
    let t = t.to_kind(Kind::Float).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let mut data = vec![0f32; t.numel()];
    t.copy_data(&mut data, t.numel());
    Tensor::new(shape, data).unwrap()
}

fn to_tch(t: &Tensor) -> tch::Tensor {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    tch::Tensor::from_slice(t.data()).view(shape.as_slice())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.data()
        .iter()
        .zip(b.data())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Scores closer than this count as tied: 40x the runtimes' largest observed difference
/// (2.4e-7 on the logits), far below any difference that means something.
const SCORE_TIE: f32 = 1e-5;

fn same_detection(x: &Detection, y: &Detection) -> bool {
    let bx = [x.bbox.x1, x.bbox.y1, x.bbox.x2, x.bbox.y2];
    let by = [y.bbox.x1, y.bbox.y1, y.bbox.x2, y.bbox.y2];
    let box_diff = bx
        .iter()
        .zip(&by)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    x.class == y.class && (x.score - y.score).abs() <= SCORE_TIE && box_diff <= 1e-3
}

/// The same detections per image, in the same order up to ties. Real boards have uniform
/// regions whose cells score exactly alike, and top-k orders equal scores arbitrarily, so each
/// run of consecutive tch scores within [`SCORE_TIE`] must hold the same detections (class,
/// box within 1e-3 px, score) in some order; a tied run cut by `top_k` at the end of the list
/// must only agree on scores (which of the tied peaks made the cut is arbitrary).
fn assert_same_detections(tch_dets: &[Vec<Detection>], ort_dets: &[Vec<Detection>], top_k: usize) {
    assert_eq!(tch_dets.len(), ort_dets.len());
    for (i, (a, b)) in tch_dets.iter().zip(ort_dets).enumerate() {
        assert_eq!(a.len(), b.len(), "image {i}: detection counts differ");
        let mut start = 0;
        while start < a.len() {
            let mut end = start + 1;
            while end < a.len() && a[end - 1].score - a[end].score <= SCORE_TIE {
                end += 1;
            }
            let (run_a, run_b) = (&a[start..end], &b[start..end]);
            if end == a.len() && end == top_k && end - start > 1 {
                for (x, y) in run_a.iter().zip(run_b) {
                    assert!(
                        (x.score - y.score).abs() <= SCORE_TIE,
                        "image {i}: tied run at the top-k cut, tch {x:?} vs onnxruntime {y:?}"
                    );
                }
            } else {
                let mut used = vec![false; run_b.len()];
                for x in run_a {
                    let hit = (0..run_b.len()).find(|&k| !used[k] && same_detection(x, &run_b[k]));
                    let Some(k) = hit else {
                        panic!(
                            "image {i}, detections {start}..{end}: tch {x:?} has no match in \
                             onnxruntime's {run_b:?}"
                        );
                    };
                    used[k] = true;
                }
            }
            start = end;
        }
    }
}

/// Exports `det` and runs it in both runtimes on `batch`: the outputs must agree within
/// [`FP32_MAX_ABS_DIFF`]; returns them (tch first) for the detection check.
fn check_fp32_parity(det: &Detector, batch: &Batch) -> [(tch::Tensor, tch::Tensor); 2] {
    let state = det.state().unwrap();
    let started = std::time::Instant::now();
    let bytes = onnx::export(det.arch(), &state, &ExportOptions::for_arch(det.arch())).unwrap();
    println!(
        "export: {} bytes in {:.1} ms (test profile)",
        bytes.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let images = det.images_tensor(batch).unwrap();
    let out = tch::no_grad(|| det.forward(&images, false)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ort, summary) = run_onnxruntime(dir.path(), &bytes, &images);

    assert_eq!(summary["producer"], "fedinspect");
    assert_eq!(
        summary["metadata"]["fedinspect.model_hash"],
        state.content_hash().to_hex()
    );
    assert_eq!(summary["input"]["name"], "images");
    assert_eq!(
        summary["input"]["declared"],
        serde_json::json!(["batch", 2, INPUT_SIZE, INPUT_SIZE])
    );
    let side = INPUT_SIZE / 4;
    assert_eq!(
        summary["outputs"][0]["declared"],
        serde_json::json!(["batch", 6, side, side])
    );

    let (heatmap, boxes) = (ort.get("heatmap").unwrap(), ort.get("boxes").unwrap());
    let d_heat = max_abs_diff(&to_tensor(&out.heatmap), heatmap);
    let d_box = max_abs_diff(&to_tensor(&out.boxes), boxes);
    println!("max |tch - onnxruntime|: heatmap logits {d_heat:.3e}, boxes {d_box:.3e}");
    assert!(
        d_heat < FP32_MAX_ABS_DIFF && d_box < FP32_MAX_ABS_DIFF,
        "FP32 parity: heatmap off by {d_heat}, boxes by {d_box} (bound {FP32_MAX_ABS_DIFF})"
    );
    [(out.heatmap, out.boxes), (to_tch(heatmap), to_tch(boxes))]
}

/// Runs of tied scores (see [`assert_same_detections`]) over all images: how many, and the
/// longest, to show how much of the comparison is order-exact.
fn tied_runs(dets: &[Vec<Detection>]) -> (usize, usize) {
    let (mut runs, mut longest) = (0, 0);
    for d in dets {
        let mut len = 1;
        for w in d.windows(2) {
            if w[0].score - w[1].score <= SCORE_TIE {
                len += 1;
            } else {
                (runs, longest) = (runs + usize::from(len > 1), longest.max(len));
                len = 1;
            }
        }
        (runs, longest) = (runs + usize::from(len > 1), longest.max(len));
    }
    (runs, longest)
}

#[test]
fn fp32_export_of_a_fresh_detector_matches_tch() {
    tch::set_num_threads(1);
    let batch = deeppcb_batch();
    let det = seeded_detector(7);
    let [(tch_heat, tch_box), (ort_heat, ort_box)] = check_fp32_parity(&det, &batch);
    assert_decodes_the_same(&tch_heat, &tch_box, &ort_heat, &ort_box, &batch);
}

#[test]
fn fp32_export_with_measured_batch_norm_statistics_matches_tch_and_decodes_the_same() {
    tch::set_num_threads(1);
    let batch = deeppcb_batch();
    let det = calibrated_detector(&batch);
    let state = det.state().unwrap();
    // Folding is exercised: running statistics moved away from their initial 0 and 1.
    let var = state
        .get("backbone.s2.b0.cv1.bn.running_var")
        .unwrap()
        .data();
    assert!(var.iter().any(|v| (v - 1.0).abs() > 0.05), "{var:?}");
    let [(tch_heat, tch_box), (ort_heat, ort_box)] = check_fp32_parity(&det, &batch);

    assert_decodes_the_same(&tch_heat, &tch_box, &ort_heat, &ort_box, &batch);
}

fn assert_decodes_the_same(
    tch_heat: &tch::Tensor,
    tch_box: &tch::Tensor,
    ort_heat: &tch::Tensor,
    ort_box: &tch::Tensor,
    batch: &Batch,
) {
    let params = DecodeParams::default();
    let ours = decode(tch_heat, tch_box, &batch.letterboxes, &params).unwrap();
    let theirs = decode(ort_heat, ort_box, &batch.letterboxes, &params).unwrap();
    assert!(
        ours.iter().all(|d| !d.is_empty()),
        "nothing decoded: the comparison would be empty"
    );
    let (runs, longest) = tied_runs(&ours);
    println!(
        "detections per image: {:?}; tied runs {runs}, longest {longest}",
        ours.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_same_detections(&ours, &theirs, params.top_k);
}

#[test]
fn dynamic_sides_export_runs_non_square_inputs() {
    tch::set_num_threads(1);
    let batch = deeppcb_batch();
    let det = calibrated_detector(&batch);
    let state = det.state().unwrap();
    let options = ExportOptions {
        spatial: onnx::Spatial::Dynamic,
        ..ExportOptions::for_arch(det.arch())
    };
    let bytes = onnx::export(det.arch(), &state, &options).unwrap();
    // 256 x 320: a crop of the letterboxed batch.
    let images = det
        .images_tensor(&batch)
        .unwrap()
        .narrow(2, 32, 256)
        .contiguous();
    let out = tch::no_grad(|| det.forward(&images, false)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ort, summary) = run_onnxruntime(dir.path(), &bytes, &images);
    assert_eq!(
        summary["input"]["declared"],
        serde_json::json!(["batch", 2, "height", "width"])
    );
    assert_eq!(ort.get("heatmap").unwrap().shape(), [2, 6, 64, 80]);
    let d_heat = max_abs_diff(&to_tensor(&out.heatmap), ort.get("heatmap").unwrap());
    let d_box = max_abs_diff(&to_tensor(&out.boxes), ort.get("boxes").unwrap());
    println!("dynamic 256x320: heatmap {d_heat:.3e}, boxes {d_box:.3e}");
    assert!(d_heat < FP32_MAX_ABS_DIFF && d_box < FP32_MAX_ABS_DIFF);

    // The by-hand check of docs/bundles.md: no input file, sides given, graph as written.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/onnx_check.py");
    let out = Command::new(python())
        .arg(script)
        .arg(dir.path().join("model.onnx"))
        .args(["--height", "96", "--width", "160", "--no-optimize"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["outputs"][1]["name"], "boxes");
    assert_eq!(
        summary["outputs"][1]["shape"],
        serde_json::json!([1, 4, 24, 40])
    );
}

/// Per-tensor min and max of every calibration point over `batch`, measured with tch the way
/// a plant would: the calibration graph (the detector plus every quantised activation as an
/// output) in eval mode.
fn calibrate(state: &ModelState, batch: &Batch, det: &Detector) -> ActivationRanges {
    let graph = det.arch().graph().unwrap();
    let cal = qdq::calibration_graph(&graph);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let module = GraphModule::new(&vs.root(), &cal).unwrap();
    load_state_into_var_store(state, &mut vs).unwrap();
    let images = det.images_tensor(batch).unwrap();
    let outs = tch::no_grad(|| module.forward(&images, false)).unwrap();
    cal.outputs
        .iter()
        .zip(&outs)
        .skip(graph.outputs.len())
        .map(|(name, t)| {
            let range = ActivationRange {
                min: t.min().double_value(&[]) as f32,
                max: t.max().double_value(&[]) as f32,
            };
            (name.clone(), range)
        })
        .collect()
}

#[test]
fn int8_qdq_export_runs_in_onnxruntime_close_to_fp32() {
    tch::set_num_threads(1);
    let batch = deeppcb_batch();
    let det = calibrated_detector(&batch);
    let state = det.state().unwrap();
    let ranges = calibrate(&state, &batch, &det);
    assert_eq!(
        ranges.len(),
        qdq::calibration_points(&det.arch().graph().unwrap()).len()
    );
    let options = ExportOptions::for_arch(det.arch());
    let bytes = onnx::export_qdq(det.arch(), &state, &ranges, &options).unwrap();
    let fp32_size = onnx::export(det.arch(), &state, &options).unwrap().len();
    println!(
        "ONNX size: fp32 {fp32_size} bytes, int8 qdq {} bytes",
        bytes.len()
    );

    let images = det.images_tensor(&batch).unwrap();
    let out = tch::no_grad(|| det.forward(&images, false)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ort, summary) = run_onnxruntime(dir.path(), &bytes, &images);
    assert_eq!(summary["metadata"]["fedinspect.precision"], "int8_qdq");

    // Scores (sigmoid of the logits) and boxes, against tch FP32, relative to their spread.
    let probs = |t: &Tensor| {
        Tensor::new(
            t.shape().to_vec(),
            t.data().iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
        )
        .unwrap()
    };
    let d_score = max_abs_diff(
        &probs(&to_tensor(&out.heatmap)),
        &probs(ort.get("heatmap").unwrap()),
    );
    let fp32_boxes = to_tensor(&out.boxes);
    let spread = fp32_boxes.data().iter().fold(0f32, |m, v| m.max(v.abs()));
    let d_box = max_abs_diff(&fp32_boxes, ort.get("boxes").unwrap());
    println!(
        "int8 vs fp32: max score diff {d_score:.4}, max box diff {d_box:.4} (box max {spread:.3})"
    );
    assert!(
        d_score > 0.0,
        "the INT8 model computed exactly the FP32 scores: not quantised?"
    );
    assert!(d_score < 0.01, "INT8 scores off by {d_score}");
    assert!(
        d_box < 0.1 * spread,
        "INT8 boxes off by {d_box} (largest box value {spread})"
    );
}

/// The detection check can fail: a changed class, a moved box or a missing detection.
#[test]
fn detection_comparison_catches_differences() {
    use fedinspect_common::detection::BBox;
    let det = |score: f32, class: u32, x: f32| Detection {
        bbox: BBox::new(x, 0.0, x + 4.0, 4.0),
        class,
        score,
    };
    let base = vec![vec![det(0.9, 0, 0.0), det(0.5, 1, 8.0), det(0.5, 2, 16.0)]];
    // Tied detections in the other order are the same.
    let swapped = vec![vec![det(0.9, 0, 0.0), det(0.5, 2, 16.0), det(0.5, 1, 8.0)]];
    assert_same_detections(&base, &swapped, 100);
    for changed in [
        vec![vec![det(0.9, 3, 0.0), det(0.5, 1, 8.0), det(0.5, 2, 16.0)]],
        vec![vec![det(0.9, 0, 0.5), det(0.5, 1, 8.0), det(0.5, 2, 16.0)]],
        vec![vec![det(0.9, 0, 0.0), det(0.5, 1, 8.0)]],
        vec![vec![det(0.9, 0, 0.0), det(0.5, 1, 8.0), det(0.5, 1, 16.0)]],
    ] {
        let caught = std::panic::catch_unwind(|| assert_same_detections(&base, &changed, 100));
        assert!(caught.is_err(), "{changed:?} passed as the same detections");
    }
}
