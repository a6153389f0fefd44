//! The coordinator's bundle builds: without trtexec the bundle carries ONNX only and its
//! manifest says why; with trtexec (the `scripts/trtexec-standin` stand-in: TensorRT cannot be
//! installed here) it carries an engine per configured target and precision, and a rebuild of
//! the same model takes them from the cache. Each stored bundle verifies with the coordinator's
//! public key, and its archive, read in chunks as DownloadBundle does, unpacks to it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::bundle::engine_cache::CacheOutcome;
use fedinspect_common::bundle::{unpack, verify_bundle, EnginePrecision, UnpackLimits};
use fedinspect_common::model::Tensor;
use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelState;
use fedinspect_coordinator::bundle::{
    BundleBuilder, BundleSettings, BundleStore, ModelForBundle, RawBundleSettings,
};

fn small_arch() -> ArchConfig {
    ArchConfig {
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        input_size: 64,
        ..ArchConfig::default()
    }
}

/// Deterministic weights for `arch` (an LCG), BatchNorm variances kept positive.
fn state(arch: &ArchConfig, seed: u64) -> ModelState {
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

fn settings(data_dir: &Path, toml_text: &str) -> BundleSettings {
    let raw: RawBundleSettings = toml::from_str(toml_text).unwrap();
    BundleSettings::resolve(raw, data_dir, data_dir).unwrap()
}

/// `dir/trtexec`: the stand-in, recording its arguments in `dir/args.txt`.
fn standin_in(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    let standin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/trtexec-standin")
        .canonicalize()
        .unwrap();
    let script = format!(
        "#!/bin/sh\nexport TRTEXEC_STANDIN_ARGS_FILE='{}'\nexec '{}' \"$@\"\n",
        dir.join("args.txt").display(),
        standin.display()
    );
    let path = dir.join("trtexec");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn runs(dir: &Path) -> usize {
    fs::read_to_string(dir.join("args.txt"))
        .unwrap_or_default()
        .lines()
        .count()
}

fn build(
    builder: &BundleBuilder,
    key: &SigningKey,
    version: u64,
) -> fedinspect_coordinator::bundle::BuiltBundle {
    let arch = small_arch();
    let st = state(&arch, version);
    let model = ModelForBundle {
        version,
        arch: &arch,
        state: &st,
        class_names: (0..6).map(|i| format!("c{i}")).collect(),
        metrics: BTreeMap::from([("map_50".to_string(), 0.42)]),
        calibration: None,
    };
    builder.build(&model, key).unwrap()
}

/// The archive read in 4 KiB chunks from the store, unpacked and verified.
fn download_and_verify(store: &BundleStore, id: &str, key: &SigningKey, into: &Path) {
    let mut bytes = Vec::new();
    loop {
        let chunk = store.read_chunk(id, bytes.len() as u64, 4096).unwrap();
        if chunk.is_empty() {
            break;
        }
        bytes.extend_from_slice(&chunk);
    }
    assert_eq!(bytes.len() as u64, store.archive_len(id).unwrap());
    fs::create_dir_all(into).unwrap();
    unpack(&bytes[..], into, &UnpackLimits::default()).unwrap();
    verify_bundle(into, &key.verifying_key()).unwrap();
}

#[test]
fn without_trtexec_the_bundle_is_onnx_only_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let data = dir.path().join("data");
    // Auto, and the search path holds no trtexec.
    let empty = dir.path().join("empty-bin");
    fs::create_dir(&empty).unwrap();
    let builder = BundleBuilder::start(settings(&data, ""), Some(OsString::from(&empty))).unwrap();
    let note = builder.engine_note().unwrap().to_string();
    assert!(note.contains("trtexec not found"), "{note}");

    let built = build(&builder, &key, 7);
    assert!(built.id.starts_with("v7-"), "{}", built.id);
    assert!(built.manifest.engines.is_empty());
    assert_eq!(built.manifest.engine_note, note);
    assert_eq!(built.manifest.metrics["map_50"], 0.42);
    assert!(built.dir.starts_with(data.join("bundles")));
    assert_eq!(builder.store().ids().unwrap(), vec![built.id.clone()]);
    download_and_verify(builder.store(), &built.id, &key, &dir.path().join("plant"));

    // Off is said as such.
    let off = BundleBuilder::start(settings(&data, "trtexec = \"off\""), None).unwrap();
    assert!(off.engine_note().unwrap().contains("off"));
}

#[test]
fn with_trtexec_engines_per_target_and_no_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let data = dir.path().join("data");
    let tools = dir.path().join("tools");
    let tool = standin_in(&tools);
    let text = format!(
        "trtexec = '{}'\nprecisions = ['fp16']\n[[targets]]\ncompute_capability = '8.6'\n\
         tensorrt_version = '100300'\n",
        tool.display()
    );
    let builder = BundleBuilder::start(settings(&data, &text), None).unwrap();
    assert_eq!(builder.engine_note(), None);

    let first = build(&builder, &key, 3);
    assert_eq!(first.manifest.engines.len(), 1);
    let engine = &first.manifest.engines[0];
    assert_eq!(engine.precision, EnginePrecision::Fp16);
    assert_eq!(engine.target.compute_capability, "8.6");
    assert_eq!(engine.tensorrt_version, "10.3.0");
    assert!(matches!(first.engines[0].1, CacheOutcome::Built { .. }));
    let engine_bytes = fs::read(first.dir.join(&engine.file)).unwrap();
    assert!(engine_bytes.starts_with(b"FEDINSPECT-TRTEXEC-STANDIN-ENGINE"));
    assert_eq!(runs(&tools), 2, "probe and one build");
    download_and_verify(builder.store(), &first.id, &key, &dir.path().join("plant"));

    // Same model again: the engine comes from the cache, trtexec does not run.
    let again = build(&builder, &key, 3);
    assert_eq!(again.engines[0].1, CacheOutcome::Hit);
    assert_eq!(runs(&tools), 2);
    assert_eq!(
        fs::read(again.dir.join(&engine.file)).unwrap(),
        engine_bytes
    );

    // A new version is a new engine.
    let next = build(&builder, &key, 4);
    assert!(matches!(next.engines[0].1, CacheOutcome::Built { .. }));
    assert_eq!(runs(&tools), 3);
}

#[test]
fn a_trtexec_found_without_targets_or_configured_but_missing_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tools = dir.path().join("tools");
    standin_in(&tools);
    let builder = BundleBuilder::start(settings(&data, ""), Some(OsString::from(&tools))).unwrap();
    let note = builder.engine_note().unwrap();
    assert!(
        note.contains("no bundles.targets configured") && note.contains("10.3.0"),
        "{note}"
    );

    let missing = settings(&data, "trtexec = '/nonexistent/bin/trtexec'");
    let err = BundleBuilder::start(missing, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("bundles.trtexec") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn the_store_refuses_ids_that_are_not_bundle_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = BundleStore::open(dir.path()).unwrap();
    for bad in ["../etc", "v1/../../x", ".v1", "x1", "v1.tar", ""] {
        assert!(store.read_chunk(bad, 0, 10).is_err(), "{bad}");
        assert!(store.dir(bad).is_err(), "{bad}");
    }
    // A build interrupted by a crash (a dot folder) is removed when the store opens.
    fs::create_dir(dir.path().join(".v1.new-1-0")).unwrap();
    BundleStore::open(dir.path()).unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}
