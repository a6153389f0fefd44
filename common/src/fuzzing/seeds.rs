//! The seed corpus: small valid (and a few deliberately refused) inputs for every target, made
//! by our own encoders, so that fuzzing starts deep inside each format.
//! `common/tests/fuzz_corpus.rs` writes them to `common/fuzz/corpus/<target>/` (an ignored
//! test) and checks that the kept ones still do what they were made for.

use std::collections::BTreeMap;
use std::fs;

use ring::digest;

use super::bundle::{Scratch, ARCHIVE_RESIGN};
use super::onnx_seed::onnx_seed;
use super::{delta_base, Target, DELTA_EXPECT_SHIFT, DELTA_RESEAL, DELTA_TRICKLE, SEED_Q8_BLOCK};
use crate::arch::{ArchConfig, OUTPUT_STRIDE};
use crate::bundle::{
    default_preprocessing, pack, sign_manifest, verify_bundle, BundleManifest, Dim, EngineEntry,
    EnginePrecision, EngineTarget, FileEntry, FileRole, InputSpec, OutputSpec, Postprocessing,
    FORMAT, MANIFEST_FILE, ONNX_FP32_FILE, ONNX_INT8_QDQ_FILE, SIGNATURE_FILE, WEIGHTS_FILE,
};
use crate::delta::{self, Codec};
use crate::model::ModelState;
use crate::signing::SigningKey;

/// One seed input.
pub struct Seed {
    pub target: Target,
    /// Its file name in the target's corpus folder.
    pub name: &'static str,
    pub bytes: Vec<u8>,
    /// Whether the target accepts it; the others are refused on purpose, to start the fuzzer
    /// on an error path.
    pub accepted: bool,
}

/// Every seed of every target.
pub fn seeds() -> Vec<Seed> {
    let mut out = delta_seeds();
    out.extend(safetensors_seeds());
    out.extend(manifest_seeds());
    out.extend(archive_seeds());
    out.push(seed(Target::Onnx, "small_graph", onnx_seed(), true));
    out
}

fn seed(target: Target, name: &'static str, bytes: Vec<u8>, accepted: bool) -> Seed {
    Seed {
        target,
        name,
        bytes,
        accepted,
    }
}

/// The delta base layout filled with values at the codecs' edges: signed zero, a subnormal,
/// the f16 limit, values that f16 rounds.
pub(super) fn seed_model() -> ModelState {
    const VALUES: [f32; 8] = [0.5, -0.0, 1e-40, -3.25, 6.1e-5, -65504.0, 0.1, 1000.0];
    let mut model = delta_base().0.clone();
    let mut next = VALUES.iter().cycle();
    for (_, t) in model.iter_mut() {
        for v in t.data_mut() {
            *v = *next.next().expect("the cycle never ends");
        }
    }
    model
}

fn delta_seeds() -> Vec<Seed> {
    let model = seed_model();
    let q8 = Codec::Q8 {
        block: SEED_Q8_BLOCK,
    };
    let cases = [
        ("f32", Codec::F32, 0),
        (
            "f32_expected_trickle",
            Codec::F32,
            (1 << DELTA_EXPECT_SHIFT) | DELTA_TRICKLE,
        ),
        ("f16_expected", Codec::F16, 2 << DELTA_EXPECT_SHIFT),
        (
            "q8_block7_expected_resealed",
            q8,
            (3 << DELTA_EXPECT_SHIFT) | DELTA_RESEAL,
        ),
        ("q8_default_trickle", Codec::q8(), DELTA_TRICKLE),
    ];
    cases
        .into_iter()
        .map(|(name, codec, flags)| {
            let mut bytes = vec![flags];
            delta::encode(&model, codec, &mut bytes).expect("the seed model encodes");
            seed(Target::Delta, name, bytes, true)
        })
        .collect()
}

fn safetensors_seeds() -> Vec<Seed> {
    let metadata = BTreeMap::from([
        (
            "fedinspect.format".to_string(),
            "fedinspect-detector-checkpoint-v1".to_string(),
        ),
        ("fedinspect.epoch".to_string(), "3".to_string()),
    ]);
    let with_metadata = seed_model()
        .to_safetensors_bytes(&metadata)
        .expect("the seed model serialises");
    let empty = ModelState::new()
        .to_safetensors_bytes(&BTreeMap::new())
        .expect("an empty model serialises");
    // A half-precision tensor, as Python writes one: read, then refused for its dtype.
    let header = r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#;
    let mut f16 = (header.len() as u64).to_le_bytes().to_vec();
    f16.extend_from_slice(header.as_bytes());
    f16.extend_from_slice(&[0x00, 0x3c, 0x00, 0xc0]);
    vec![
        seed(
            Target::Safetensors,
            "model_with_metadata",
            with_metadata,
            true,
        ),
        seed(Target::Safetensors, "empty_model", empty, true),
        seed(Target::Safetensors, "f16_tensor", f16, false),
    ]
}

/// Makes a valid manifest break one check.
type BreakManifest = fn(&mut BundleManifest);

/// Two valid manifests, and one refused manifest per check of `BundleManifest::check` that
/// byte-level mutations of JSON rarely reach on their own.
fn manifest_seeds() -> Vec<Seed> {
    let full = seed_manifest(&seed_files(true));
    let minimal = seed_manifest(&seed_files(false));
    let broken: [(&str, BreakManifest); 8] = [
        ("file_listed_twice", |m| m.files.push(m.files[0].clone())),
        ("bad_file_hash", |m| {
            m.files[1].sha256.make_ascii_uppercase()
        }),
        ("engine_wrong_source", |m| {
            m.engines[0].source = WEIGHTS_FILE.into()
        }),
        ("engine_file_without_entry", |m| {
            m.engines.pop();
        }),
        ("two_engines_one_target", |m| {
            m.engines[1].precision = m.engines[0].precision
        }),
        ("class_names_mismatch", |m| {
            m.class_names.pop();
        }),
        ("max_batch_zero", |m| m.input.max_batch = 0),
        ("preprocessing_channels", |m| m.preprocessing.mean.push(0.5)),
    ];
    let mut seeds = vec![
        seed(Target::BundleManifest, "full", pretty(&full), true),
        seed(Target::BundleManifest, "minimal", pretty(&minimal), true),
    ];
    for (name, breaks) in broken {
        let mut m = full.clone();
        breaks(&mut m);
        seeds.push(seed(Target::BundleManifest, name, pretty(&m), false));
    }
    seeds
}

/// A fixed Ed25519 key (PKCS#8 v1 of a constant seed), so that regenerated seeds are the same
/// bytes.
fn seed_key() -> SigningKey {
    const PKCS8_V1_PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let der = [PKCS8_V1_PREFIX.as_slice(), &[0x5e; 32]].concat();
    SigningKey::from_pkcs8(&der).expect("a PKCS#8 v1 Ed25519 key")
}

/// A whole bundle with every kind of file, signed by a key of its own: verified after the
/// harness re-signs it, refused for its foreign key otherwise.
fn archive_seeds() -> Vec<Seed> {
    let files = seed_files(true);
    let manifest = pretty(&seed_manifest(&files));
    let key = seed_key();
    let scratch = Scratch::new();
    let dir = scratch.dir("seed");
    for (_, name, bytes) in &files {
        fs::write(dir.join(name), bytes).expect("the scratch folder is writable");
    }
    let sig = serde_json::to_vec_pretty(&sign_manifest(&manifest, &key)).expect("serialises");
    fs::write(dir.join(MANIFEST_FILE), &manifest).expect("the scratch folder is writable");
    fs::write(dir.join(SIGNATURE_FILE), sig).expect("the scratch folder is writable");
    let verified = verify_bundle(&dir, &key.verifying_key()).expect("the seed bundle verifies");
    let mut tar = Vec::new();
    pack(&verified, &mut tar).expect("the seed bundle packs");
    let with_flags = |flags: u8| [vec![flags], tar.clone()].concat();
    vec![
        seed(
            Target::BundleArchive,
            "resigned_bundle",
            with_flags(ARCHIVE_RESIGN),
            true,
        ),
        seed(
            Target::BundleArchive,
            "foreign_signature",
            with_flags(0),
            false,
        ),
    ]
}

fn pretty(manifest: &BundleManifest) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
    bytes.push(b'\n');
    bytes
}

/// `(role, name, content)` of a small bundle: the FP32 ONNX and the weights, and with `all`
/// the INT8 ONNX and an engine of each precision (whose content is not a real engine).
fn seed_files(all: bool) -> Vec<(FileRole, String, Vec<u8>)> {
    let weights = seed_model()
        .to_safetensors_bytes(&BTreeMap::new())
        .expect("the seed model serialises");
    let mut files = vec![
        (FileRole::OnnxFp32, ONNX_FP32_FILE.to_string(), onnx_seed()),
        (
            FileRole::WeightsSafetensors,
            WEIGHTS_FILE.to_string(),
            weights,
        ),
    ];
    if all {
        files.push((
            FileRole::OnnxInt8Qdq,
            ONNX_INT8_QDQ_FILE.into(),
            onnx_seed(),
        ));
        for precision in [EnginePrecision::Fp16, EnginePrecision::Int8] {
            let name = crate::bundle::engine_file_name(precision, &engine_target());
            files.push((FileRole::Engine, name, b"not a real engine".to_vec()));
        }
    }
    files
}

fn engine_target() -> EngineTarget {
    EngineTarget {
        compute_capability: "8.6".into(),
        tensorrt_version: "10.3.0".into(),
    }
}

fn seed_manifest(files: &[(FileRole, String, Vec<u8>)]) -> BundleManifest {
    let arch = ArchConfig {
        in_channels: 1,
        num_classes: 2,
        input_size: 64,
        width: 0.125,
        depth: 0.25,
        attention: false,
        fpn_width: 8,
        head_width: 8,
    };
    let batch = || Dim::Symbolic("batch".into());
    let cells = u64::from(arch.input_size / OUTPUT_STRIDE);
    let engines = files
        .iter()
        .filter(|(role, _, _)| *role == FileRole::Engine)
        .map(|(_, name, _)| {
            let precision = if name.contains("int8") {
                EnginePrecision::Int8
            } else {
                EnginePrecision::Fp16
            };
            let source = match precision {
                EnginePrecision::Int8 => ONNX_INT8_QDQ_FILE,
                EnginePrecision::Fp16 => ONNX_FP32_FILE,
            };
            EngineEntry {
                file: name.clone(),
                precision,
                target: engine_target(),
                tensorrt_version: engine_target().tensorrt_version,
                source: source.into(),
                max_batch: 8,
            }
        })
        .collect();
    BundleManifest {
        format: FORMAT.into(),
        model_name: "fuzz_seed".into(),
        model_version: 3,
        model_hash: seed_model().content_hash().to_hex(),
        built_at: "2025-01-31T12:00:00Z".into(),
        architecture: arch.clone(),
        input: InputSpec {
            name: "images".into(),
            dtype: "float32".into(),
            shape: vec![batch(), Dim::Fixed(1), Dim::Fixed(64), Dim::Fixed(64)],
            max_batch: 8,
        },
        outputs: vec![OutputSpec {
            name: "heatmap".into(),
            dtype: "float32".into(),
            shape: vec![batch(), Dim::Fixed(2), Dim::Fixed(cells), Dim::Fixed(cells)],
            meaning: "class logits".into(),
        }],
        preprocessing: default_preprocessing(&arch),
        postprocessing: Postprocessing {
            method: "centernet".into(),
            peak_window: 3,
            top_k: 100,
            output_stride: OUTPUT_STRIDE,
        },
        class_names: vec!["open".into(), "short".into()],
        score_threshold: 0.25,
        metrics: BTreeMap::from([("map_50".to_string(), 0.5)]),
        files: files
            .iter()
            .map(|(role, name, bytes)| FileEntry {
                role: *role,
                name: name.clone(),
                size: bytes.len() as u64,
                sha256: hex::encode(digest::digest(&digest::SHA256, bytes)),
            })
            .collect(),
        engines,
        engine_note: "seed engines are not real".into(),
    }
}
