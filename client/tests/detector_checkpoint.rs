//! Checkpoint tests: a save/load round trip rebuilds a detector with bit-identical outputs
//! and metadata; files of another architecture or without fedinspect metadata are refused.

use std::collections::BTreeMap;

use fedinspect_client::detector::synthetic::rectangles;
use fedinspect_client::detector::{CheckpointInfo, Detector, DetectorError};
use fedinspect_client::varstore::TorchError;
use fedinspect_common::arch::ArchConfig;
use tch::{Device, Kind, Tensor};

fn arch() -> ArchConfig {
    ArchConfig {
        num_classes: 3,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    }
}

fn names() -> Vec<String> {
    ["open", "short", "mousebite"].map(String::from).to_vec()
}

/// Eval-mode outputs as raw bits, so equality is exact.
fn output_bits(det: &Detector, images: &Tensor) -> Vec<u32> {
    let out = tch::no_grad(|| det.forward(images, false)).unwrap();
    let flat = Tensor::cat(&[out.heatmap.flatten(0, -1), out.boxes.flatten(0, -1)], 0);
    let mut v = vec![0f32; flat.numel()];
    let n = v.len();
    flat.to_kind(Kind::Float).copy_data(&mut v, n);
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn round_trip_gives_bit_identical_outputs_and_metadata() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("det.safetensors");
    let det = Detector::seeded(arch(), names(), Device::Cpu, 11).unwrap();
    // One training-mode pass moves the BatchNorm running statistics off their defaults, so
    // the round trip has to carry them.
    let batch = rectangles(2, 2, 64, 2, 3, 5);
    let images = det.images_tensor(&batch).unwrap();
    tch::no_grad(|| det.forward(&images, true)).unwrap();
    let info = CheckpointInfo {
        epoch: 7,
        metrics: serde_json::json!({ "map_50": 0.5 }),
        preprocess: None,
    };
    det.save_checkpoint(&path, &info).unwrap();

    let (back, back_info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(back_info, info);
    assert_eq!(back.arch(), det.arch());
    assert_eq!(back.class_names(), det.class_names());
    assert_eq!(output_bits(&back, &images), output_bits(&det, &images));
    let fresh = Detector::seeded(arch(), names(), Device::Cpu, 12).unwrap();
    assert_ne!(output_bits(&fresh, &images), output_bits(&det, &images));
}

#[test]
fn refuses_another_architecture_and_foreign_files() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let det = Detector::seeded(arch(), names(), Device::Cpu, 1).unwrap();
    let state = det.state().unwrap();

    let mut other = arch();
    other.attention = false;
    let err = Detector::from_state(other, names(), &state, Device::Cpu)
        .err()
        .unwrap();
    match err {
        DetectorError::Torch(TorchError::NameMismatch {
            missing,
            unexpected,
        }) => {
            assert!(missing.is_empty());
            assert!(unexpected.contains(&"backbone.attn.q.weight".to_string()));
        }
        other => panic!("expected a name mismatch, got {other}"),
    }

    let foreign = dir.path().join("foreign.safetensors");
    state.save_safetensors(&foreign, &BTreeMap::new()).unwrap();
    let err = Detector::load_checkpoint(&foreign, Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("not a fedinspect checkpoint"),
        "{err}"
    );

    let err = Detector::new(arch(), vec!["one".into()], Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(
        err,
        DetectorError::ClassCount { names: 1, arch: 3 }
    ));
}

#[test]
fn state_includes_batchnorm_running_statistics() {
    let det = Detector::seeded(arch(), names(), Device::Cpu, 2).unwrap();
    let state = det.state().unwrap();
    let graph = arch().graph().unwrap();
    assert_eq!(state.num_params(), graph.num_values());
    assert!(state.get("backbone.stem.bn.running_var").is_some());
    assert_eq!(state.names().collect::<Vec<_>>(), {
        let mut v: Vec<String> = graph.params().into_iter().map(|p| p.name).collect();
        v.sort();
        v
    });
}
