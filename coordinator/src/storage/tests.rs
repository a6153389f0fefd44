//! Storage tests: a model-based test that replays random update records, with restarts,
//! against a `BTreeMap`; version immutability; the format version key; the blob store.

use std::collections::BTreeMap;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelHash;

use super::*;
use crate::records::{Digest, ModelHashText, UpdateId};

fn update(round: u64, plant: &str, id: u8) -> UpdateRecord {
    UpdateRecord {
        update_id: UpdateId([id; 16]),
        round,
        plant_id: plant.to_string(),
        base_version: round,
        codec: Codec::q8(),
        num_samples: 10 + u64::from(id),
        payload_bytes: 100,
        delta_sha256: Digest([id; 32]),
        plant_signature: vec![id; 3],
        metrics: BTreeMap::from([("loss".to_string(), 0.5)]),
        l2_norm: 1.5,
        clip_scale: Some(0.25),
        received_unix_ms: 1,
    }
}

fn model(version: u64, hash: u8) -> ModelRecord {
    ModelRecord {
        version,
        parent: version - 1,
        round: version - 1,
        content_hash: ModelHashText(ModelHash([hash; 32])),
        blob_sha256: Digest([hash; 32]),
        size_bytes: 10,
        signature: vec![1; 64],
        strategy: "fedavg".into(),
        contributors: Vec::new(),
        metrics: BTreeMap::new(),
        created_unix_ms: 5,
        status: ModelStatus::Candidate,
    }
}

/// SplitMix64, so the test needs no dependency and replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn update_records_match_a_map_model_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    // The model: (round, plant) -> record, and id -> (round, plant).
    let mut slots: BTreeMap<(u64, String), UpdateRecord> = BTreeMap::new();
    let mut ids: BTreeMap<u8, (u64, String)> = BTreeMap::new();
    let mut rng = Rng(42);
    for step in 0..400 {
        if rng.below(40) == 0 {
            store.flush_blocking().unwrap();
            drop(store);
            store = Store::open(dir.path()).unwrap();
        }
        let round = 1 + rng.below(3);
        let plant = format!("plant-{}", rng.below(4));
        let id = rng.below(30) as u8;
        let rec = update(round, &plant, id);
        let expected = match ids.get(&id) {
            Some(slot) if slot.1 == plant => RecordOutcome::Duplicate(slots[slot].clone()),
            Some(slot) => RecordOutcome::IdTaken {
                plant_id: slot.1.clone(),
            },
            None => match slots.get(&(round, plant.clone())) {
                Some(existing) => RecordOutcome::PlantAlreadyContributed(existing.clone()),
                None => {
                    slots.insert((round, plant.clone()), rec.clone());
                    ids.insert(id, (round, plant.clone()));
                    RecordOutcome::Inserted
                }
            },
        };
        assert_eq!(store.record_update(&rec).unwrap(), expected, "step {step}");
    }
    store.flush_blocking().unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    for round in 1..=3 {
        let got = store.updates_of_round(round).unwrap();
        let want: Vec<_> = slots
            .iter()
            .filter(|((r, _), _)| *r == round)
            .map(|(_, u)| u.clone())
            .collect();
        assert_eq!(got, want, "round {round} in plant order");
    }
    for (id, slot) in &ids {
        let got = store.update_by_id(&UpdateId([*id; 16])).unwrap().unwrap();
        assert_eq!(&got, &slots[slot]);
    }
}

#[test]
fn a_version_never_changes_but_storing_it_again_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let v2 = model(2, 7);
    let round = crate::records::RoundRecord {
        round: 1,
        state: crate::records::RoundState::Published,
        base_version: 1,
        base_hash: ModelHashText(ModelHash([0; 32])),
        plan: crate::records::TrainPlan {
            local_epochs: 1,
            learning_rate: 0.1,
            fedprox_mu: 0.0,
            batch_size: 4,
            codec: Codec::F16,
            lr_span: None,
        },
        opened_unix_ms: 0,
        deadline_unix_ms: 10,
        closed_unix_ms: Some(5),
        published_version: Some(2),
        participants: 2,
        failure: None,
        bytes_received: 200,
        bytes_sent: 300,
        sampled: Vec::new(),
    };
    store.insert_model(&v2, Some(&round)).unwrap();
    assert_eq!(store.round(1).unwrap().unwrap(), round);
    let mut again = v2.clone();
    again.created_unix_ms = 99;
    store.insert_model(&again, None).unwrap();
    assert_eq!(store.model(2).unwrap().unwrap(), v2, "first record kept");
    let err = store.insert_model(&model(2, 8), None).unwrap_err();
    assert!(matches!(err, StorageError::VersionExists(2)), "{err}");
    assert_eq!(store.round(1).unwrap().unwrap(), round);
    assert_eq!(store.latest_round().unwrap().unwrap().round, 1);
}

#[test]
fn latest_usable_model_skips_rolled_back_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for v in 1..=3 {
        store.insert_model(&model(v, v as u8), None).unwrap();
    }
    let mut v3 = store.model(3).unwrap().unwrap();
    v3.status = ModelStatus::RolledBack;
    store.commit_promotion(&[v3], &[1, 3]).unwrap();
    assert_eq!(store.latest_usable_model().unwrap().unwrap().version, 2);
    assert_eq!(store.latest_model().unwrap().unwrap().version, 3);
    assert_eq!(store.promotion_history().unwrap(), vec![1, 3]);
    let newest: Vec<u64> = store.models(2).unwrap().iter().map(|m| m.version).collect();
    assert_eq!(newest, vec![3, 2]);
    let page = |below, limit| -> Vec<u64> {
        let models = store.models_below(below, limit).unwrap();
        models.iter().map(|m| m.version).collect()
    };
    assert_eq!(page(3, 10), vec![2, 1]);
    assert_eq!(page(u64::MAX, 2), vec![3, 2]);
    assert_eq!(page(2, 1), vec![1]);
    assert_eq!(page(1, 10), Vec::<u64>::new());
}

#[test]
fn another_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.meta.insert(FORMAT_KEY, &7u32.to_be_bytes()).unwrap();
        store.flush_blocking().unwrap();
    }
    let err = Store::open(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            StorageError::FormatVersion {
                found: 7,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn blobs_are_content_addressed_and_uploads_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::open(dir.path()).unwrap();
    let d = blobs.put_bytes(b"model bytes").unwrap();
    assert_eq!(d, Digest::of(b"model bytes"));
    assert_eq!(blobs.read(&d).unwrap(), b"model bytes");
    blobs.verify(&d).unwrap();

    let mut up = blobs.incoming().unwrap();
    up.write(b"delta ").unwrap();
    assert_eq!(
        std::fs::read(up.path()).unwrap(),
        b"delta ",
        "readable while written"
    );
    up.write(b"bytes").unwrap();
    assert_eq!(up.digest(), Digest::of(b"delta bytes"));
    up.sync().unwrap();
    let d2 = up.commit().unwrap();
    assert_eq!(blobs.read(&d2).unwrap(), b"delta bytes");

    // A dropped upload leaves nothing; one left by a crash is removed at the next open.
    let mut dropped = blobs.incoming().unwrap();
    dropped.write(b"partial").unwrap();
    drop(dropped);
    assert_eq!(
        std::fs::read_dir(dir.path().join("incoming"))
            .unwrap()
            .count(),
        0
    );
    std::fs::write(dir.path().join("incoming").join("x.part"), b"crash").unwrap();
    BlobStore::open(dir.path()).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("incoming"))
            .unwrap()
            .count(),
        0
    );

    std::fs::write(blobs.path_of(&d), b"tampered").unwrap();
    assert!(blobs.read(&d).is_err());
    let err = blobs.verify(&d).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    std::fs::remove_file(blobs.path_of(&d)).unwrap();
    assert!(matches!(
        blobs.verify(&d).unwrap_err(),
        StorageError::MissingBlob(_)
    ));
}

#[test]
fn a_round_record_written_before_the_byte_counters_reads_as_zero_bytes() {
    let old = r#"{"round":3,"state":"published","base_version":2,
        "base_hash":"0000000000000000000000000000000000000000000000000000000000000000",
        "plan":{"local_epochs":1,"learning_rate":0.1,"fedprox_mu":0.0,"batch_size":4,"codec":"f16"},
        "opened_unix_ms":0,"deadline_unix_ms":10,"closed_unix_ms":5,"published_version":3,
        "participants":2,"failure":null}"#;
    let r: crate::records::RoundRecord = serde_json::from_str(old).unwrap();
    assert_eq!((r.round, r.bytes_received, r.bytes_sent), (3, 0, 0));
}

#[test]
fn many_concurrent_flushes_all_complete() {
    // sled's flush_async loses wake-ups when awaited concurrently (sled #1308); Store::flush
    // must not, or every plant registering at once hangs. The flushes run on their own
    // thread and runtime, so that a hang fails this test instead of hanging it.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let flushing = store.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..64u8 {
                let store = flushing.clone();
                tasks.spawn(async move {
                    store
                        .record_update(&update(1, &format!("plant-{i}"), i))
                        .unwrap();
                    store.flush().await.unwrap();
                });
            }
            while let Some(t) = tasks.join_next().await {
                t.unwrap();
            }
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("every concurrent flush completes");
    assert_eq!(store.updates_of_round(1).unwrap().len(), 64);
}

#[test]
fn check_reports_records_that_point_at_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let blobs = BlobStore::open(&dir.path().join("blobs")).unwrap();
    // Version 2 names parent 1 and round 1, neither stored; its blob is absent.
    store.insert_model(&model(2, 7), None).unwrap();
    // An update of round 3, which does not exist, whose blob is absent.
    assert_eq!(
        store.record_update(&update(3, "plant-1", 1)).unwrap(),
        RecordOutcome::Inserted
    );
    let report = check::check(&store, &blobs).unwrap();
    let p = &report.problems;
    let has = |text: &str| p.iter().any(|x| x.contains(text));
    assert!(has("model version 2: blob"), "{p:#?}");
    assert!(has("its parent version 1 is missing"), "{p:#?}");
    assert!(has("its round 1 is missing"), "{p:#?}");
    assert!(has("of plant plant-1 in round 3: blob"), "{p:#?}");
    assert!(has("round 3 is missing"), "{p:#?}");
    assert_eq!((report.models_checked, report.updates_checked), (1, 1));
}

/// What a thread deferred through crossbeam-epoch (as sled does for replaced pages and sealed
/// log buffers) is freed by other threads once `release_deferred` handed it on, although the
/// deferring thread stays alive and never pins again (an idle blocking-pool thread). Without
/// the release it would wait in that thread's bag until the thread exits.
#[test]
fn garbage_deferred_by_an_idle_thread_is_freed_after_release() {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let (deferred_tx, deferred_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let flag = Flag(dropped.clone());
    let idle = std::thread::spawn(move || {
        let guard = crossbeam_epoch::pin();
        guard.defer(move || drop(flag));
        drop(guard);
        release_deferred();
        deferred_tx.send(()).unwrap();
        // Alive, idle, never pinning again until the test ends.
        let _ = done_rx.recv();
    });
    deferred_rx.recv().unwrap();
    let started = std::time::Instant::now();
    while !dropped.load(Ordering::SeqCst) && started.elapsed() < std::time::Duration::from_secs(10)
    {
        // Other threads' pins advance the epoch and collect the global queue.
        crossbeam_epoch::pin().flush();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let freed = dropped.load(Ordering::SeqCst);
    done_tx.send(()).unwrap();
    idle.join().unwrap();
    assert!(
        freed,
        "the deferred object was not freed while its thread idled"
    );
}
