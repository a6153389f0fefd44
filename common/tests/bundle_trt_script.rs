//! `scripts/trt_build_and_time.sh`, the real-TensorRT build and latency script, run against
//! the trtexec stand-in to check its plumbing (the stand-in measures nothing): the commands it
//! runs, the engines and summary it writes, and its refusals (the stand-in without
//! ALLOW_STANDIN, an ONNX file that does not match the manifest).

mod bundle_support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use bundle_support::*;
use fedinspect_common::signing::SigningKey;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/trt_build_and_time.sh")
}

fn run(bundle: &Path, out: &Path, trtexec: &Path, allow_standin: bool) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .arg(bundle)
        .arg(out)
        .env("TRTEXEC", trtexec)
        .env("ITERATIONS", "10")
        .env("AVG_RUNS", "5");
    if allow_standin {
        cmd.env("ALLOW_STANDIN", "1");
    }
    cmd.output().unwrap()
}

fn python3_present() -> bool {
    let found = Command::new("python3").arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: python3 not found; trt_build_and_time.sh reads manifest.json with it");
    }
    found
}

#[test]
fn builds_and_times_every_precision_with_the_documented_commands() {
    if !python3_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let bundle = dir.path().join("bundle");
    build_small(&bundle, &key, 1, &mut no_engines());
    let tools = dir.path().join("tools");
    let tool = standin_wrapper(&tools, &[]);
    let out = dir.path().join("out");

    let refused = run(&bundle, &out, &tool, false);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("stand-in"), "{stderr}");

    let ran = run(&bundle, &out, &tool, true);
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(ran.status.success(), "{stderr}");
    for p in ["fp32", "fp16", "int8"] {
        let engine = fs::read_to_string(out.join(format!("engine-{p}.plan"))).unwrap();
        assert!(engine.contains(&format!("precision={p}")), "{engine}");
    }
    let summary = fs::read_to_string(out.join("summary.txt")).unwrap();
    assert_eq!(
        summary.matches("Latency: min = nan ms").count(),
        3,
        "{summary}"
    );
    assert!(summary.contains("input: images 1x2x64x64 (engines built for batch 1..8)"));

    let runs = recorded_runs(&tools);
    let builds: Vec<_> = runs
        .iter()
        .filter(|r| r.iter().any(|a| a.starts_with("--onnx=")))
        .collect();
    let timings: Vec<_> = runs
        .iter()
        .filter(|r| r.iter().any(|a| a.starts_with("--loadEngine=")))
        .collect();
    assert_eq!((builds.len(), timings.len()), (3, 3), "{runs:?}");
    let int8 = builds
        .iter()
        .find(|r| r.contains(&"--int8".to_string()))
        .unwrap();
    assert!(
        int8.iter().any(|a| a.ends_with("model-int8-qdq.onnx")),
        "{int8:?}"
    );
    for expected in ["--skipInference", "--maxShapes=images:8x2x64x64", "--fp16"] {
        assert!(
            int8.contains(&expected.to_string()),
            "{expected} not in {int8:?}"
        );
    }
    for t in &timings {
        for expected in [
            "--shapes=images:1x2x64x64",
            "--iterations=10",
            "--avgRuns=5",
            "--duration=0",
        ] {
            assert!(t.contains(&expected.to_string()), "{expected} not in {t:?}");
        }
    }
}

#[test]
fn an_onnx_file_that_does_not_match_the_manifest_is_refused() {
    if !python3_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let bundle = dir.path().join("bundle");
    build_small(&bundle, &key, 1, &mut no_engines());
    let onnx = bundle.join("model-fp32.onnx");
    let mut bytes = fs::read(&onnx).unwrap();
    bytes[1000] ^= 1;
    fs::write(&onnx, bytes).unwrap();
    let tool = standin_wrapper(&dir.path().join("tools"), &[]);
    let ran = run(&bundle, &dir.path().join("out"), &tool, true);
    assert_eq!(ran.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(stderr.contains("but the manifest says"), "{stderr}");
}
