//! Settling an upload attempt's entry in the round's running mean once intake decided: counted
//! as it arrived, counted with its values scaled (a clipped update), or taken out again by
//! subtracting what it delivered, read back from its file before that file goes away.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{blocking, payload};
use crate::hub::{Feed, OpenRound};
use crate::storage::{DeltaFile, Incoming};

/// What happens to an attempt's entry in the running mean.
pub enum Settle {
    Commit,
    CommitScaled(f32),
    Discard,
}

/// Settles an attempt whose payload is still in its temporary file.
pub async fn settle(feed: Option<Feed>, round: &Arc<OpenRound>, incoming: Incoming, how: Settle) {
    let Some(feed) = feed else { return };
    let round = round.clone();
    let path = incoming.path().to_path_buf();
    // The file is removed only after its values were read back.
    let _ = blocking(move || {
        settle_from(feed, &round, &path, how);
        drop(incoming);
        Ok(())
    })
    .await;
}

/// Settles an attempt whose payload is stored at `path`.
pub async fn settle_stored(feed: Option<Feed>, round: &Arc<OpenRound>, path: PathBuf, how: Settle) {
    let Some(feed) = feed else { return };
    let round = round.clone();
    let _ = blocking(move || {
        settle_from(feed, &round, &path, how);
        Ok(())
    })
    .await;
}

fn settle_from(feed: Feed, round: &OpenRound, path: &Path, how: Settle) {
    match how {
        Settle::Commit => feed.commit(),
        Settle::Discard => payload::take_out(feed, path, round),
        Settle::CommitScaled(scale) => {
            let codec = round.record.plan.codec;
            let files = DeltaFile::open(path, &round.layout, codec).and_then(|plain| {
                let scaled = DeltaFile::open(path, &round.layout, codec)?.with_scale(Some(scale));
                Ok((plain, scaled))
            });
            match files {
                Ok((plain, scaled)) => feed.commit_scaled(&plain, &scaled),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reread a clipped update for the running mean");
                    drop(feed); // marks the preview incomplete
                }
            }
        }
    }
}
