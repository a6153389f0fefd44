//! The onnxruntime evaluation path (`eval::onnx` worker, `eval::onnx_eval`, `client export`,
//! `client eval-onnx`) on the two real DeepPCB fixture pairs with a tiny detector: onnxruntime
//! FP32 decodes to tch's detections and the same mAP, the INT8 QDQ model calibrated by
//! `eval::onnx_calibration` runs through the same path, and the CLI refuses a model exported
//! from another checkpoint. Skips, saying why, when no Python with onnxruntime is found.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split, CLASS_NAMES};
use fedinspect_client::data::{Augment, Channels, Loader, LoaderOptions, Preprocess};
use fedinspect_client::detector::{CheckpointInfo, DecodeParams, Detector};
use fedinspect_client::eval::onnx::{OrtOptions, OrtWorker};
use fedinspect_client::eval::onnx_calibration::{self, RangeMethod};
use fedinspect_client::eval::{self, onnx_eval};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::detection::{Annotation, Detection};
use fedinspect_common::fsutil;
use fedinspect_common::onnx::{self, ExportOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;

const SIDE: u32 = 320;
/// Scores closer than this are ties (onnx_parity measured runtime differences near 2e-7).
const SCORE_TIE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/deeppcb")
}

/// A Python with onnxruntime, or `None` after printing why the test is skipped.
fn python() -> Option<PathBuf> {
    let Some(python) = std::env::var_os("FEDINSPECT_PYTHON").map(PathBuf::from) else {
        println!("skipped: FEDINSPECT_PYTHON is not set; run through scripts/cargo (it sets the torch venv with onnxruntime)");
        return None;
    };
    let ok = Command::new(&python)
        .args(["-c", "import onnxruntime, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!(
            "skipped: {} cannot import onnxruntime and numpy; run scripts/install-torch.sh",
            python.display()
        );
        return None;
    }
    Some(python)
}

fn preprocess() -> Preprocess {
    Preprocess {
        input_size: SIDE,
        channels: Channels::GrayTemplate,
        clahe: None,
    }
}

fn loader() -> Loader {
    loader_at(&fixtures())
}

fn loader_at(root: &Path) -> Loader {
    let ds = deeppcb::load(root, Split::Test, &DeepPcbOptions { template: true })
        .unwrap()
        .dataset;
    assert_eq!(ds.items.len(), 2, "the fixtures list two image pairs");
    let options = LoaderOptions {
        batch_size: 1,
        prefetch: 1,
        ..LoaderOptions::default()
    };
    Loader::new(ds, preprocess(), Augment::none(SIDE), options).unwrap()
}

/// A tiny detector with randomised BatchNorm affine parameters (an untrained head scores a
/// board's cells almost alike, and near-equal neighbours make peak extraction a coin toss)
/// and BatchNorm statistics measured by train-mode passes over the fixtures, so that folding
/// has work to do. Draws come from a seeded ChaCha generator, not LibTorch's global one, which
/// the parallel tests share.
fn detector(seed: u64, loader: &Loader) -> Detector {
    let arch = ArchConfig {
        input_size: SIDE,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    };
    let names = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
    let det = Detector::seeded(arch, names, Device::Cpu, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut vars: Vec<_> = det.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut var) in vars {
            let (scale, offset) = if name.ends_with(".bn.weight") {
                (1.0, 0.5)
            } else if name.ends_with(".bn.bias") {
                (0.4, -0.2)
            } else if name == "head.heatmap.weight" {
                (2.0, -1.0)
            } else {
                continue;
            };
            let values: Vec<f32> = (0..var.numel())
                .map(|_| rng.gen::<f32>() * scale + offset)
                .collect();
            var.copy_(&tch::Tensor::from_slice(&values).view(var.size().as_slice()));
        }
        for batch in loader.eval_batches() {
            let images = det.images_tensor(&batch).unwrap();
            for _ in 0..3 {
                det.forward(&images, true).unwrap();
            }
        }
    });
    det
}

/// The fixtures with seeded noise (up to +-24 grey levels) on every pixel, in DeepPCB layout
/// under `dir`. DeepPCB boards are binary images: their flat regions give cells with exactly
/// equal scores, and which of two equal neighbours is a peak then depends on the last bit of
/// float arithmetic, which two runtimes need not share. Noise makes every cell distinct.
fn noisy_fixtures(dir: &Path) -> PathBuf {
    let root = dir.join("noisy");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for file in [
        "test.txt",
        "group12300/12300_not/12300060.txt",
        "group90100/90100_not/90100000.txt",
    ] {
        let to = root.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join(file), to).unwrap();
    }
    for image in [
        "group12300/12300/12300060_test.jpg",
        "group12300/12300/12300060_temp.jpg",
        "group90100/90100/90100000_test.jpg",
        "group90100/90100/90100000_temp.jpg",
    ] {
        let mut grey = ::image::open(fixtures().join(image)).unwrap().into_luma8();
        for p in grey.pixels_mut() {
            let noisy = i32::from(p.0[0]) + rng.gen_range(-24..=24);
            p.0[0] = noisy.clamp(0, 255) as u8;
        }
        let to = root.join(image);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        grey.save(&to).unwrap();
    }
    root
}

fn write(path: &Path, bytes: &[u8]) {
    fsutil::write_atomic(path, |w| w.write_all(bytes)).unwrap();
}

fn worker(python: &Path, model: &Path) -> OrtWorker {
    let options = OrtOptions {
        python: python.to_path_buf(),
        threads: 1,
        optimize: true,
    };
    OrtWorker::start(model, &options).unwrap()
}

/// tch's detections for every loader item, folded as `client eval` runs it.
fn tch_detections(det: &Detector, loader: &Loader) -> Vec<Vec<Detection>> {
    let mut folded = Detector::from_state(
        det.arch().clone(),
        det.class_names().to_vec(),
        &det.state().unwrap(),
        Device::Cpu,
    )
    .unwrap();
    folded.fold_batchnorm_for_inference().unwrap();
    let mut by_id = Vec::new();
    for batch in loader.eval_batches() {
        let dets = folded.detect(&batch, &DecodeParams::default()).unwrap();
        by_id.extend(batch.ids.iter().cloned().zip(dets));
    }
    eval::align_detections(loader.dataset(), by_id)
}

fn same(x: &Detection, y: &Detection) -> bool {
    let (a, b) = (x.bbox, y.bbox);
    let box_diff = [a.x1 - b.x1, a.y1 - b.y1, a.x2 - b.x2, a.y2 - b.y2]
        .iter()
        .fold(0f32, |m, d| m.max(d.abs()));
    x.class == y.class && (x.score - y.score).abs() <= SCORE_TIE && box_diff <= 1e-3
}

/// The same detections per image up to the order of tied scores; a tied run cut by `top_k`
/// at the end must only agree on scores (which tied peak made the cut is arbitrary).
fn compare(a: &[Vec<Detection>], b: &[Vec<Detection>], top_k: usize) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} vs {} images", a.len(), b.len()));
    }
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        if a.len() != b.len() {
            return Err(format!("image {i}: {} vs {} detections", a.len(), b.len()));
        }
        let mut start = 0;
        while start < a.len() {
            let mut end = start + 1;
            while end < a.len() && a[end - 1].score - a[end].score <= SCORE_TIE {
                end += 1;
            }
            let (ra, rb) = (&a[start..end], &b[start..end]);
            let cut = end == a.len() && end == top_k && end - start > 1;
            let mut used = vec![false; rb.len()];
            for x in ra {
                let hit = (0..rb.len()).find(|&k| {
                    !used[k]
                        && if cut {
                            (x.score - rb[k].score).abs() <= SCORE_TIE
                        } else {
                            same(x, &rb[k])
                        }
                });
                match hit {
                    Some(k) => used[k] = true,
                    None => return Err(format!("image {i}: {x:?} has no match in {rb:?}")),
                }
            }
            start = end;
        }
    }
    Ok(())
}

#[test]
fn onnxruntime_fp32_through_the_eval_path_matches_tch() {
    let Some(python) = python() else { return };
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let loader = loader_at(&noisy_fixtures(dir.path()));
    let det = detector(3, &loader);
    let model = dir.path().join("model-fp32.onnx");
    let options = ExportOptions::for_arch(det.arch());
    write(
        &model,
        &onnx::export(det.arch(), &det.state().unwrap(), &options).unwrap(),
    );

    let ours = tch_detections(&det, &loader);
    let mut ort = worker(&python, &model);
    let (ort_truth, theirs) = onnx_eval::evaluate(&mut ort, &loader, 0.3).unwrap();
    assert!(ours.iter().all(|d| !d.is_empty()), "nothing decoded");
    let tied = ours
        .iter()
        .flat_map(|d| d.windows(2))
        .filter(|w| w[0].score - w[1].score <= SCORE_TIE)
        .count();
    println!(
        "detections per image {:?}, neighbours within {SCORE_TIE} of each other: {tied}",
        ours.iter().map(Vec::len).collect::<Vec<_>>()
    );
    compare(&ours, &theirs, DecodeParams::default().top_k).unwrap();
    // An untrained model finds none of the fixtures' defects (mAP 0 both ways proves
    // nothing), so both are also scored against tch's own ten best boxes per image.
    let data = loader.dataset();
    let pseudo: Vec<Vec<Annotation>> = ours
        .iter()
        .map(|d| {
            d.iter()
                .take(10)
                .map(|d| Annotation {
                    bbox: d.bbox,
                    class: d.class,
                })
                .collect()
        })
        .collect();
    let tch_report = eval::evaluate(&ours, &pseudo, &data.class_names, 0.3, 0.0).unwrap();
    let ort_report = eval::evaluate(&theirs, &pseudo, &data.class_names, 0.3, 0.0).unwrap();
    assert!(tch_report.map_50 > 0.0 && tch_report.map_33 > 0.0);
    println!(
        "against tch's top 10: map_50 tch {:.6} ORT {:.6}, map_33 tch {:.6} ORT {:.6}; against the fixtures' defects ORT map_50 {:.6}",
        tch_report.map_50, ort_report.map_50, tch_report.map_33, ort_report.map_33, ort_truth.map_50
    );
    assert!((tch_report.map_50 - ort_report.map_50).abs() < 1e-6);
    assert!((tch_report.map_33 - ort_report.map_33).abs() < 1e-6);

    // The comparison can fail: another model's detections are not these.
    let other = detector(4, &loader);
    let other_model = dir.path().join("other.onnx");
    let bytes = onnx::export(other.arch(), &other.state().unwrap(), &options).unwrap();
    write(&other_model, &bytes);
    let (_, different) =
        onnx_eval::evaluate(&mut worker(&python, &other_model), &loader, 0.3).unwrap();
    assert!(compare(&ours, &different, 100).is_err());
}

#[test]
fn int8_qdq_calibrated_here_runs_through_the_eval_path() {
    let Some(python) = python() else { return };
    tch::set_num_threads(1);
    let loader = loader();
    let det = detector(5, &loader);
    let state = det.state().unwrap();
    let minmax = onnx_calibration::measure(&det, &state, &loader, 2, RangeMethod::MinMax).unwrap();
    let points = onnx::qdq::calibration_points(&det.arch().graph().unwrap());
    assert_eq!(minmax.len(), points.len());
    let pct =
        onnx_calibration::measure(&det, &state, &loader, 2, RangeMethod::Percentile(99.9)).unwrap();
    let narrower = points
        .iter()
        .filter(|p| pct[*p].max < minmax[*p].max || pct[*p].min > minmax[*p].min)
        .count();
    println!(
        "percentile 99.9 narrower than min/max at {narrower} of {} points",
        points.len()
    );
    assert!(narrower > points.len() / 2);

    let dir = tempfile::tempdir().unwrap();
    let options = ExportOptions::for_arch(det.arch());
    let (fp32, int8) = (dir.path().join("fp32.onnx"), dir.path().join("int8.onnx"));
    write(&fp32, &onnx::export(det.arch(), &state, &options).unwrap());
    write(
        &int8,
        &onnx::export_qdq(det.arch(), &state, &minmax, &options).unwrap(),
    );
    let mut q = worker(&python, &int8);
    assert_eq!(q.info().metadata["fedinspect.precision"], "int8_qdq");
    let (report, dets) = onnx_eval::evaluate(&mut q, &loader, 0.3).unwrap();
    let (_, fp32_dets) = onnx_eval::evaluate(&mut worker(&python, &fp32), &loader, 0.3).unwrap();
    assert_eq!(report.images, 2);
    assert!(report.map_50.is_finite() && dets.iter().all(|d| !d.is_empty()));
    // Quantised: the scores moved.
    let moved = dets
        .iter()
        .flatten()
        .zip(fp32_dets.iter().flatten())
        .any(|(a, b)| (a.score - b.score).abs() > SCORE_TIE);
    assert!(moved, "INT8 scores equal FP32's: not quantised?");
}

/// A temporary DeepPCB folder whose trainval.txt and test.txt both list the fixture pairs.
fn data_folder(dir: &Path) -> PathBuf {
    let root = dir.join("PCBData");
    std::fs::create_dir_all(&root).unwrap();
    for group in ["group12300", "group90100"] {
        std::os::unix::fs::symlink(fixtures().join(group), root.join(group)).unwrap();
    }
    let list = std::fs::read_to_string(fixtures().join("test.txt")).unwrap();
    for split in ["trainval.txt", "test.txt"] {
        std::fs::write(root.join(split), &list).unwrap();
    }
    root
}

fn client(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn export_and_eval_onnx_commands_and_a_foreign_checkpoint() {
    let Some(python) = python() else { return };
    let loader = loader();
    let dir = tempfile::tempdir().unwrap();
    let data = data_folder(dir.path());
    let info = CheckpointInfo {
        preprocess: Some(preprocess()),
        ..CheckpointInfo::default()
    };
    let (ck, other) = (
        dir.path().join("ck.safetensors"),
        dir.path().join("o.safetensors"),
    );
    detector(6, &loader).save_checkpoint(&ck, &info).unwrap();
    detector(7, &loader).save_checkpoint(&other, &info).unwrap();
    let out = dir.path().join("onnx");
    let (d, o, c) = (
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        ck.to_str().unwrap(),
    );
    let exported = client(&[
        "export",
        "--checkpoint",
        c,
        "--out",
        o,
        "--int8",
        "--data",
        d,
        "--calibration-images",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&exported.stdout);
    assert!(
        exported.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    println!("{stdout}");
    assert!(
        stdout.contains("calibration: 2 training images"),
        "{stdout}"
    );
    for file in [
        "model-fp32.onnx",
        "model-int8-qdq.onnx",
        "calibration-ranges.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }

    let py = python.to_str().unwrap();
    let model = out.join("model-int8-qdq.onnx");
    let m = model.to_str().unwrap();
    let base = [
        "eval-onnx",
        "--data",
        d,
        "--onnx",
        m,
        "--runtime-python",
        py,
    ];
    let evaluated = client(&[&base[..], &["--checkpoint", c, "--json"]].concat());
    assert!(
        evaluated.status.success(),
        "{}",
        String::from_utf8_lossy(&evaluated.stderr)
    );
    let report: eval::EvalReport = serde_json::from_slice(&evaluated.stdout).unwrap();
    assert_eq!(report.images, 2);

    let foreign = client(&[&base[..], &["--checkpoint", other.to_str().unwrap()]].concat());
    let stderr = String::from_utf8_lossy(&foreign.stderr);
    assert!(!foreign.status.success());
    assert!(
        stderr.contains("pass the checkpoint it was exported from"),
        "{stderr}"
    );
}
