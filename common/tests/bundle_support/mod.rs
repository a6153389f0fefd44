//! What the bundle tests share: a small detector with deterministic random weights and
//! calibration ranges, a built bundle, copies of a bundle folder to damage, and wrappers around
//! the trtexec stand-in that fix its environment for one test (tests run in parallel, so the
//! process environment cannot be used).

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::bundle::{
    build_bundle, BuildReport, BundleInputs, BundleMetadata, EngineStep, NoEngines,
};
use fedinspect_common::model::Tensor;
use fedinspect_common::onnx::qdq::calibration_points;
use fedinspect_common::onnx::{ActivationRange, ActivationRanges};
use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelState;

/// A tiny detector (64x64 input, a quarter of the default width), quick to export.
pub fn small_arch() -> ArchConfig {
    ArchConfig {
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        input_size: 64,
        ..ArchConfig::default()
    }
}

/// Weights in [-0.5, 0.5) and BatchNorm variances in [0.25, 1.75), from a 64-bit LCG.
pub fn random_state(arch: &ArchConfig, seed: u64) -> ModelState {
    let mut x = seed;
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut state = ModelState::new();
    for spec in arch.graph().unwrap().params() {
        let n: usize = spec.shape.iter().product();
        let var = spec.name.ends_with("running_var");
        let data = (0..n)
            .map(|_| {
                if var {
                    1.0 + 0.75 * next()
                } else {
                    0.5 * next()
                }
            })
            .collect();
        state
            .insert(spec.name, Tensor::new(spec.shape, data).unwrap())
            .unwrap();
    }
    state
}

/// Ranges of [-4, 4] at every calibration point.
pub fn calibration(arch: &ArchConfig) -> ActivationRanges {
    calibration_points(&arch.graph().unwrap())
        .into_iter()
        .map(|p| {
            (
                p,
                ActivationRange {
                    min: -4.0,
                    max: 4.0,
                },
            )
        })
        .collect()
}

pub fn class_names(arch: &ArchConfig) -> Vec<String> {
    (0..arch.num_classes)
        .map(|i| format!("defect{i}"))
        .collect()
}

pub fn metadata(arch: &ArchConfig, version: u64) -> BundleMetadata {
    let mut m = BundleMetadata::new(version, class_names(arch), 0.3, "2025-01-01T00:00:00Z");
    m.metrics.insert("map_50".into(), 0.5);
    m
}

/// Builds version `version` of the small model (seed = version) at `out`.
pub fn build_small(
    out: &Path,
    key: &SigningKey,
    version: u64,
    engines: &mut dyn EngineStep,
) -> BuildReport {
    let arch = small_arch();
    let state = random_state(&arch, version);
    let ranges = calibration(&arch);
    let inputs = BundleInputs {
        arch: &arch,
        state: &state,
        calibration: Some(&ranges),
        metadata: metadata(&arch, version),
    };
    build_bundle(out, &inputs, key, engines).unwrap()
}

pub fn no_engines() -> NoEngines {
    NoEngines {
        reason: "test: no trtexec".into(),
    }
}

/// A copy of the flat folder `src` at `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

/// The repository's `scripts/trtexec-standin`.
pub fn standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/trtexec-standin")
        .canonicalize()
        .expect("scripts/trtexec-standin exists")
}

/// An executable `dir/trtexec` that runs the stand-in with `env` set (`exec`, so it keeps the
/// process id), recording its arguments in `dir/args.txt`.
pub fn standin_wrapper(dir: &Path, env: &[(&str, &str)]) -> PathBuf {
    wrapper(dir, env, true)
}

/// Like [`standin_wrapper`] but the stand-in runs as a child of the wrapper shell, so killing
/// only the direct child would leave it running.
pub fn standin_wrapper_with_child(dir: &Path, env: &[(&str, &str)]) -> PathBuf {
    wrapper(dir, env, false)
}

fn wrapper(dir: &Path, env: &[(&str, &str)], exec: bool) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    let mut script = String::from("#!/bin/sh\n");
    script.push_str(&format!(
        "export TRTEXEC_STANDIN_ARGS_FILE='{}'\n",
        dir.join("args.txt").display()
    ));
    for (k, v) in env {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    let run = if exec { "exec " } else { "" };
    script.push_str(&format!("{run}'{}' \"$@\"\n", standin().display()));
    let path = dir.join("trtexec");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The argument lists the wrapper in `dir` recorded, one per run.
pub fn recorded_runs(dir: &Path) -> Vec<Vec<String>> {
    fs::read_to_string(dir.join("args.txt"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}
