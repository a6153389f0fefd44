//! Writing checkpoints without losing the training: a plant's disk can fill up during a
//! 30-minute run, and the trained state then exists only in memory. An epoch checkpoint that
//! cannot be written is logged and training goes on (the next epoch tries again, and the file
//! at the path stays the last one written: writes are atomic). The final checkpoint is retried
//! for [`FinalWrite::attempts`] with [`FinalWrite::wait`] between tries, saying each time what
//! failed and that the state waits in memory, so an operator can free space before it is lost.

use std::time::Duration;

use fedinspect_common::ModelError;

use super::run::Run;
use super::{CheckpointPolicy, TrainError};
use crate::detector::{Detector, DetectorError};

/// How long the final checkpoint write keeps trying when the file system refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FinalWrite {
    /// Tries in all, at least 1.
    pub attempts: u32,
    pub wait: Duration,
}

impl Default for FinalWrite {
    /// Half an hour: 60 tries, 30 s apart.
    fn default() -> Self {
        FinalWrite {
            attempts: 60,
            wait: Duration::from_secs(30),
        }
    }
}

/// Whether `e` is the file system refusing the write (full, read-only, not a folder), as
/// opposed to a state that cannot be serialised.
fn is_write_failure(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Detector(DetectorError::Model(ModelError::Write { .. }))
    )
}

/// The checkpoint after an epoch: a write failure is logged and training continues.
pub(super) fn epoch_checkpoint(
    run: &Run<'_>,
    det: &Detector,
    policy: &CheckpointPolicy,
    epoch: u32,
) -> Result<(), TrainError> {
    match run.checkpoint(det, policy, epoch) {
        Err(e) if is_write_failure(&e) => {
            tracing::warn!(
                "epoch {epoch} checkpoint not written: {e}; training goes on and the next \
                 checkpoint tries again"
            );
            Ok(())
        }
        other => other,
    }
}

/// The checkpoint at the end of the run, retried while the file system refuses it.
pub(super) fn final_checkpoint(
    run: &Run<'_>,
    det: &Detector,
    policy: &CheckpointPolicy,
    epoch: u32,
) -> Result<(), TrainError> {
    let attempts = policy.final_write.attempts.max(1);
    let mut attempt = 1;
    loop {
        match run.checkpoint(det, policy, epoch) {
            Err(e) if is_write_failure(&e) && attempt < attempts => {
                tracing::warn!(
                    "final checkpoint not written (try {attempt} of {attempts}): {e}; the trained \
                     state is kept in memory, next try in {:?}",
                    policy.final_write.wait
                );
                std::thread::sleep(policy.final_write.wait);
                attempt += 1;
            }
            other => return other,
        }
    }
}
