//! The `client` binary on bad input: a missing data folder, a corrupt checkpoint and an image
//! with the wrong number of colour channels each end the command with a non-zero exit and a
//! message on stderr that names the problem and what to do. The checkpoint these tests need is
//! written through the library (no training), so each command runs in about a second.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedinspect_client::data::{Channels, Preprocess};
use fedinspect_client::detector::{CheckpointInfo, Detector};
use fedinspect_common::arch::ArchConfig;
use tch::Device;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the client binary runs")
}

/// Runs `client <args>`, asserts that it fails, and returns its stderr.
fn failure(args: &[&str]) -> String {
    let out = client(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "client {args:?} succeeded:\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// An untrained DeepPCB-style checkpoint (grey image + template, six classes) at 64 pixels.
fn checkpoint(dir: &Path) -> PathBuf {
    let arch = ArchConfig {
        in_channels: 2,
        num_classes: 6,
        input_size: 64,
        width: 0.25,
        ..ArchConfig::default()
    };
    let names = (0..6).map(|c| format!("c{c}")).collect();
    let det = Detector::seeded(arch, names, Device::Cpu, 1).unwrap();
    let path = dir.join("det.safetensors");
    let info = CheckpointInfo {
        preprocess: Some(Preprocess {
            input_size: 64,
            channels: Channels::GrayTemplate,
            clahe: None,
        }),
        ..CheckpointInfo::default()
    };
    det.save_checkpoint(&path, &info).unwrap();
    path
}

#[test]
fn a_missing_data_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder");
    let out = dir.path().join("out.safetensors");
    let stderr = failure(&[
        "train",
        "--data",
        missing.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        stderr.contains(&format!("--data {}: no such folder", missing.display()))
            && stderr.contains("PCBData folder that holds trainval.txt"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written");

    let ckpt = checkpoint(dir.path());
    let stderr = failure(&[
        "eval",
        "--data",
        missing.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(
        stderr.contains(&format!("--data {}: no such folder", missing.display())),
        "{stderr}"
    );
}

#[test]
fn a_corrupt_checkpoint_is_refused_by_eval_detect_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(checkpoint(dir.path())).unwrap();
    // Cut in the middle of the tensor data: the header promises more bytes than there are.
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(&corrupt, &good[..good.len() / 2]).unwrap();
    let data = fixtures().join("deeppcb");
    let image = data.join("group00002/00002/00002001_test.jpg");
    let out = dir.path().join("out");
    let commands: [Vec<&str>; 3] = [
        vec!["eval", "--data", data.to_str().unwrap()],
        vec![
            "detect",
            "--out",
            out.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
        vec![
            "train",
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
            "--resume",
        ],
    ];
    for mut args in commands {
        if args[0] != "train" {
            args.push("--checkpoint");
        }
        args.extend([corrupt.to_str().unwrap(), "--device", "cpu"]);
        let stderr = failure(&args);
        assert!(
            stderr.contains(&corrupt.display().to_string())
                && stderr.contains("is not a valid safetensors file")
                && stderr.contains("may be truncated"),
            "client {args:?}: {stderr}"
        );
    }
    assert!(!out.exists(), "nothing written");
}

#[test]
fn an_image_with_the_wrong_channel_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path());
    // A 3-channel colour JPEG for a model that reads grey image + template.
    let colour = fixtures().join("coco/images/a.jpg");
    let out = dir.path().join("out");
    let stderr = failure(&[
        "detect",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        colour.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains(&format!(
            "{}: 3-channel colour image, but the model reads grayscale images (2 input channels: image + template)",
            colour.display()
        )) && stderr.contains("pass grayscale images"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written");
}
