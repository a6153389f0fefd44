//! `coordinator admin check`: an fsck of the data directory. Every model blob and every kept
//! update blob must exist, have its recorded size and hash to its address; the sled indexes
//! must agree (update id index ↔ updates, updates ↔ rounds, rounds ↔ published versions,
//! versions ↔ parents, promotion history ↔ versions). Problems are collected, never fixed:
//! the operator decides (restore from a backup, usually).

use std::collections::BTreeSet;

use super::{BlobStore, StorageError, Store};
use crate::records::{Digest, RoundState};

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckReport {
    pub models_checked: u64,
    pub updates_checked: u64,
    /// Update blobs not checked because retention removed them (`keep_update_blobs_rounds`).
    pub update_blobs_removed: u64,
    pub rounds_checked: u64,
    /// One line per problem, naming the record or file; empty when all is well.
    pub problems: Vec<String>,
}

/// Checks everything in `store` and `blobs` (blocking; reads every blob once).
pub fn check(store: &Store, blobs: &BlobStore) -> Result<CheckReport, StorageError> {
    let mut r = CheckReport::default();
    let models = store.models(usize::MAX)?;
    let versions: BTreeSet<u64> = models.iter().map(|m| m.version).collect();
    for m in &models {
        r.models_checked += 1;
        let what = format!("model version {}", m.version);
        blob(blobs, &m.blob_sha256, m.size_bytes, &what, &mut r.problems);
        if m.parent != 0 && !versions.contains(&m.parent) {
            r.problems.push(format!(
                "{what}: its parent version {} is missing",
                m.parent
            ));
        }
        if m.round != 0 {
            match store.round(m.round)? {
                None => r
                    .problems
                    .push(format!("{what}: its round {} is missing", m.round)),
                Some(round) if round.published_version != Some(m.version) => {
                    r.problems.push(format!(
                        "{what}: round {} records published version {:?}, not {}",
                        m.round, round.published_version, m.version
                    ))
                }
                Some(_) => {}
            }
        }
    }
    for v in store.promotion_history()? {
        if !versions.contains(&v) {
            r.problems
                .push(format!("promotion history: version {v} is missing"));
        }
    }
    let removed_through = store.update_blobs_removed_through()?;
    let updates = store.all_updates()?;
    for u in &updates {
        r.updates_checked += 1;
        let what = format!(
            "update {} of plant {} in round {}",
            u.update_id, u.plant_id, u.round
        );
        if u.round <= removed_through {
            r.update_blobs_removed += 1;
        } else {
            let mut found = Vec::new();
            blob(blobs, &u.delta_sha256, u.payload_bytes, &what, &mut found);
            // Retention may run during the check: it raises the mark before it removes files,
            // so a blob gone now under a mark that covers it now was removed on purpose.
            if !found.is_empty()
                && !blobs.contains(&u.delta_sha256)
                && u.round <= store.update_blobs_removed_through()?
            {
                r.update_blobs_removed += 1;
            } else {
                r.problems.extend(found);
            }
        }
        match store.update_by_id(&u.update_id)? {
            Some(indexed) if indexed == *u => {}
            Some(_) => r.problems.push(format!(
                "{what}: the update id index points at another record"
            )),
            None => r
                .problems
                .push(format!("{what}: missing from the update id index")),
        }
        if store.round(u.round)?.is_none() {
            r.problems
                .push(format!("{what}: round {} is missing", u.round));
        }
    }
    for (id, target) in store.update_id_index()? {
        match target {
            None => r
                .problems
                .push(format!("update id index: {id} points at no update")),
            Some(u) if u.update_id != id => r.problems.push(format!(
                "update id index: {id} points at update {}",
                u.update_id
            )),
            Some(_) => {}
        }
    }
    // Rounds are read last and their updates and versions read again, so that a round that
    // published while the check ran is compared with its own updates and version.
    for round in store.rounds(usize::MAX)? {
        r.rounds_checked += 1;
        let what = format!("round {}", round.round);
        if store.model(round.base_version)?.is_none() {
            r.problems.push(format!(
                "{what}: its base version {} is missing",
                round.base_version
            ));
        }
        if round.state == RoundState::Published {
            let n = store.updates_of_round(round.round)?.len();
            if round.participants as usize != n {
                r.problems.push(format!(
                    "{what}: records {} participants but {n} updates are stored",
                    round.participants
                ));
            }
            match round.published_version {
                Some(v) if store.model(v)?.is_some() => {}
                Some(v) => r
                    .problems
                    .push(format!("{what}: its published version {v} is missing")),
                None => r
                    .problems
                    .push(format!("{what}: published but names no version")),
            }
        }
    }
    Ok(r)
}

/// Checks that blob `digest` exists, has `size` bytes and hashes to its address.
fn blob(blobs: &BlobStore, digest: &Digest, size: u64, what: &str, problems: &mut Vec<String>) {
    let path = blobs.path_of(digest);
    match std::fs::metadata(&path) {
        Err(_) => {
            problems.push(format!("{what}: blob {} is missing", path.display()));
            return;
        }
        Ok(m) if m.len() != size => problems.push(format!(
            "{what}: blob {} has {} bytes, the record says {size}",
            path.display(),
            m.len()
        )),
        Ok(_) => {}
    }
    if let Err(e) = blobs.verify(digest) {
        problems.push(format!("{what}: {e}"));
    }
}
