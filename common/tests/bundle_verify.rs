//! Building a bundle and verifying it: what the manifest says, that the files are what the
//! weights and exports are, and every refusal (tampered, extra, missing, truncated file, wrong
//! key, bad or malformed signature, links, newer format, unsafe names) with the error that names
//! the cause.

mod bundle_support;

use std::fs;
use std::path::Path;

use bundle_support::*;
use fedinspect_common::bundle::{
    build_bundle, manifest_sha256, sign_manifest, verify_bundle, BundleError, BundleInputs,
    FileRole, MANIFEST_FILE, ONNX_FP32_FILE, ONNX_INT8_QDQ_FILE, SIGNATURE_FILE, WEIGHTS_FILE,
};
use fedinspect_common::onnx;
use fedinspect_common::signing::SigningKey;
use fedinspect_common::ModelState;

#[test]
fn build_then_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("v3");
    let report = build_small(&out, &key, 3, &mut no_engines());

    let bundle = verify_bundle(&out, &key.verifying_key()).unwrap();
    let m = &bundle.manifest;
    let arch = small_arch();
    let state = random_state(&arch, 3);
    assert_eq!(m.model_version, 3);
    assert_eq!(m.model_hash, state.content_hash().to_hex());
    assert_eq!(m.architecture, arch);
    assert_eq!(m.class_names, class_names(&arch));
    assert_eq!(m.score_threshold, 0.3);
    assert_eq!(m.metrics["map_50"], 0.5);
    assert!(m.engines.is_empty());
    assert_eq!(m.engine_note, "test: no trtexec");
    let roles: Vec<_> = m.files.iter().map(|f| (f.role, f.name.as_str())).collect();
    assert_eq!(
        roles,
        [
            (FileRole::OnnxFp32, ONNX_FP32_FILE),
            (FileRole::OnnxInt8Qdq, ONNX_INT8_QDQ_FILE),
            (FileRole::WeightsSafetensors, WEIGHTS_FILE),
        ]
    );
    let manifest_bytes = fs::read(out.join(MANIFEST_FILE)).unwrap();
    assert_eq!(bundle.manifest_sha256, manifest_sha256(&manifest_bytes));
    assert_eq!(report.manifest_sha256, bundle.manifest_sha256);
    assert_eq!(bundle.key_id, key.verifying_key().key_id());

    // The weights are the state; the ONNX files are its exports.
    let (weights, meta) = ModelState::load_safetensors(&out.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(weights.content_hash(), state.content_hash());
    assert_eq!(meta["fedinspect.model_version"], "3");
    let fp32 = onnx::decode(&fs::read(out.join(ONNX_FP32_FILE)).unwrap()).unwrap();
    let hash_prop = fp32
        .metadata_props
        .iter()
        .find(|p| p.key.as_deref() == Some(onnx::META_MODEL_HASH))
        .unwrap();
    assert_eq!(hash_prop.value.as_deref(), Some(m.model_hash.as_str()));
    assert_eq!(fp32.model_version, Some(3));

    // Staging left nothing beside the bundle.
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn build_refuses_an_existing_destination_and_bad_metadata_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("b");
    fs::create_dir(&out).unwrap();
    let arch = small_arch();
    let state = random_state(&arch, 1);
    let inputs = BundleInputs {
        arch: &arch,
        state: &state,
        calibration: None,
        metadata: metadata(&arch, 1),
    };
    let err = build_bundle(&out, &inputs, &key, &mut no_engines()).unwrap_err();
    assert!(
        matches!(err, BundleError::DestinationExists { .. }),
        "{err}"
    );

    let mut bad = metadata(&arch, 1);
    bad.class_names.pop();
    bad.model_name = "has space".into();
    let inputs = BundleInputs {
        metadata: bad,
        ..inputs
    };
    let other = dir.path().join("c");
    let err = build_bundle(&other, &inputs, &key, &mut no_engines()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("5 class names") && text.contains("model name"),
        "{text}"
    );
    assert!(!other.exists());
    // A state that does not fit the architecture fails in the export, and leaves nothing.
    let wrong = ModelState::new();
    let inputs = BundleInputs {
        state: &wrong,
        metadata: metadata(&arch, 1),
        ..inputs
    };
    let err = build_bundle(&other, &inputs, &key, &mut no_engines()).unwrap_err();
    assert!(matches!(err, BundleError::Export(_)), "{err}");
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "staging folders left: {left:?}");
}

/// A fresh copy of a built bundle, damaged by `damage`, and the verification error.
fn refusal(damage: impl FnOnce(&Path)) -> BundleError {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let good = dir.path().join("good");
    build_small(&good, &key, 2, &mut no_engines());
    let copy = dir.path().join("copy");
    copy_dir(&good, &copy);
    damage(&copy);
    verify_bundle(&copy, &key.verifying_key()).unwrap_err()
}

#[test]
fn a_tampered_file_is_refused_by_hash() {
    let err = refusal(|d| {
        let p = d.join(ONNX_FP32_FILE);
        let mut bytes = fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(&p, bytes).unwrap();
    });
    assert!(
        matches!(&err, BundleError::HashMismatch { name, .. } if name == ONNX_FP32_FILE),
        "{err}"
    );
    assert!(err.to_string().contains("altered"), "{err}");
}

#[test]
fn a_truncated_file_is_refused_as_truncated() {
    let err = refusal(|d| {
        let p = d.join(WEIGHTS_FILE);
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    });
    assert!(
        matches!(&err, BundleError::SizeMismatch { name, .. } if name == WEIGHTS_FILE),
        "{err}"
    );
    assert!(err.to_string().contains("(truncated)"), "{err}");
}

#[test]
fn missing_and_extra_files_are_refused() {
    let err = refusal(|d| fs::remove_file(d.join(ONNX_INT8_QDQ_FILE)).unwrap());
    assert!(
        matches!(&err, BundleError::MissingFile { name, .. } if name == ONNX_INT8_QDQ_FILE),
        "{err}"
    );
    let err = refusal(|d| fs::write(d.join("extra.onnx"), b"x").unwrap());
    assert!(
        matches!(&err, BundleError::UnexpectedFile { name, .. } if name == "extra.onnx"),
        "{err}"
    );
    let err = refusal(|d| fs::create_dir(d.join("sub")).unwrap());
    assert!(
        matches!(&err, BundleError::UnexpectedFile { name, .. } if name == "sub"),
        "{err}"
    );
    let err = refusal(|d| fs::remove_file(d.join(SIGNATURE_FILE)).unwrap());
    assert!(matches!(err, BundleError::MissingManifest { .. }), "{err}");
}

#[test]
fn a_listed_file_replaced_by_a_link_is_refused() {
    let err = refusal(|d| {
        let real = d.join("../weights-elsewhere");
        fs::rename(d.join(WEIGHTS_FILE), &real).unwrap();
        std::os::unix::fs::symlink(&real, d.join(WEIGHTS_FILE)).unwrap();
    });
    assert!(
        matches!(&err, BundleError::NotARegularFile { name, .. } if name == WEIGHTS_FILE),
        "{err}"
    );
}

#[test]
fn wrong_key_and_bad_signatures_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("b");
    build_small(&out, &key, 1, &mut no_engines());
    let other = SigningKey::generate().unwrap();
    let err = verify_bundle(&out, &other.verifying_key()).unwrap_err();
    assert!(matches!(err, BundleError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("pins coordinator key"), "{err}");

    // An edited manifest (a lower score threshold, say) no longer matches its signature.
    let err = refusal(|d| {
        let p = d.join(MANIFEST_FILE);
        let text = fs::read_to_string(&p).unwrap();
        fs::write(
            &p,
            text.replace("\"score_threshold\": 0.3", "\"score_threshold\": 0.9"),
        )
        .unwrap();
    });
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");

    // A signature by another key under the pinned key's id.
    let err = refusal(|d| {
        let bytes = fs::read(d.join(MANIFEST_FILE)).unwrap();
        let forged = sign_manifest(&bytes, &SigningKey::generate().unwrap());
        let mut sig: serde_json::Value =
            serde_json::from_slice(&fs::read(d.join(SIGNATURE_FILE)).unwrap()).unwrap();
        sig["signature"] = forged.signature.into();
        fs::write(d.join(SIGNATURE_FILE), sig.to_string()).unwrap();
    });
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");

    let err = refusal(|d| fs::write(d.join(SIGNATURE_FILE), b"not json").unwrap());
    assert!(
        matches!(err, BundleError::SignatureMalformed { .. }),
        "{err}"
    );
}

/// Re-signs an edited manifest with the right key: what a signed but unusable manifest gives.
fn resigned(edit: impl Fn(&mut serde_json::Value)) -> BundleError {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("b");
    build_small(&out, &key, 1, &mut no_engines());
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    let sig = sign_manifest(&bytes, &key);
    fs::write(out.join(MANIFEST_FILE), &bytes).unwrap();
    fs::write(out.join(SIGNATURE_FILE), serde_json::to_vec(&sig).unwrap()).unwrap();
    verify_bundle(&out, &key.verifying_key()).unwrap_err()
}

#[test]
fn signed_manifests_this_version_cannot_use_are_refused() {
    let err = resigned(|m| m["format"] = "fedinspect-bundle-v2".into());
    assert!(
        matches!(&err, BundleError::UnsupportedFormat { found } if found == "fedinspect-bundle-v2"),
        "{err}"
    );
    let err = resigned(|m| m["files"][0]["name"] = "../model-fp32.onnx".into());
    assert!(
        matches!(err, BundleError::ManifestMalformed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not allowed"), "{err}");
    let err = resigned(|m| m["new_field"] = 1.into());
    assert!(
        matches!(err, BundleError::ManifestMalformed { .. }),
        "{err}"
    );
}
