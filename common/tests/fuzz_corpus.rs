//! Replays every kept fuzz input, the seed corpus (`common/fuzz/corpus/<target>/`) and the
//! minimised crashes (`common/fuzz/regressions/<target>/`), through the fuzz targets' entry
//! functions on stable Rust, so that a crash once found stays fixed without libFuzzer or
//! nightly. The ignored test `write_seed_corpus` regenerates the seeds.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use fedinspect_common::fuzzing::{seeds, Outcome, Target};

/// Targets of `common/fuzz` whose entry functions live outside this crate (they need the
/// protocol and coordinator crates); their inputs are replayed by the fuzz crate's own test.
const REPLAYED_ELSEWHERE: [&str; 1] = ["proto_messages"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none when the folder does not exist.
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

/// Runs `target` on `data`, turning a panic into an `Err` naming the input.
fn replay(target: Target, path: &Path) -> Result<Outcome, String> {
    let data = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    panic::catch_unwind(AssertUnwindSafe(|| target.run(&data))).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{} panicked: {why}", path.display())
    })
}

#[test]
fn every_kept_fuzz_input_replays_without_a_panic() {
    let mut failures = Vec::new();
    for target in Target::ALL {
        let corpus = files_in(&fuzz_dir().join("corpus").join(target.name()));
        assert!(
            !corpus.is_empty(),
            "no seed corpus for {}; run `scripts/cargo test -p fedinspect-common --test \
             fuzz_corpus -- --ignored write_seed_corpus`",
            target.name()
        );
        let regressions = files_in(&fuzz_dir().join("regressions").join(target.name()));
        let (mut accepted, mut refused) = (0, 0);
        for path in corpus.iter().chain(&regressions) {
            match replay(target, path) {
                Ok(Outcome::Accepted) => accepted += 1,
                Ok(Outcome::Refused { .. }) => refused += 1,
                Err(e) => failures.push(e),
            }
        }
        eprintln!(
            "{}: {} corpus + {} regression inputs, {accepted} accepted, {refused} refused",
            target.name(),
            corpus.len(),
            regressions.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A folder under `corpus/` or `regressions/` that no replay knows would be skipped silently.
#[test]
fn every_input_folder_belongs_to_a_known_target() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let known = Target::ALL.iter().any(|t| t.name() == name);
            if REPLAYED_ELSEWHERE.contains(&name.as_str()) {
                eprintln!("{kind}/{name}: replayed by common/fuzz's own test, not here");
            } else {
                assert!(
                    known,
                    "{kind}/{name} is not a fuzz target of fedinspect-common"
                );
            }
        }
    }
}

/// The kept seeds still reach what they were made for (a format change that makes a valid seed
/// invalid would quietly leave the fuzzer at the front door), and so do fresh ones.
#[test]
fn seeds_are_kept_and_still_accepted_or_refused_as_made() {
    for seed in seeds() {
        let kept = fuzz_dir()
            .join("corpus")
            .join(seed.target.name())
            .join(seed.name);
        let want = if seed.accepted { "accepted" } else { "refused" };
        let fresh = seed.target.run(&seed.bytes);
        assert_eq!(
            matches!(fresh, Outcome::Accepted),
            seed.accepted,
            "fresh seed {} of {} is not {want}: {fresh:?}",
            seed.name,
            seed.target.name()
        );
        let kept_outcome = replay(seed.target, &kept).unwrap();
        assert_eq!(
            matches!(kept_outcome, Outcome::Accepted),
            seed.accepted,
            "kept seed {} is not {want}: {kept_outcome:?}; regenerate the seeds",
            kept.display()
        );
    }
}

#[test]
#[ignore = "writes the seed corpus into common/fuzz/corpus; run it after a format change"]
fn write_seed_corpus() {
    for seed in seeds() {
        let dir = fuzz_dir().join("corpus").join(seed.target.name());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(seed.name), &seed.bytes).unwrap();
        eprintln!(
            "{}/{}: {} bytes",
            seed.target.name(),
            seed.name,
            seed.bytes.len()
        );
    }
}

/// How far fuzzing got, in the parsers' own terms: per target, how many inputs of a corpus
/// folder each parser accepted and which errors refused the others. Reads
/// `$FUZZ_CORPUS_DIR/<target>/` (default `common/fuzz/target/corpus-work`, where
/// `scripts/fuzz.sh` keeps what it found); with `FUZZ_REPORT_MESSAGES` set, by error message
/// (digits removed) rather than by error kind.
#[test]
#[ignore = "reports on a work corpus left by scripts/fuzz.sh"]
fn report_corpus_outcomes() {
    let dir = std::env::var_os("FUZZ_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| fuzz_dir().join("target").join("corpus-work"));
    let messages = std::env::var_os("FUZZ_REPORT_MESSAGES").is_some();
    for target in Target::ALL {
        let inputs = files_in(&dir.join(target.name()));
        if inputs.is_empty() {
            eprintln!("{}: no inputs in {}", target.name(), dir.display());
            continue;
        }
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for path in &inputs {
            let kind = match replay(target, path) {
                Ok(Outcome::Accepted) => "(accepted)".to_string(),
                Ok(Outcome::Refused { kind, message }) if messages => {
                    let shape: String = message.chars().filter(|c| !c.is_ascii_digit()).collect();
                    format!("{kind}: {}", shape.chars().take(240).collect::<String>())
                }
                Ok(Outcome::Refused { kind, .. }) => kind,
                Err(e) => panic!("{e}"),
            };
            *kinds.entry(kind).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let sep = if messages { "\n  " } else { ", " };
        eprintln!(
            "{} ({} inputs): {}",
            target.name(),
            inputs.len(),
            kinds.join(sep)
        );
    }
}
