//! The quickstart end to end on tiny synthetic plants: real training, real codecs, real
//! FedAvg, signed versions; then every published model is recomputed independently from the
//! stored update payloads and checked bit for bit, and the lineage and signatures are verified.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::signing::{SignedManifest, VerifyingKey};
use fedinspect_common::ModelState;
use fedinspect_simulations::quickstart::{self, QuickstartConfig};

fn plant_samples(out: &Path) -> BTreeMap<String, u64> {
    // The manifests record each contributor's sample count; read them from version 2.
    let m = manifest(out, 2);
    m["contributors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["plant"].as_str().unwrap().to_string(),
                c["num_samples"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn manifest(out: &Path, version: u64) -> serde_json::Value {
    let text = fs::read_to_string(out.join(format!("models/v{version:04}.manifest.json"))).unwrap();
    let signed: SignedManifest = serde_json::from_str(&text).unwrap();
    let key = VerifyingKey::load(&out.join("pki/coordinator-signing.pub")).unwrap();
    signed
        .verify(&key)
        .expect("manifest signature verifies")
        .clone()
}

fn model(out: &Path, version: u64) -> ModelState {
    ModelState::load_safetensors(&out.join(format!("models/v{version:04}.safetensors")))
        .unwrap()
        .0
}

/// FedAvg written plainly: f64 sums in plant-name order, one division, one rounding.
fn naive_fedavg(base: &ModelState, deltas: &[(u64, ModelState)]) -> ModelState {
    let total: f64 = deltas.iter().map(|(n, _)| *n as f64).sum();
    let mut out = base.clone();
    for (name, t) in out.iter_mut() {
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            let mut acc = 0.0f64;
            for (n, d) in deltas {
                acc += *n as f64 * d.get(name).unwrap().data()[i] as f64;
            }
            *v = (*v as f64 + acc / total) as f32;
        }
    }
    out
}

#[test]
fn quickstart_publishes_signed_versions_equal_to_fedavg_of_the_uploads() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = QuickstartConfig {
        out: out.clone(),
        rounds: 2,
        local_steps: 3,
        batch_size: 2,
        codec: Codec::q8(),
        synthetic_size: 96,
        synthetic_train: 4,
        synthetic_test: 2,
        width: 0.5,
        threads: 1,
        ..QuickstartConfig::default()
    };
    let rows = quickstart::run(&cfg).expect("quickstart runs");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.participants == 3 && r.bytes_up > 0));

    let samples = plant_samples(&out);
    assert_eq!(samples.len(), 3);
    for version in 2..=3u64 {
        let m = manifest(&out, version);
        assert_eq!(
            m["parent"].as_u64(),
            Some(version - 1),
            "lineage of v{version}"
        );
        let base = model(&out, version - 1);
        let published = model(&out, version);
        assert_eq!(
            m["content_hash"].as_str().unwrap(),
            published.content_hash().to_hex()
        );
        let round = version - 1;
        let mut deltas = Vec::new();
        for (plant, n) in &samples {
            let path = out.join(format!("updates/round-{round:03}-{plant}.delta"));
            let bytes = fs::read(&path).unwrap();
            let d = delta::decode_to_model(bytes.as_slice(), &Layout::of(&base), Some(Codec::q8()))
                .unwrap();
            deltas.push((*n, d));
        }
        let expected = naive_fedavg(&base, &deltas);
        assert!(
            expected == published,
            "v{version} differs from FedAvg recomputed from the stored updates"
        );
    }
    // Rows agree with the versions on disk.
    assert_eq!(rows[1].model_hash, model(&out, 3).content_hash().to_hex());

    // A second run in the same folder replaces the models and reuses the keys.
    let key_before = fs::read(out.join("pki/coordinator-signing.pub")).unwrap();
    quickstart::run(&QuickstartConfig { rounds: 1, ..cfg }).expect("second run");
    assert_eq!(
        fs::read(out.join("pki/coordinator-signing.pub")).unwrap(),
        key_before
    );
    assert!(out.join("models/v0002.manifest.json").exists());
    assert!(!out.join("models/v0003.manifest.json").exists());
}
