//! Training loop tests, CI-sized: overfitting a fixed tiny batch, cancellation, checkpoints
//! written during training and resumed, FedProx's pull towards the reference, and rounds of a
//! learning-rate cycle (a stretch of one cosine each, AdamW's moments carried between them).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fedinspect_client::detector::synthetic::rectangles;
use fedinspect_client::detector::{
    train, CheckpointPolicy, DecodeParams, Detector, FedProx, FinalWrite, FixedBatches, Resume,
    Stop, StopReason, TrainConfig, TrainReport,
};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::lr_cycle::LrSpan;
use tch::Device;

fn tiny_arch() -> ArchConfig {
    ArchConfig {
        num_classes: 2,
        input_size: 64,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    }
}

fn tiny_detector(seed: u64) -> Detector {
    tch::set_num_threads(1);
    Detector::seeded(tiny_arch(), vec!["a".into(), "b".into()], Device::Cpu, seed).unwrap()
}

fn config(stop: Stop) -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        warmup_steps: 5,
        stop,
        ..TrainConfig::default()
    }
}

#[test]
fn overfits_a_fixed_tiny_batch() {
    let mut det = tiny_detector(0);
    let batch = rectangles(2, 2, 64, 2, 2, 7);
    let mut data = FixedBatches(vec![batch.clone()]);
    let mut losses = Vec::new();
    let report = train(&mut det, &mut data, &config(Stop::Steps(120)), &mut |p| {
        losses.push(p.loss);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(report.steps, 120);
    assert_eq!(report.reason, StopReason::Finished);
    let first = losses[0];
    let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(
        first >= 5.0 * last,
        "loss went from {first:.3} to {last:.3}, less than 5x"
    );

    // The overfitted detector finds the rectangles it was trained on.
    let dets = det.detect(&batch, &DecodeParams::default()).unwrap();
    for (image, truth) in dets.iter().zip(&batch.annotations) {
        for t in truth {
            let best = image
                .iter()
                .filter(|d| d.class == t.class)
                .map(|d| d.bbox.iou(&t.bbox))
                .fold(0.0f32, f32::max);
            assert!(best > 0.5, "box {t:?} found with IoU {best}: {image:?}");
        }
    }
}

#[test]
fn callback_can_cancel_and_the_state_is_still_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut det = tiny_detector(1);
    let mut data = FixedBatches(vec![rectangles(2, 2, 64, 1, 2, 1)]);
    let cfg = TrainConfig {
        checkpoint: Some(every_epoch(path.clone(), FinalWrite::default())),
        ..config(Stop::Epochs(100))
    };
    let report = train(&mut det, &mut data, &cfg, &mut |p| {
        if p.step == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!((report.steps, report.reason), (3, StopReason::Cancelled));
    let (loaded, info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(
        info.epoch, 2,
        "two full epochs of one batch, the third cancelled"
    );
    assert_eq!(
        loaded.state().unwrap().content_hash(),
        det.state().unwrap().content_hash()
    );
}

#[test]
fn resumes_from_a_checkpoint_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut det = tiny_detector(2);
    let mut data = FixedBatches(vec![rectangles(2, 2, 64, 1, 2, 2)]);
    let policy = every_epoch(path.clone(), FinalWrite::default());
    let cfg = TrainConfig {
        checkpoint: Some(policy.clone()),
        ..config(Stop::Epochs(2))
    };
    train(
        &mut det,
        &mut data,
        &cfg,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();

    let (mut resumed, info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(info.epoch, 2);
    let mut epochs = Vec::new();
    let cfg = TrainConfig {
        resume: Some(Resume::from_checkpoint(&info)),
        checkpoint: Some(policy),
        ..config(Stop::Epochs(4))
    };
    let report = train(&mut resumed, &mut data, &cfg, &mut |p| {
        epochs.push(p.epoch);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(epochs, [2, 3]);
    assert_eq!(report.epochs_completed, 4);
    assert_eq!(
        Detector::load_checkpoint(&path, Device::Cpu)
            .unwrap()
            .1
            .epoch,
        4
    );
}

#[test]
fn fedprox_keeps_weights_near_the_reference() {
    let data = vec![rectangles(2, 2, 64, 2, 2, 3)];
    let reference = tiny_detector(3).state().unwrap();
    let distance = |mu: f64| {
        let mut det = tiny_detector(3);
        let cfg = TrainConfig {
            fedprox: Some(FedProx {
                mu,
                reference: reference.clone(),
            }),
            weight_decay: 0.0,
            ..config(Stop::Steps(15))
        };
        let mut source = FixedBatches(data.clone());
        train(&mut det, &mut source, &cfg, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        let state = det.state().unwrap();
        state
            .iter()
            .filter(|(name, _)| !name.contains("running_"))
            .map(|(name, t)| {
                let r = reference.get(name).unwrap().data();
                t.data()
                    .iter()
                    .zip(r)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
            })
            .sum::<f32>()
    };
    let free = distance(0.0);
    let held = distance(100.0);
    assert!(held < 0.5 * free, "FedProx distance {held} vs free {free}");
}

#[test]
fn fedprox_refuses_a_reference_of_another_architecture() {
    let mut det = tiny_detector(4);
    let other = Detector::seeded(
        ArchConfig {
            width: 0.5,
            ..tiny_arch()
        },
        vec!["a".into(), "b".into()],
        Device::Cpu,
        4,
    )
    .unwrap();
    let cfg = TrainConfig {
        fedprox: Some(FedProx {
            mu: 0.1,
            reference: other.state().unwrap(),
        }),
        ..config(Stop::Steps(1))
    };
    let mut data = FixedBatches(vec![rectangles(1, 2, 64, 1, 2, 4)]);
    let err = train(
        &mut det,
        &mut data,
        &cfg,
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("FedProx reference"), "{err}");
}

/// Two distinct batches per epoch, so where a resumed run starts inside an epoch matters.
fn two_batches() -> FixedBatches {
    FixedBatches(vec![
        rectangles(2, 2, 64, 2, 2, 10),
        rectangles(2, 2, 64, 2, 2, 11),
    ])
}

/// Trains with `cfg` from `det`, stopping early after `cancel_at` steps when given, and
/// returns the learning rate of every step.
fn run_collecting_lr(det: &mut Detector, cfg: &TrainConfig, cancel_at: Option<u64>) -> Vec<f64> {
    let mut lrs = Vec::new();
    train(det, &mut two_batches(), cfg, &mut |p| {
        lrs.push(p.lr);
        if Some(p.step) == cancel_at {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    lrs
}

/// Largest absolute difference between two states with the same names.
fn max_abs_diff(a: &fedinspect_common::ModelState, b: &fedinspect_common::ModelState) -> f32 {
    a.iter()
        .map(|(name, t)| {
            t.data()
                .iter()
                .zip(b.get(name).unwrap().data())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

/// N steps, a checkpoint, then M resumed steps must equal N + M steps in one run: weights,
/// BatchNorm statistics and the learning rate of every step (no second warmup, the cosine
/// continues). `stop` is the uninterrupted run's; the first part is cancelled after `n`
/// steps and the second resumes with `resumed_stop`.
fn assert_resume_is_exact(stop: Stop, n: u64, resumed_stop: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let base = TrainConfig {
        lr: 1e-2,
        warmup_steps: 4,
        weight_decay: 1e-2,
        stop,
        ..TrainConfig::default()
    };

    let mut whole = tiny_detector(21);
    // The same starting weights for the interrupted run, whatever other test threads did to
    // LibTorch's global generator meanwhile.
    let start = whole.state().unwrap();
    let whole_lrs = run_collecting_lr(&mut whole, &base, None);

    let mut first = tiny_detector(21);
    first.load_state(&start).unwrap();
    let with_checkpoint = TrainConfig {
        checkpoint: Some(every_epoch(path.clone(), FinalWrite::default())),
        ..base.clone()
    };
    let mut lrs = run_collecting_lr(&mut first, &with_checkpoint, Some(n));
    assert_eq!(lrs.len() as u64, n);
    let (mut resumed, info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    let training = info
        .training
        .as_ref()
        .expect("training state in the checkpoint");
    assert_eq!(training.position.steps_done, n);
    assert_eq!(training.optimizer.step, n);
    let resume_cfg = TrainConfig {
        stop: resumed_stop,
        resume: Some(Resume::from_checkpoint(&info)),
        ..base.clone()
    };
    lrs.extend(run_collecting_lr(&mut resumed, &resume_cfg, None));

    assert_eq!(lrs, whole_lrs, "learning rates of the resumed run");
    let (a, b) = (whole.state().unwrap(), resumed.state().unwrap());
    assert_eq!(
        a.content_hash(),
        b.content_hash(),
        "resumed weights differ from the uninterrupted run's by up to {}",
        max_abs_diff(&a, &b)
    );

    // The comparison is sharp enough to see lost optimizer state: the same resume with
    // AdamW's moments zeroed (everything else kept) ends elsewhere.
    let (mut restarted, _) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    let mut zeroed = training.clone();
    zeroed.optimizer.exp_avg = zeroed.optimizer.exp_avg.zeros_like();
    zeroed.optimizer.exp_avg_sq = zeroed.optimizer.exp_avg_sq.zeros_like();
    let without_moments = TrainConfig {
        resume: Some(Resume {
            epoch: info.epoch,
            training: Some(zeroed),
        }),
        ..resume_cfg
    };
    run_collecting_lr(&mut restarted, &without_moments, None);
    let c = restarted.state().unwrap();
    assert!(
        max_abs_diff(&a, &c) > 1e-4,
        "restarting the moments changed nothing; the test cannot tell"
    );
}

#[test]
fn resuming_mid_epoch_gives_the_weights_of_one_uninterrupted_run() {
    // Three epochs of two batches; interrupted after the first batch of epoch 1.
    assert_resume_is_exact(Stop::Epochs(3), 3, Stop::Epochs(3));
}

#[test]
fn resuming_a_step_budget_at_an_epoch_boundary_continues_its_cosine() {
    // Six steps planned; interrupted after four (the end of epoch 1), resumed for two more.
    assert_resume_is_exact(Stop::Steps(6), 4, Stop::Steps(2));
}

#[test]
fn optimizer_state_of_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut det = tiny_detector(6);
    let cfg = TrainConfig {
        checkpoint: Some(every_epoch(path.clone(), FinalWrite::default())),
        ..config(Stop::Steps(1))
    };
    train(&mut det, &mut two_batches(), &cfg, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let (_, info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    let mut wider = Detector::seeded(
        ArchConfig {
            width: 0.5,
            ..tiny_arch()
        },
        vec!["a".into(), "b".into()],
        Device::Cpu,
        6,
    )
    .unwrap();
    let resumed = TrainConfig {
        resume: Some(Resume::from_checkpoint(&info)),
        ..config(Stop::Steps(1))
    };
    let err = train(&mut wider, &mut two_batches(), &resumed, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("cannot resume: the optimizer state does not fit the model: exp_avg of '")
            && err.contains("has shape"),
        "{err}"
    );
}

/// A checkpoint path whose folder is a regular file: every write is refused, as on a full disk.
fn blocked_path(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let blocker = dir.join("state");
    std::fs::write(&blocker, b"not a folder").unwrap();
    (blocker.clone(), blocker.join("ckpt.safetensors"))
}

#[test]
fn refused_checkpoint_writes_do_not_stop_training_and_the_final_one_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (_blocker, path) = blocked_path(dir.path());
    let mut det = tiny_detector(3);
    let mut data = FixedBatches(vec![rectangles(2, 2, 64, 1, 2, 3)]);
    let cfg = TrainConfig {
        checkpoint: Some(every_epoch(
            path.clone(),
            FinalWrite {
                attempts: 2,
                wait: Duration::from_millis(10),
            },
        )),
        ..config(Stop::Epochs(3))
    };
    let mut steps = 0;
    let err = train(&mut det, &mut data, &cfg, &mut |_| {
        steps += 1;
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert_eq!(
        steps, 3,
        "every epoch trained although no checkpoint could be written"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("cannot write model file") && msg.contains("ckpt.safetensors"),
        "{msg}"
    );
    assert!(!path.exists());
}

#[test]
fn the_final_checkpoint_is_written_once_the_disk_takes_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (blocker, path) = blocked_path(dir.path());
    let mut det = tiny_detector(4);
    let mut data = FixedBatches(vec![rectangles(2, 2, 64, 1, 2, 4)]);
    let cfg = TrainConfig {
        checkpoint: Some(every_epoch(
            path.clone(),
            FinalWrite {
                attempts: 50,
                wait: Duration::from_millis(200),
            },
        )),
        ..config(Stop::Epochs(2))
    };
    // Space returns (the blocker goes) a moment after the last step: the epoch checkpoint and
    // the first final tries fail, a later try writes the trained state.
    let trained = Arc::new(AtomicBool::new(false));
    let operator = {
        let trained = Arc::clone(&trained);
        std::thread::spawn(move || {
            while !trained.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(500));
            std::fs::remove_file(&blocker).unwrap();
        })
    };
    let report = train(&mut det, &mut data, &cfg, &mut |p| {
        if p.step == 2 {
            trained.store(true, Ordering::SeqCst);
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    operator.join().unwrap();
    assert_eq!(report.steps, 2);
    let (loaded, info) = Detector::load_checkpoint(&path, Device::Cpu).unwrap();
    assert_eq!(info.epoch, 2);
    assert_eq!(
        loaded.state().unwrap().content_hash(),
        det.state().unwrap().content_hash(),
        "the checkpoint holds the trained state"
    );
}

/// A checkpoint after every epoch to `path`, no preprocessing or recipe recorded.
fn every_epoch(path: std::path::PathBuf, final_write: FinalWrite) -> CheckpointPolicy {
    CheckpointPolicy {
        path,
        every_epochs: 1,
        preprocess: None,
        recipe: None,
        final_write,
    }
}

/// Trains `det` with `cfg` on [`two_batches`]; the learning rate of every step and the report.
fn run_with_report(det: &mut Detector, cfg: &TrainConfig) -> (Vec<f64>, TrainReport) {
    let mut lrs = Vec::new();
    let report = train(det, &mut two_batches(), cfg, &mut |p| {
        lrs.push(p.lr);
        ControlFlow::Continue(())
    })
    .unwrap();
    (lrs, report)
}

#[test]
fn two_rounds_of_a_learning_rate_cycle_train_like_one_run() {
    // No warmup: a round cannot know the length of the cycle's first round's warmup from
    // its own length, so only then are the two bit-identical.
    let base = TrainConfig {
        lr: 1e-2,
        warmup_steps: 0,
        weight_decay: 1e-2,
        ..TrainConfig::default()
    };
    let mut whole = tiny_detector(31);
    let start = whole.state().unwrap();
    let (whole_lrs, _) = run_with_report(
        &mut whole,
        &TrainConfig {
            stop: Stop::Steps(8),
            ..base.clone()
        },
    );

    let mut rounds = tiny_detector(31);
    rounds.load_state(&start).unwrap();
    let first = TrainConfig {
        stop: Stop::Steps(4),
        lr_span: Some(LrSpan::new(0.0, 0.5).unwrap()),
        ..base.clone()
    };
    let (mut lrs, report) = run_with_report(&mut rounds, &first);
    let moments = report.moments.expect("the run hands its moments on");
    assert_eq!(moments.step, 4);
    let second = TrainConfig {
        lr_span: Some(LrSpan::new(0.5, 1.0).unwrap()),
        moments: Some(moments.clone()),
        ..first.clone()
    };
    let after_first = rounds.state().unwrap();
    let (second_lrs, report) = run_with_report(&mut rounds, &second);
    lrs.extend(second_lrs);
    assert_eq!(
        report.moments.unwrap().step,
        8,
        "the moments' steps go on counting"
    );

    assert_eq!(lrs, whole_lrs, "the two rounds follow the one run's cosine");
    let (a, b) = (whole.state().unwrap(), rounds.state().unwrap());
    assert_eq!(
        a.content_hash(),
        b.content_hash(),
        "two rounds of a cycle end {} away from the one run",
        max_abs_diff(&a, &b)
    );

    // Sharp enough to see moments that were not carried: the second round from the same
    // weights with fresh moments ends elsewhere.
    let mut fresh = tiny_detector(31);
    fresh.load_state(&after_first).unwrap();
    run_with_report(
        &mut fresh,
        &TrainConfig {
            moments: None,
            ..second
        },
    );
    assert!(max_abs_diff(&a, &fresh.state().unwrap()) > 1e-4);
}

#[test]
fn a_round_continuing_its_moments_does_not_warm_up_again() {
    let cfg = TrainConfig {
        lr: 1e-2,
        warmup_steps: 4,
        stop: Stop::Steps(4),
        lr_span: Some(LrSpan::new(0.5, 1.0).unwrap()),
        ..TrainConfig::default()
    };
    let mut det = tiny_detector(32);
    let (_, report) = run_with_report(
        &mut det,
        &TrainConfig {
            lr_span: None,
            ..cfg.clone()
        },
    );
    let (continued, _) = run_with_report(
        &mut det,
        &TrainConfig {
            moments: report.moments,
            ..cfg.clone()
        },
    );
    // Halfway through the cosine: half the peak, at once.
    assert!((continued[0] - 0.5e-2).abs() < 1e-12, "{continued:?}");
    // Fresh moments warm up over a third of the round (2 of 4 steps): half of that.
    let (fresh, _) = run_with_report(&mut det, &cfg);
    assert!((fresh[0] - 0.25e-2).abs() < 1e-12, "{fresh:?}");
    assert!(continued.iter().zip(&fresh).all(|(c, f)| c >= f));
}
