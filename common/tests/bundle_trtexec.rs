//! The trtexec orchestration, run against `scripts/trtexec-standin` (a stand-in: TensorRT
//! cannot be installed here): the arguments it gets, the time limit killing it (and its
//! children), failures carrying the log tail, the engine cache (a second build is a hit, a
//! damaged entry is rebuilt), target checks, and engines inside a signed bundle.

mod bundle_support;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use bundle_support::*;
use fedinspect_common::bundle::engine_cache::{CacheOutcome, EngineCache, EngineRequest};
use fedinspect_common::bundle::trtexec::{locate, Trtexec, TrtexecError};
use fedinspect_common::bundle::{
    engine_file_name, verify_bundle, EnginePrecision, EngineTarget, FileRole, TrtexecEngines,
};
use fedinspect_common::signing::SigningKey;

const HEADER: &str = "FEDINSPECT-TRTEXEC-STANDIN-ENGINE";

fn target(cc: &str, trt: &str) -> EngineTarget {
    EngineTarget {
        compute_capability: cc.into(),
        tensorrt_version: trt.into(),
    }
}

/// An ONNX-like input file and its SHA-256 (the stand-in only hashes it).
fn onnx_file(dir: &Path, content: &[u8]) -> (std::path::PathBuf, String) {
    let p = dir.join("model.onnx");
    fs::write(&p, content).unwrap();
    let sha = fedinspect_common::bundle::sha256_file(&p).unwrap().0;
    (p, sha)
}

fn request<'a>(
    onnx: &'a Path,
    sha: &'a str,
    precision: EnginePrecision,
    target: &'a EngineTarget,
    timeout: Duration,
) -> EngineRequest<'a> {
    EngineRequest {
        onnx,
        onnx_sha256: sha,
        precision,
        target,
        input_name: "images",
        input_chw: [2, 64, 64],
        max_batch: 8,
        timeout,
    }
}

fn probe(tool: &Path, cache: &EngineCache) -> Trtexec {
    Trtexec::probe(tool, &cache.root().join("logs/probe.log")).unwrap()
}

#[test]
fn probe_reads_the_version_and_locate_checks_a_configured_path() {
    let dir = tempfile::tempdir().unwrap();
    let tool = standin_wrapper(&dir.path().join("t10"), &[]);
    let log = dir.path().join("probe.log");
    let t = Trtexec::probe(&tool, &log).unwrap();
    assert_eq!(t.version(), "10.3.0");
    let tool8 = standin_wrapper(
        &dir.path().join("t8"),
        &[("TRTEXEC_STANDIN_VERSION", "8601")],
    );
    assert_eq!(Trtexec::probe(&tool8, &log).unwrap().version(), "8.6.1");
    assert_eq!(recorded_runs(&dir.path().join("t10")), [["--help"]]);

    assert_eq!(
        locate(Some(&tool)).unwrap().as_deref(),
        Some(tool.as_path())
    );
    let missing = dir.path().join("nope/trtexec");
    assert!(matches!(
        locate(Some(&missing)),
        Err(TrtexecError::NotFound { .. })
    ));
    let not_exec = dir.path().join("plain");
    fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let err = locate(Some(&not_exec)).unwrap_err();
    assert!(matches!(err, TrtexecError::NotExecutable { .. }), "{err}");
    // Something that is not trtexec is named as such.
    let err = Trtexec::probe(Path::new("/bin/true"), &log).unwrap_err();
    assert!(matches!(err, TrtexecError::NoVersion { .. }), "{err}");
}

#[test]
fn builds_with_the_documented_arguments_then_hits_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    let tool = standin_wrapper(&tools, &[]);
    let cache = EngineCache::open(&dir.path().join("cache")).unwrap();
    let trt = probe(&tool, &cache);
    let (onnx, sha) = onnx_file(dir.path(), b"model one");
    let sm86 = target("8.6", "10.3.0");
    let req = request(
        &onnx,
        &sha,
        EnginePrecision::Fp16,
        &sm86,
        Duration::from_secs(30),
    );

    let built = cache.get_or_build(&trt, &req).unwrap();
    assert!(matches!(
        built.outcome,
        CacheOutcome::Built {
            replaced_corrupt: false,
            ..
        }
    ));
    let engine = fs::read_to_string(&built.engine).unwrap();
    assert!(engine.starts_with(HEADER), "{engine}");
    assert!(
        engine.contains("precision=fp16") && engine.contains(&sha),
        "{engine}"
    );
    assert_eq!(built.record.tensorrt_version, "10.3.0");
    assert!(built.log.exists());

    let runs = recorded_runs(&tools);
    assert_eq!(runs.len(), 2, "probe and one build: {runs:?}");
    let args = &runs[1];
    let timing = cache.timing_cache(&sm86);
    let expected_fixed = [
        format!("--onnx={}", onnx.display()),
        format!("--timingCacheFile={}", timing.display()),
        "--skipInference".into(),
        "--minShapes=images:1x2x64x64".into(),
        "--optShapes=images:1x2x64x64".into(),
        "--maxShapes=images:8x2x64x64".into(),
        "--fp16".into(),
    ];
    for a in &expected_fixed {
        assert!(args.contains(a), "missing {a} in {args:?}");
    }
    assert!(
        args.iter().any(|a| a.starts_with("--saveEngine=")),
        "{args:?}"
    );
    assert!(!args.contains(&"--int8".to_string()));
    assert!(timing.exists(), "timing cache not kept");

    // Same model, precision and target: no trtexec run.
    let hit = cache.get_or_build(&trt, &req).unwrap();
    assert_eq!(hit.outcome, CacheOutcome::Hit);
    assert_eq!(hit.engine, built.engine);
    assert_eq!(recorded_runs(&tools).len(), 2);

    // INT8 is another engine, built with --int8, sharing the target's timing cache.
    let int8 = request(
        &onnx,
        &sha,
        EnginePrecision::Int8,
        &sm86,
        Duration::from_secs(30),
    );
    let b = cache.get_or_build(&trt, &int8).unwrap();
    assert!(matches!(b.outcome, CacheOutcome::Built { .. }));
    let runs = recorded_runs(&tools);
    assert!(runs[2].contains(&"--int8".to_string()), "{:?}", runs[2]);
    assert!(runs[2].contains(&format!("--timingCacheFile={}", timing.display())));
    let lines = fs::read_to_string(&timing).unwrap().lines().count();
    assert_eq!(lines, 2, "the timing cache was not kept between builds");

    // A damaged cached engine is rebuilt, not used.
    fs::write(&built.engine, b"garbage").unwrap();
    let rebuilt = cache.get_or_build(&trt, &req).unwrap();
    assert!(matches!(
        rebuilt.outcome,
        CacheOutcome::Built {
            replaced_corrupt: true,
            ..
        }
    ));
    assert!(fs::read_to_string(&rebuilt.engine)
        .unwrap()
        .starts_with(HEADER));
    assert_eq!(recorded_runs(&tools).len(), 4);
}

#[test]
fn a_hanging_trtexec_is_killed_with_its_children_at_the_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("standin.pid");
    let env = [
        ("TRTEXEC_STANDIN_HANG", "1"),
        ("TRTEXEC_STANDIN_PID_FILE", pid_file.to_str().unwrap()),
    ];
    // The stand-in runs as a child of the wrapper: killing only the wrapper would leave it.
    let tool = standin_wrapper_with_child(&dir.path().join("tools"), &env);
    let cache = EngineCache::open(&dir.path().join("cache")).unwrap();
    let trt = probe(&tool, &cache);
    let (onnx, sha) = onnx_file(dir.path(), b"m");
    let sm86 = target("8.6", "10.3.0");
    let req = request(
        &onnx,
        &sha,
        EnginePrecision::Fp16,
        &sm86,
        Duration::from_secs(1),
    );
    let started = Instant::now();
    let err = cache.get_or_build(&trt, &req).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let TrtexecError::Timeout { seconds, log, tail } = &err else {
        panic!("expected a timeout, got {err}");
    };
    assert_eq!(*seconds, 1);
    assert!(tail.contains("hanging as asked"), "{tail}");
    assert!(fs::read_to_string(log).unwrap().contains("killed after"));
    assert!(err.to_string().contains("raise the build timeout"), "{err}");

    let pid: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        process_gone(pid),
        "stand-in {pid} still runs after the time limit"
    );
    assert!(cache.lookup(&req).is_none());
    let staged = fs::read_dir(cache.root().join("engines")).unwrap().count();
    assert_eq!(staged, 0, "a staging folder was left behind");
}

/// Whether `pid` has exited (gone, or a zombie waiting for its reaper), within 5 s.
fn process_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) => {
                let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
                if matches!(state, Some('Z') | Some('X')) {
                    return true;
                }
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn failures_carry_the_log_tail_and_leave_no_cache_entry() {
    let dir = tempfile::tempdir().unwrap();
    let sm86 = target("8.6", "10.3.0");
    let (onnx, sha) = onnx_file(dir.path(), b"m");
    let run = |name: &str, env: &[(&str, &str)]| {
        let tool = standin_wrapper(&dir.path().join(name), env);
        let cache = EngineCache::open(&dir.path().join(format!("cache-{name}"))).unwrap();
        let trt = probe(&tool, &cache);
        let req = request(
            &onnx,
            &sha,
            EnginePrecision::Fp16,
            &sm86,
            Duration::from_secs(30),
        );
        let err = cache.get_or_build(&trt, &req).unwrap_err();
        assert!(cache.lookup(&req).is_none());
        (err, cache)
    };

    let (err, _) = run("fail", &[("TRTEXEC_STANDIN_FAIL", "1")]);
    let TrtexecError::Failed { status, log, tail } = &err else {
        panic!("expected a failure, got {err}");
    };
    assert_eq!(status, "exit status 1");
    assert!(tail.contains("Failed to parse onnx file"), "{tail}");
    assert!(fs::read_to_string(log)
        .unwrap()
        .contains("ModelImporter.cpp"));
    let text = err.to_string();
    assert!(
        text.contains("Failed to parse onnx file") && text.contains("Full log"),
        "{text}"
    );

    let (err, _) = run("noengine", &[("TRTEXEC_STANDIN_NO_ENGINE", "1")]);
    assert!(matches!(err, TrtexecError::NoEngine { .. }), "{err}");

    let (err, _) = run("gpu", &[("TRTEXEC_STANDIN_COMPUTE_CAPABILITY", "7.5")]);
    assert!(
        matches!(&err, TrtexecError::WrongDevice { wanted, found, .. } if wanted == "8.6" && found == "7.5"),
        "{err}"
    );

    // A target of another TensorRT version is refused before trtexec runs.
    let tool = standin_wrapper(&dir.path().join("trt"), &[]);
    let cache = EngineCache::open(&dir.path().join("cache-trt")).unwrap();
    let trt = probe(&tool, &cache);
    let old = target("8.6", "8.6.1");
    let req = request(
        &onnx,
        &sha,
        EnginePrecision::Fp16,
        &old,
        Duration::from_secs(30),
    );
    let err = cache.get_or_build(&trt, &req).unwrap_err();
    assert!(matches!(err, TrtexecError::WrongTensorRt { .. }), "{err}");
    assert_eq!(
        recorded_runs(&dir.path().join("trt")).len(),
        1,
        "only the probe ran"
    );
}

#[test]
fn engines_in_a_signed_bundle_and_no_recompile_of_an_unchanged_model() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    let tool = standin_wrapper(&tools, &[]);
    let cache = EngineCache::open(&dir.path().join("cache")).unwrap();
    let trt = probe(&tool, &cache);
    let key = SigningKey::generate().unwrap();
    let sm86 = target("8.6", "10.3.0");
    let precisions = vec![EnginePrecision::Fp16, EnginePrecision::Int8];
    let mut step = TrtexecEngines::new(
        &trt,
        &cache,
        vec![sm86.clone()],
        precisions.clone(),
        Duration::from_secs(30),
    );
    let first = dir.path().join("first");
    build_small(&first, &key, 5, &mut step);
    assert!(step
        .built
        .iter()
        .all(|(_, o)| matches!(o, CacheOutcome::Built { .. })));
    let bundle = verify_bundle(&first, &key.verifying_key()).unwrap();
    let m = &bundle.manifest;
    assert_eq!(m.engines.len(), 2);
    for p in &precisions {
        let e = m.engine_for(&sm86, *p).unwrap();
        assert_eq!(e.file, engine_file_name(*p, &sm86));
        assert_eq!(e.tensorrt_version, "10.3.0");
        assert_eq!(m.file(&e.file).unwrap().role, FileRole::Engine);
        let content = fs::read_to_string(first.join(&e.file)).unwrap();
        let source_sha = &m.file(&e.source).unwrap().sha256;
        assert!(
            content.contains(source_sha),
            "engine not built from {}",
            e.source
        );
    }
    assert!(
        m.engine_note.contains("TensorRT 10.3.0"),
        "{}",
        m.engine_note
    );
    let runs = recorded_runs(&tools).len();

    // The same model again (a rebuilt bundle): both engines come from the cache.
    let mut again = TrtexecEngines::new(
        &trt,
        &cache,
        vec![sm86],
        precisions,
        Duration::from_secs(30),
    );
    build_small(&dir.path().join("second"), &key, 5, &mut again);
    assert!(again.built.iter().all(|(_, o)| *o == CacheOutcome::Hit));
    assert_eq!(
        recorded_runs(&tools).len(),
        runs,
        "an unchanged model was recompiled"
    );
}
