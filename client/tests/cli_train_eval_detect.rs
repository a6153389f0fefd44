//! The `client` binary end to end on the tiny DeepPCB-layout fixture (64x64 boards, three
//! training pairs, one test pair), at a 64-pixel input and width 0.25 so each command takes a
//! second or two: `train` writes a checkpoint, `eval --json` prints one JSON report, `detect`
//! writes detections.json and annotated PNGs, and `train --resume` continues a run exactly.
//! Training uses one LibTorch thread, which makes CPU runs bit-for-bit repeatable.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedinspect_client::detector::checkpoint::OPTIM_PREFIX;
use fedinspect_client::detector::Detector;
use fedinspect_client::eval::export::DetectionsFile;
use fedinspect_common::ModelState;
use serde_json::Value;
use tch::Device;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/deeppcb")
}

/// `client <args>`, run to completion; panics with its output unless it succeeds.
fn client_ok(args: &[&str]) -> Output {
    let out = client(args);
    assert!(
        out.status.success(),
        "client {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the client binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `client train` on the fixture with the tiny settings plus `extra`.
fn train(out: &Path, extra: &[&str]) -> Output {
    let data = fixture();
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--input-size",
        "64",
        "--width",
        "0.25",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    client_ok(&args)
}

/// Every tensor of a checkpoint file, optimizer moments included.
fn tensors(path: &Path) -> ModelState {
    ModelState::load_safetensors(path).unwrap().0
}

fn unit_number(report: &Value, key: &str) -> f64 {
    let v = report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {report}"));
    assert!((0.0..=1.0).contains(&v), "{key} = {v} is outside [0, 1]");
    v
}

#[test]
fn train_then_eval_json_then_detect() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("det.safetensors");
    let out = train(&ckpt, &["--steps", "3"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
    let (det, info) = Detector::load_checkpoint(&ckpt, Device::Cpu).unwrap();
    assert_eq!(det.arch().input_size, 64);
    assert_eq!(det.arch().width, 0.25);
    assert_eq!(info.training.unwrap().position.steps_done, 3);

    // eval --json: one JSON object on one line, nothing else on stdout.
    let data = fixture();
    let out = client_ok(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim_end().lines().count(), 1, "{stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("stdout is one JSON value");
    assert!(report.is_object(), "{report}");
    for key in [
        "map_50",
        "map_50_95",
        "map_33",
        "precision_33",
        "recall_33",
        "f1_33",
    ] {
        unit_number(&report, key);
    }
    let per_class = report["per_class"].as_object().expect("per_class object");
    let classes: Vec<&str> = per_class.keys().map(String::as_str).collect();
    let mut expected = det.class_names().to_vec();
    expected.sort();
    assert_eq!(classes, expected);
    for ap in per_class.keys() {
        unit_number(&report["per_class"], ap);
    }
    assert_eq!(
        report["images"].as_u64(),
        Some(1),
        "the fixture's test split"
    );
    let seconds = report["seconds"].as_f64().expect("seconds");
    assert!(seconds > 0.0 && seconds < 60.0, "seconds = {seconds}");

    // eval --groups: only those boards' test images; a group the split lacks is named.
    let ckpt_arg = ckpt.to_str().unwrap();
    let data_arg = data.to_str().unwrap();
    let out = client_ok(&[
        "eval",
        "--data",
        data_arg,
        "--checkpoint",
        ckpt_arg,
        "--json",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--groups",
        "group00002",
    ]);
    let grouped: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(grouped["images"].as_u64(), Some(1), "{grouped}");
    assert_eq!(grouped["map_50"], report["map_50"], "the same single image");
    let out = client(&[
        "eval",
        "--data",
        data_arg,
        "--checkpoint",
        ckpt_arg,
        "--device",
        "cpu",
        "--groups",
        "group00002,group12000",
    ]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "an unknown group must fail: {stderr}"
    );
    assert!(
        stderr.contains("\"group12000\"") && stderr.contains("test.txt has [\"group00002\"]"),
        "{stderr}"
    );

    // detect: detections.json and one annotated PNG per image, at the image's size.
    let image = data.join("group00002/00002/00002001_test.jpg");
    let out_dir = dir.path().join("detections");
    client_ok(&[
        "detect",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--min-score",
        "0",
        "--device",
        "cpu",
        image.to_str().unwrap(),
    ]);
    let json = std::fs::read(out_dir.join("detections.json")).unwrap();
    let file: DetectionsFile = serde_json::from_slice(&json).expect("detections.json parses");
    assert_eq!(file.class_names, det.class_names());
    assert_eq!(file.images.len(), 1);
    assert_eq!(file.images[0].id, "00002001_test");
    for d in &file.images[0].detections {
        assert!((0.0..=1.0).contains(&d.score), "{d:?}");
        let [x1, y1, x2, y2] = d.bbox;
        assert!(
            x1.is_finite() && y1.is_finite() && x1 <= x2 && y1 <= y2,
            "{d:?}"
        );
        assert_eq!(file.class_names[d.class as usize], d.class_name);
    }
    let png = image::open(out_dir.join("00002001_test.png")).expect("annotated PNG decodes");
    let input = image::open(&image).unwrap();
    assert_eq!(
        (png.width(), png.height()),
        (input.width(), input.height()),
        "annotated image has the input's size"
    );
}

#[test]
fn train_resume_continues_exactly_where_the_run_stopped() {
    let dir = tempfile::tempdir().unwrap();
    // Two epochs of three batches in one run...
    let whole = dir.path().join("whole.safetensors");
    train(&whole, &["--epochs", "2"]);
    // ...or stopped after four steps (one batch into epoch 1), resumed for one step (--steps
    // caps the resumed plan, it does not replace it), then resumed to the plan's end.
    let part = dir.path().join("part.safetensors");
    train(&part, &["--epochs", "2", "--steps", "4"]);
    let data = fixture();
    let resume = |from: &Path, to: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--resume",
            from.to_str().unwrap(),
            "--out",
            to.to_str().unwrap(),
            "--threads",
            "1",
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        text(&client_ok(&args).stdout)
    };
    let mid = dir.path().join("mid.safetensors");
    let stdout = resume(&part, &mid, &["--steps", "1"]);
    assert!(
        stdout.contains("resuming") && stdout.contains("done: 1 steps"),
        "{stdout}"
    );
    let resumed = dir.path().join("resumed.safetensors");
    let stdout = resume(&mid, &resumed, &[]);
    assert!(
        stdout.contains("step 5 of the schedule") && stdout.contains("done: 1 steps"),
        "{stdout}"
    );
    // Weights, BatchNorm statistics and AdamW moments: bit for bit.
    let (a, b) = (tensors(&whole), tensors(&resumed));
    assert!(a.names().any(|n| n.starts_with(OPTIM_PREFIX)));
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    let differing: Vec<&str> = a
        .iter()
        .filter(|(name, t)| Some(*t) != b.get(name))
        .map(|(name, _)| name)
        .collect();
    assert!(differing.is_empty(), "differ after resuming: {differing:?}");
    assert_eq!(a.content_hash(), b.content_hash());
    // The interrupted file itself differs, so the comparison can fail.
    assert_ne!(tensors(&part), a);
}

#[test]
fn resuming_a_checkpoint_without_optimizer_state_says_the_moments_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("det.safetensors");
    train(&ckpt, &["--steps", "1"]);
    // The same checkpoint as one written before checkpoints carried training state.
    let (det, mut info) = Detector::load_checkpoint(&ckpt, Device::Cpu).unwrap();
    info.training = None;
    let old = dir.path().join("old.safetensors");
    det.save_checkpoint(&old, &info).unwrap();

    let data = fixture();
    let args = |extra: &'static [&'static str]| {
        let mut a = vec![
            "train".to_string(),
            "--data".into(),
            data.display().to_string(),
            "--resume".into(),
            old.display().to_string(),
            "--out".into(),
            dir.path().join("next.safetensors").display().to_string(),
            "--threads".into(),
            "1".into(),
            "--device".into(),
            "cpu".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // Without a recorded plan, the run needs to be told how far to go.
    let no_plan = args(&[]);
    let out = client(&no_plan.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("pass --epochs"), "{stderr}");

    let with_steps = args(&["--steps", "1"]);
    let out = client_ok(&with_steps.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("has no optimizer state")
            && stderr.contains("AdamW's moments restart from zero"),
        "{stderr}"
    );
    assert!(text(&out.stdout).contains("done: 1 steps"));
}
