//! What the plant-side bundle tests share: bundles of a tiny detector built and signed as the
//! coordinator builds them (optionally with engines from the trtexec stand-in), packed to the
//! tar stream plants download, and a wrapper around `scripts/trtexec-standin` with its
//! environment fixed per test.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::bundle::engine_cache::EngineCache;
use fedinspect_common::bundle::trtexec::Trtexec;
use fedinspect_common::bundle::{
    build_bundle, pack, verify_bundle, BundleInputs, BundleMetadata, EnginePrecision, EngineStep,
    EngineTarget, NoEngines, TrtexecEngines,
};
use fedinspect_common::model::Tensor;
use fedinspect_common::onnx::qdq::calibration_points;
use fedinspect_common::onnx::{ActivationRange, ActivationRanges};
use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelState;

pub fn small_arch() -> ArchConfig {
    ArchConfig {
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        input_size: 64,
        ..ArchConfig::default()
    }
}

pub fn random_state(arch: &ArchConfig, seed: u64) -> ModelState {
    let mut x = seed;
    let mut state = ModelState::new();
    for spec in arch.graph().unwrap().params() {
        let n: usize = spec.shape.iter().product();
        let var = spec.name.ends_with("running_var");
        let data = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if var {
                    1.0 + 0.5 * u
                } else {
                    0.5 * u
                }
            })
            .collect();
        state
            .insert(spec.name, Tensor::new(spec.shape, data).unwrap())
            .unwrap();
    }
    state
}

fn calibration(arch: &ArchConfig) -> ActivationRanges {
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

pub fn sm86() -> EngineTarget {
    EngineTarget {
        compute_capability: "8.6".into(),
        tensorrt_version: "10.3.0".into(),
    }
}

/// A built bundle folder of model `version` (seed = version) and its tar bytes.
pub struct Built {
    pub dir: PathBuf,
    pub archive: Vec<u8>,
    pub manifest_sha256: String,
}

/// Builds version `version` at `parent/v<version>` with `engines`, signed by `key`.
pub fn build_with(
    parent: &Path,
    key: &SigningKey,
    version: u64,
    engines: &mut dyn EngineStep,
) -> Built {
    let arch = small_arch();
    let state = random_state(&arch, version);
    let ranges = calibration(&arch);
    let classes = (0..arch.num_classes)
        .map(|i| format!("defect{i}"))
        .collect();
    let inputs = BundleInputs {
        arch: &arch,
        state: &state,
        calibration: Some(&ranges),
        metadata: BundleMetadata::new(version, classes, 0.3, "2025-01-01T00:00:00Z"),
    };
    let dir = parent.join(format!("v{version}"));
    let report = build_bundle(&dir, &inputs, key, engines).unwrap();
    let verified = verify_bundle(&dir, &key.verifying_key()).unwrap();
    let mut archive = Vec::new();
    pack(&verified, &mut archive).unwrap();
    Built {
        dir,
        archive,
        manifest_sha256: report.manifest_sha256,
    }
}

/// A bundle with ONNX only (as from a coordinator without trtexec).
pub fn build_onnx_only(parent: &Path, key: &SigningKey, version: u64) -> Built {
    let mut step = NoEngines {
        reason: "trtexec not found on the coordinator's PATH".into(),
    };
    build_with(parent, key, version, &mut step)
}

/// A bundle with FP16 and INT8 stand-in engines for [`sm86`].
pub fn build_with_engines(parent: &Path, key: &SigningKey, version: u64) -> Built {
    let tools = parent.join("coordinator-tools");
    let tool = standin_wrapper(&tools, &[]);
    let cache = EngineCache::open(&parent.join("coordinator-cache")).unwrap();
    let trt = Trtexec::probe(&tool, &tools.join("probe.log")).unwrap();
    let mut step = TrtexecEngines::new(
        &trt,
        &cache,
        vec![sm86()],
        vec![EnginePrecision::Fp16, EnginePrecision::Int8],
        Duration::from_secs(30),
    );
    build_with(parent, key, version, &mut step)
}

pub fn standin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/trtexec-standin")
        .canonicalize()
        .expect("scripts/trtexec-standin exists")
}

/// `dir/trtexec`: the stand-in with `env` set, recording its arguments in `dir/args.txt`.
pub fn standin_wrapper(dir: &Path, env: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    let mut script = format!(
        "#!/bin/sh\nexport TRTEXEC_STANDIN_ARGS_FILE='{}'\n",
        dir.join("args.txt").display()
    );
    for (k, v) in env {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    script.push_str(&format!("exec '{}' \"$@\"\n", standin().display()));
    let path = dir.join("trtexec");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// How many times the wrapper in `dir` ran (the probe included).
pub fn runs(dir: &Path) -> usize {
    fs::read_to_string(dir.join("args.txt"))
        .unwrap_or_default()
        .lines()
        .count()
}
