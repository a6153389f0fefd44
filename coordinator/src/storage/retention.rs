//! Retention of accepted update payloads: once a round has ended, its update blobs are needed
//! only to recompute or audit it, so `[storage] keep_update_blobs_rounds = N` keeps those of
//! the newest N ended rounds and removes older ones. Update records stay in sled (history);
//! only the blob files go, and `meta/update_blobs_removed_through` says which rounds have none
//! (so `check` does not report them missing). Model blobs are never removed.
//!
//! Order: the mark is written and flushed first, then the files are removed; a crash in
//! between leaves unreferenced files, never a referenced file missing.

use std::collections::HashSet;

use super::{BlobStore, StorageError, Store};
use crate::records::{Digest, RoundState};

/// What one pass removed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Removed {
    /// Rounds whose update blobs are gone now, up to this one.
    pub through_round: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Removes the update blobs of ended rounds older than the newest `keep_rounds` ended ones
/// (blocking). Blobs that a kept round also references stay.
pub fn remove_old_update_blobs(
    store: &Store,
    blobs: &BlobStore,
    keep_rounds: u64,
) -> Result<Removed, StorageError> {
    let already = store.update_blobs_removed_through()?;
    // Only the newest round can still be running, so the newest keep + 2 rounds hold the
    // cutoff: reading every round each pass cost time and memory growing with the history.
    let newest = usize::try_from(keep_rounds.saturating_add(2)).unwrap_or(usize::MAX);
    let ended: Vec<u64> = store
        .rounds(newest)?
        .into_iter()
        .filter(|r| matches!(r.state, RoundState::Published | RoundState::Failed))
        .map(|r| r.round)
        .collect(); // newest first
    let Some(&cutoff) = ended.get(usize::try_from(keep_rounds).unwrap_or(usize::MAX)) else {
        return Ok(Removed {
            through_round: already,
            ..Removed::default()
        });
    };
    if cutoff <= already {
        return Ok(Removed {
            through_round: already,
            ..Removed::default()
        });
    }
    // Digests still referenced by a round after the cutoff (an identical payload sent again).
    let latest = store.latest_round()?.map_or(0, |r| r.round);
    let mut kept: HashSet<Digest> = HashSet::new();
    for round in cutoff + 1..=latest {
        kept.extend(
            store
                .updates_of_round(round)?
                .iter()
                .map(|u| u.delta_sha256),
        );
    }
    let mut doomed: Vec<Digest> = Vec::new();
    for round in already + 1..=cutoff {
        doomed.extend(
            store
                .updates_of_round(round)?
                .iter()
                .map(|u| u.delta_sha256)
                .filter(|d| !kept.contains(d)),
        );
    }
    store.set_update_blobs_removed_through(cutoff)?;
    store.flush_blocking()?;
    crate::failpoint::hit(crate::failpoint::RETENTION_AFTER_MARK);
    let mut removed = Removed {
        through_round: cutoff,
        ..Removed::default()
    };
    for digest in doomed {
        let path = blobs.path_of(&digest);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StorageError::Blob { path, source }),
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                removed.files += 1;
                removed.bytes += size;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StorageError::Blob { path, source }),
        }
    }
    Ok(removed)
}
