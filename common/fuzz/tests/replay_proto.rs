//! Replays the protocol target's kept inputs (`corpus/proto_messages/`,
//! `regressions/proto_messages/`) through its entry function on stable Rust, checks its seeds
//! and (ignored) writes them. The other targets' inputs are replayed by
//! `common/tests/fuzz_corpus.rs`. This file works unchanged as a coordinator test
//! (`coordinator/tests/fuzz_proto_corpus.rs`) once `PROTO` and `FUZZ_DIR` point there.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../src/proto.rs"]
mod proto;

use fedinspect_common::fuzzing::Outcome;

/// `common/fuzz`, relative to the manifest of the crate this test belongs to.
const FUZZ_DIR: &str = ".";
const TARGET: &str = "proto_messages";

fn target_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(FUZZ_DIR)
        .join(kind)
        .join(TARGET)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus folder lists").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_kept_proto_input_replays_without_a_panic() {
    let corpus = files_in(&target_dir("corpus"));
    assert!(
        !corpus.is_empty(),
        "no seed corpus in {}; run the ignored test write_proto_seeds",
        target_dir("corpus").display()
    );
    let regressions = files_in(&target_dir("regressions"));
    let mut failures = Vec::new();
    let mut accepted = 0;
    for path in corpus.iter().chain(&regressions) {
        let data = fs::read(path).unwrap();
        match panic::catch_unwind(AssertUnwindSafe(|| proto::proto_messages(&data))) {
            Ok(Outcome::Accepted) => accepted += 1,
            Ok(Outcome::Refused { .. }) => {}
            Err(_) => failures.push(path.display().to_string()),
        }
    }
    eprintln!(
        "{TARGET}: {} corpus + {} regression inputs, {accepted} accepted",
        corpus.len(),
        regressions.len()
    );
    assert!(failures.is_empty(), "panicked: {}", failures.join(", "));
}

#[test]
fn proto_seeds_are_kept_and_still_accepted_or_refused_as_made() {
    for (name, bytes, accepted) in proto::seeds() {
        let fresh = proto::proto_messages(&bytes);
        assert_eq!(
            matches!(fresh, Outcome::Accepted),
            accepted,
            "{name}: {fresh:?}"
        );
        let kept = fs::read(target_dir("corpus").join(name))
            .unwrap_or_else(|e| panic!("seed {name} is not kept ({e}); write the seeds"));
        let outcome = proto::proto_messages(&kept);
        assert_eq!(
            matches!(outcome, Outcome::Accepted),
            accepted,
            "kept {name}: {outcome:?}"
        );
    }
}

#[test]
#[ignore = "writes the protocol seed corpus; run it after a protocol change"]
fn write_proto_seeds() {
    let dir = target_dir("corpus");
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes, _) in proto::seeds() {
        fs::write(dir.join(name), &bytes).unwrap();
        eprintln!("{TARGET}/{name}: {} bytes", bytes.len());
    }
}
