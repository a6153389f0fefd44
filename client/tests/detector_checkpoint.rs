//! Checkpoint tests: a save/load round trip rebuilds a detector with bit-identical outputs
//! and metadata; files of another architecture or without fedinspect metadata are refused;
//! the training state (AdamW moments, schedule position) round-trips, damaged optimizer
//! tensors are named, and checkpoints without training state (format v1) still load.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use fedinspect_client::detector::checkpoint::{
    FORMAT, FORMAT_V1, META_FORMAT, OPTIM_EXP_AVG, OPTIM_EXP_AVG_SQ, OPTIM_PREFIX,
};
use fedinspect_client::detector::synthetic::rectangles;
use fedinspect_client::detector::{
    train, CheckpointInfo, CheckpointPolicy, Detector, DetectorError, FinalWrite, FixedBatches,
    Resume, Stop, TrainConfig,
};
use fedinspect_client::varstore::TorchError;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::model::Tensor as StateTensor;
use fedinspect_common::ModelState;
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
        recipe: Some(serde_json::json!({ "batch_size": 2 })),
        training: None,
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

/// A checkpoint written by three training steps of a fresh detector, and that detector.
fn trained_checkpoint(path: &Path) -> Detector {
    tch::set_num_threads(1);
    let mut det = Detector::seeded(arch(), names(), Device::Cpu, 5).unwrap();
    let cfg = TrainConfig {
        stop: Stop::Steps(3),
        warmup_steps: 2,
        checkpoint: Some(CheckpointPolicy {
            path: path.to_path_buf(),
            every_epochs: 1,
            preprocess: None,
            recipe: None,
            final_write: FinalWrite::default(),
        }),
        ..TrainConfig::default()
    };
    let mut data = FixedBatches(vec![rectangles(2, 2, 64, 2, 3, 9)]);
    train(
        &mut det,
        &mut data,
        &cfg,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    det
}

/// The file's tensors and metadata, as written.
fn raw(path: &Path) -> (ModelState, BTreeMap<String, String>) {
    ModelState::load_safetensors(path).unwrap()
}

/// `state` with `name` replaced by `replacement` (or dropped when `None`).
fn edited(state: &ModelState, name: &str, replacement: Option<StateTensor>) -> ModelState {
    let mut out = ModelState::new();
    for (n, t) in state.iter() {
        match (n == name, &replacement) {
            (false, _) => out.insert(n, t.clone()).unwrap(),
            (true, Some(r)) => out.insert(n, r.clone()).unwrap(),
            (true, None) => {}
        }
    }
    out
}

#[test]
fn optimizer_moments_round_trip_and_the_weights_stay_a_plain_model_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trained.safetensors");
    let det = trained_checkpoint(&path);
    let (loaded, info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(
        loaded.state().unwrap().content_hash(),
        det.state().unwrap().content_hash()
    );
    let training = info
        .training
        .clone()
        .expect("training writes optimizer state");
    let opt = &training.optimizer;
    assert_eq!(opt.step, 3);
    assert_eq!(training.position.steps_done, 3);
    let trainable: Vec<String> = det
        .trainable_variables()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(opt.exp_avg.names().collect::<Vec<_>>(), trainable);
    assert_eq!(opt.exp_avg_sq.names().collect::<Vec<_>>(), trainable);
    // Real moments: not all zero, second moments never negative.
    assert!(opt
        .exp_avg
        .iter()
        .any(|(_, t)| t.data().iter().any(|&v| v != 0.0)));
    assert!(opt
        .exp_avg_sq
        .iter()
        .all(|(_, t)| t.data().iter().all(|&v| v >= 0.0)));

    // Saved again and read back: the same state, bit for bit.
    let again = dir.path().join("again.safetensors");
    loaded.save_checkpoint(&again, &info).unwrap();
    let (_, info2) = Detector::load_checkpoint(&again, Device::Cpu).unwrap();
    assert_eq!(info2, info);

    // The file minus the `optim.` tensors is the model: it builds a detector on its own.
    let (all, meta) = raw(&path);
    assert_eq!(meta[META_FORMAT], FORMAT);
    let optim = all.names().filter(|n| n.starts_with(OPTIM_PREFIX)).count();
    assert_eq!(optim, 2 * trainable.len());
    let weights = ModelState::from_tensors(
        all.iter()
            .filter(|(n, _)| !n.starts_with(OPTIM_PREFIX))
            .map(|(n, t)| (n.to_string(), t.clone())),
    )
    .unwrap();
    assert_eq!(weights.content_hash(), det.state().unwrap().content_hash());
    Detector::from_state(arch(), names(), &weights, Device::Cpu).unwrap();
}

#[test]
fn missing_or_misshaped_optimizer_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trained.safetensors");
    let det = trained_checkpoint(&path);
    let (all, meta) = raw(&path);
    let (variable, var) = det.trainable_variables().into_iter().next().unwrap();

    let missing = format!("{OPTIM_EXP_AVG}{variable}");
    let damaged = dir.path().join("missing.safetensors");
    edited(&all, &missing, None)
        .save_safetensors(&damaged, &meta)
        .unwrap();
    let err = Detector::load_checkpoint(&damaged, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&format!("'{missing}' is missing")), "{err}");
    assert!(err.contains("resume from another checkpoint"), "{err}");
    // The weights are intact, and inference can still read them.
    let (weights_only, info) = Detector::load_checkpoint_weights(&damaged, Device::Cpu).unwrap();
    assert!(info.training.is_none());
    assert_eq!(
        weights_only.state().unwrap().content_hash(),
        det.state().unwrap().content_hash()
    );

    let misshaped = format!("{OPTIM_EXP_AVG_SQ}{variable}");
    let damaged = dir.path().join("misshaped.safetensors");
    let wrong = StateTensor::zeros(vec![1]).unwrap();
    edited(&all, &misshaped, Some(wrong))
        .save_safetensors(&damaged, &meta)
        .unwrap();
    let err = Detector::load_checkpoint(&damaged, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    let want: Vec<i64> = var.size();
    assert!(
        err.contains(&format!(
            "'{misshaped}' has shape [1], its variable {want:?}"
        )),
        "{err}"
    );

    let stray = dir.path().join("stray.safetensors");
    let mut extra = all.clone();
    extra
        .insert(
            format!("{OPTIM_EXP_AVG}no.such.weight"),
            StateTensor::zeros(vec![2]).unwrap(),
        )
        .unwrap();
    extra.save_safetensors(&stray, &meta).unwrap();
    let err = Detector::load_checkpoint(&stray, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("'optim.exp_avg.no.such.weight' belongs to no trainable variable"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_without_training_state_loads_and_resumes_with_fresh_moments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.safetensors");
    let det = Detector::seeded(arch(), names(), Device::Cpu, 8).unwrap();
    let info = CheckpointInfo {
        epoch: 2,
        metrics: serde_json::json!({}),
        ..CheckpointInfo::default()
    };
    det.save_checkpoint(&path, &info).unwrap();
    // Written exactly as before checkpoints carried optimizer state.
    let (all, meta) = raw(&path);
    assert_eq!(meta[META_FORMAT], FORMAT_V1);
    assert!(all.names().all(|n| !n.starts_with(OPTIM_PREFIX)));

    let (mut loaded, back) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(back, info);
    let resume = Resume::from_checkpoint(&back);
    assert!(resume.training.is_none());
    assert_eq!(resume.remaining(), None, "no plan recorded");

    // Resuming runs epoch 2 onwards with the warmup from its start: the first step's learning
    // rate is the first warmup step's.
    let cfg = TrainConfig {
        lr: 1e-2,
        warmup_steps: 10,
        stop: Stop::Epochs(3),
        resume: Some(resume),
        ..TrainConfig::default()
    };
    // Ten batches an epoch: a 30-step plan keeps the whole 10-step warmup (a warmup never
    // spans more than a third of the run).
    let mut data = FixedBatches(vec![rectangles(2, 2, 64, 2, 3, 1); 10]);
    let mut seen = Vec::new();
    train(&mut loaded, &mut data, &cfg, &mut |p| {
        seen.push((p.epoch, p.lr));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(seen.len(), 10);
    let (epoch, lr) = seen[0];
    assert_eq!(epoch, 2);
    // Two of three epochs done: the cosine is at 2/3, the warmup at its first step (1/10).
    let expected = 1e-2 * 0.5 * (1.0 + (std::f64::consts::PI * 2.0 / 3.0).cos()) * 0.1;
    assert!(
        (lr - expected).abs() < 1e-12,
        "lr {lr}, expected {expected}"
    );
}
