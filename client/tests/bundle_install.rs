//! Installing bundles at a plant: install → install → rollback round trips with the pointer
//! and pruning, every refusal (tampered, extra, missing, truncated file, wrong key, bad
//! signature, another manifest than the task named, path traversal and links in the archive)
//! leaving the running bundle in place, damaged installs detected, and engines built on
//! install with the trtexec stand-in (reported, cached, failures reported without blocking).

mod bundle_support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use bundle_support::*;
use fedinspect_client::bundle::{BundleInstaller, InstallError, InstallOptions, LocalEngines};
use fedinspect_common::bundle::{EnginePrecision, WEIGHTS_FILE};
use fedinspect_common::signing::SigningKey;

fn installer(state: &Path, key: &SigningKey) -> BundleInstaller {
    BundleInstaller::open(state, key.verifying_key()).unwrap()
}

fn current_id(i: &BundleInstaller) -> Option<String> {
    i.pointer().unwrap().current.map(|s| s.id)
}

/// Installed bundle folders (no staging leftovers allowed).
fn folders(i: &BundleInstaller) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(i.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "current.json")
        .collect();
    names.sort();
    names
}

#[test]
fn install_install_rollback_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let v1 = build_onnx_only(dir.path(), &key, 1);
    let v2 = build_onnx_only(dir.path(), &key, 2);
    let v3 = build_onnx_only(dir.path(), &key, 3);
    let plant = installer(&dir.path().join("state"), &key);
    assert!(plant.current().unwrap().is_none());

    let r1 = plant
        .install_archive(&v1.archive[..], &InstallOptions::default())
        .unwrap();
    assert_eq!(r1.model_version, 1);
    assert_eq!(r1.previous, None);
    assert!(!r1.engine_built_locally);
    let opts = InstallOptions {
        expected_manifest_sha256: Some(&v2.manifest_sha256),
        ..InstallOptions::default()
    };
    let r2 = plant.install_archive(&v2.archive[..], &opts).unwrap();
    assert_eq!(r2.previous.as_deref(), Some(r1.id.as_str()));
    assert!(
        r2.message.contains("previous") && r2.message.contains(&r1.id),
        "{}",
        r2.message
    );
    let running = plant.current().unwrap().unwrap();
    assert_eq!(running.bundle.manifest.model_version, 2);
    assert_eq!(running.bundle.manifest_sha256, v2.manifest_sha256);

    let back = plant.rollback().unwrap();
    assert_eq!(back.id, r1.id);
    assert_eq!(
        plant
            .current()
            .unwrap()
            .unwrap()
            .bundle
            .manifest
            .model_version,
        1
    );
    assert_eq!(plant.pointer().unwrap().previous.unwrap().id, r2.id);
    // Rolling back again returns to version 2.
    assert_eq!(plant.rollback().unwrap().id, r2.id);

    // Installing the current bundle again changes nothing.
    let again = plant
        .install_archive(&v2.archive[..], &InstallOptions::default())
        .unwrap();
    assert!(again.already_current, "{}", again.message);
    assert_eq!(current_id(&plant).as_deref(), Some(r2.id.as_str()));

    // A third bundle: version 2 is kept for rollback, version 1 is removed.
    let r3 = plant
        .install_dir(&v3.dir, &InstallOptions::default())
        .unwrap();
    assert_eq!(r3.previous.as_deref(), Some(r2.id.as_str()));
    assert_eq!(folders(&plant), {
        let mut v = vec![r2.id.clone(), r3.id.clone()];
        v.sort();
        v
    });
    // A new installer on the same state folder (a restart) sees the same.
    let reopened = installer(&dir.path().join("state"), &key);
    assert_eq!(current_id(&reopened).as_deref(), Some(r3.id.as_str()));
}

/// Every way a download can be wrong, installed over a running version 1.
#[test]
fn every_refusal_leaves_the_running_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let v1 = build_onnx_only(dir.path(), &key, 1);
    let v2 = build_onnx_only(dir.path(), &key, 2);
    let plant = installer(&dir.path().join("state"), &key);
    let r1 = plant
        .install_archive(&v1.archive[..], &InstallOptions::default())
        .unwrap();
    let before = fs::read(plant.root().join("current.json")).unwrap();

    let fp32_data = entry_data_offset(&v2.archive, "model-fp32.onnx");
    let mut tampered = v2.archive.clone();
    tampered[fp32_data + 100] ^= 0x01;

    let manifest_data = entry_data_offset(&v2.archive, "manifest.json");
    let mut edited = v2.archive.clone();
    let at = find(&edited[manifest_data..], b"\"score_threshold\": 0.3").unwrap() + manifest_data;
    edited[at..at + 22].copy_from_slice(b"\"score_threshold\": 0.9");

    let other_key = SigningKey::generate().unwrap();
    let foreign = build_onnx_only(&dir.path().join("foreign"), &other_key, 2);

    let with_extra = tar_of(&v2.dir, &[("extra.bin", b"unsigned".as_slice())], &[]);
    let without_weights = tar_of(&v2.dir, &[], &[WEIGHTS_FILE]);
    let traversal = hostile(b"../escaped", tar::EntryType::Regular);
    let link = hostile(b"weights.safetensors", tar::EntryType::Symlink);
    let truncated = v2.archive[..v2.archive.len() / 2].to_vec();

    let wrong_sha = "00".repeat(32);
    let expecting_other = InstallOptions {
        expected_manifest_sha256: Some(&wrong_sha),
        ..InstallOptions::default()
    };
    let plain = InstallOptions::default();
    let cases: Vec<(&str, &[u8], &InstallOptions, &str)> = vec![
        ("tampered file", &tampered, &plain, "altered"),
        ("bad signature", &edited, &plain, "does not verify"),
        (
            "wrong key",
            &foreign.archive,
            &plain,
            "pins coordinator key",
        ),
        ("extra file", &with_extra, &plain, "does not list"),
        (
            "missing file",
            &without_weights,
            &plain,
            "lacks weights.safetensors",
        ),
        ("truncated download", &truncated, &plain, "fetch"),
        (
            "path traversal",
            &traversal,
            &plain,
            "not a plain file name",
        ),
        ("symbolic link", &link, &plain, "symbolic link"),
        (
            "another manifest than the task's",
            &v2.archive,
            &expecting_other,
            "install task names",
        ),
    ];
    for (what, bytes, opts, expected) in cases {
        let err = plant.install_archive(bytes, opts).unwrap_err();
        assert!(matches!(err, InstallError::Refused(_)), "{what}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(expected),
            "{what}: '{expected}' not in: {text}"
        );
        assert!(text.contains("running bundle stays"), "{what}: {text}");
        assert_eq!(
            fs::read(plant.root().join("current.json")).unwrap(),
            before,
            "{what}"
        );
        assert_eq!(folders(&plant), vec![r1.id.clone()], "{what}: leftovers");
        assert_eq!(plant.current().unwrap().unwrap().id, r1.id, "{what}");
    }
    assert!(!dir.path().join("state/escaped").exists());
    assert!(!dir.path().join("state/bundles/escaped").exists());

    // A bundle folder holding a link is refused too.
    let linked = dir.path().join("linked");
    fedinspect_common::bundle::verify_bundle(&v2.dir, &key.verifying_key()).unwrap();
    fs::create_dir(&linked).unwrap();
    for e in fs::read_dir(&v2.dir).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), linked.join(e.file_name())).unwrap();
    }
    let err = plant.install_dir(&linked, &plain).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(fs::read(plant.root().join("current.json")).unwrap(), before);
}

#[test]
fn damaged_installs_are_detected_and_not_rolled_back_to() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let v1 = build_onnx_only(dir.path(), &key, 1);
    let v2 = build_onnx_only(dir.path(), &key, 2);
    let plant = installer(&dir.path().join("state"), &key);
    let r1 = plant
        .install_archive(&v1.archive[..], &InstallOptions::default())
        .unwrap();
    plant
        .install_archive(&v2.archive[..], &InstallOptions::default())
        .unwrap();
    assert!(plant.rollback().is_ok());
    assert!(plant.rollback().is_ok());
    // Damage the previous bundle (version 1): rolling back to it is refused.
    let weights = plant.root().join(&r1.id).join("bundle").join(WEIGHTS_FILE);
    let mut bytes = fs::read(&weights).unwrap();
    bytes[200] ^= 0xff;
    fs::write(&weights, bytes).unwrap();
    let before = plant.pointer().unwrap();
    let err = plant.rollback().unwrap_err();
    assert!(matches!(err, InstallError::Damaged { .. }), "{err}");
    assert!(err.to_string().contains("install it again"), "{err}");
    assert_eq!(plant.pointer().unwrap(), before);

    let fresh = installer(&dir.path().join("fresh"), &key);
    assert!(matches!(
        fresh.rollback().unwrap_err(),
        InstallError::NoPrevious
    ));
}

#[test]
fn engines_are_built_on_install_when_the_bundle_has_none() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let v1 = build_onnx_only(dir.path(), &key, 1);
    let v2 = build_onnx_only(dir.path(), &key, 2);
    let tools = dir.path().join("plant-tools");
    let tool = standin_wrapper(&tools, &[]);
    let cache = dir.path().join("state/engine-cache");
    let precisions = vec![EnginePrecision::Fp16, EnginePrecision::Int8];
    let engines = LocalEngines::detect(
        Some(&tool),
        "8.6",
        &cache,
        precisions.clone(),
        Duration::from_secs(30),
    )
    .unwrap()
    .unwrap();
    assert_eq!(engines.target(), &sm86());
    let plant = installer(&dir.path().join("state"), &key);
    let opts = InstallOptions {
        engines: Some(&engines),
        ..InstallOptions::default()
    };
    let r1 = plant.install_archive(&v1.archive[..], &opts).unwrap();
    assert!(r1.engine_built_locally);
    assert_eq!(r1.local_engines.len(), 2);
    assert!(r1.local_engines.iter().all(|l| !l.from_cache));
    assert!(
        r1.message
            .contains("engine built locally: fp16 sm86-trt10.3.0 built"),
        "{}",
        r1.message
    );
    assert_eq!(runs(&tools), 3, "probe and two builds");
    let running = plant.current().unwrap().unwrap();
    let (entry, path) = running.engine(&sm86(), EnginePrecision::Fp16).unwrap();
    assert_eq!(entry.source, "model-fp32.onnx");
    assert!(path.starts_with(plant.root().join(&r1.id).join("local")));
    assert!(fs::read_to_string(&path)
        .unwrap()
        .starts_with("FEDINSPECT-TRTEXEC-STANDIN-ENGINE"));
    assert!(
        plant
            .pointer()
            .unwrap()
            .current
            .unwrap()
            .engine_built_locally
    );

    // Version 2, rollback to 1, forward to 2 again: nothing is recompiled.
    plant.install_archive(&v2.archive[..], &opts).unwrap();
    assert_eq!(runs(&tools), 5);
    plant.rollback().unwrap();
    let forward = plant.install_archive(&v2.archive[..], &opts).unwrap();
    assert!(forward.engine_built_locally);
    assert_eq!(runs(&tools), 5);
    // Another state folder with the same engine cache takes the engines from the cache.
    let other = installer(&dir.path().join("state2"), &key);
    let r = other.install_archive(&v1.archive[..], &opts).unwrap();
    assert!(
        r.local_engines.iter().all(|l| l.from_cache),
        "{}",
        r.message
    );
    assert!(
        r.message.contains("from the plant's cache"),
        "{}",
        r.message
    );
    assert_eq!(runs(&tools), 5);

    // A local engine damaged on disk makes the install count as damaged.
    fs::write(&path, b"bits flipped").unwrap();
    let err = plant.open_installed(&r1.id).unwrap_err();
    assert!(err.to_string().contains("no longer matches"), "{err}");
}

#[test]
fn a_bundle_with_engines_for_this_gpu_needs_no_build_and_failures_do_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let with = build_with_engines(dir.path(), &key, 1);
    let tools = dir.path().join("plant-tools");
    let tool = standin_wrapper(&tools, &[("TRTEXEC_STANDIN_FAIL", "1")]);
    let engines = LocalEngines::detect(
        Some(&tool),
        "8.6",
        &dir.path().join("cache"),
        vec![EnginePrecision::Fp16],
        Duration::from_secs(30),
    )
    .unwrap()
    .unwrap();
    let opts = InstallOptions {
        engines: Some(&engines),
        ..InstallOptions::default()
    };
    let plant = installer(&dir.path().join("state"), &key);
    let r = plant.install_archive(&with.archive[..], &opts).unwrap();
    assert!(!r.engine_built_locally);
    assert_eq!(
        runs(&tools),
        1,
        "only the probe: the bundle ships the engine"
    );
    let running = plant.current().unwrap().unwrap();
    let (_, path) = running.engine(&sm86(), EnginePrecision::Fp16).unwrap();
    assert!(path.starts_with(plant.root().join(&r.id).join("bundle")));

    // An ONNX-only bundle on a plant whose trtexec fails: installed, failure reported.
    let onnx_only = build_onnx_only(&dir.path().join("b"), &key, 2);
    let r = plant
        .install_archive(&onnx_only.archive[..], &opts)
        .unwrap();
    assert!(!r.engine_built_locally);
    assert_eq!(r.engine_problems.len(), 1);
    assert!(
        r.message.contains("engine build failed, running ONNX"),
        "{}",
        r.message
    );
    assert!(
        r.message.contains("Failed to parse onnx file"),
        "{}",
        r.message
    );
    assert_eq!(
        plant
            .current()
            .unwrap()
            .unwrap()
            .bundle
            .manifest
            .model_version,
        2
    );
}

#[test]
fn a_plant_without_trtexec_detects_none() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalEngines::detect(
        Some(&dir.path().join("missing/trtexec")),
        "8.6",
        &dir.path().join("cache"),
        vec![EnginePrecision::Fp16],
        Duration::from_secs(1),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// Offset of the data of entry `name` in a ustar stream written by `pack`.
fn entry_data_offset(archive: &[u8], name: &str) -> usize {
    let mut at = 0;
    while at + 512 <= archive.len() {
        let header = &archive[at..at + 512];
        let len = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let size_text = std::str::from_utf8(&header[124..136]).unwrap();
        let size =
            usize::from_str_radix(size_text.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .unwrap_or(0);
        if &header[..len] == name.as_bytes() {
            return at + 512;
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    panic!("{name} not in the archive");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A tar of the files of `dir` minus `skip`, plus `extra` (name, content).
fn tar_of(dir: &Path, extra: &[(&str, &[u8])], skip: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !skip.contains(&n.as_str()))
        .collect();
    names.sort();
    for n in names {
        b.append_path_with_name(dir.join(&n), &n).unwrap();
    }
    for (name, data) in extra {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// One entry with a raw (possibly hostile) name and type.
fn hostile(name: &[u8], kind: tar::EntryType) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(0o644);
    if kind == tar::EntryType::Symlink {
        h.set_link_name("/etc/passwd").unwrap();
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[0u8; 1024]);
    out
}
