//! The open round's running mean: the streaming FedAvg accumulator (O(P) memory, whatever the
//! number of plants) that intake feeds while each upload is decoded, so the average of the
//! accepted updates exists at any moment, for monitoring and early checks.
//!
//! It never defines the published model: that is the canonical FedAvg over the stored blobs
//! (`round`), and after publishing the driver compares the two ([`PreviewCheck`]): bit for bit
//! equal whenever every sum is exact (the benchmark workload), within rounding otherwise.
//! Each upload attempt is its own entry ([`Feed`]) so that a retry racing a broken first
//! attempt never collides with it: the attempt whose record lands is committed, every other is
//! taken out again by subtracting what it delivered, read back from its file.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedinspect_common::fedavg::{DeltaSource, FedAvgError, StreamingFedAvg, TILE};
use fedinspect_common::ModelState;

use super::{lock, OpenRound};

/// How long the comparison after publishing waits for attempts still being settled.
const SETTLE: Duration = Duration::from_secs(2);

/// The running mean of one round.
#[derive(Debug)]
pub struct Preview {
    /// `None` once the driver took it back at the end of the round.
    acc: Mutex<Option<StreamingFedAvg>>,
    attempts: AtomicU64,
    /// An attempt ended without being committed or taken out (its file was gone).
    incomplete: AtomicBool,
}

/// One upload attempt's entry in the running mean.
#[derive(Debug)]
pub struct Feed {
    round: Arc<OpenRound>,
    key: String,
    num_samples: u64,
    /// Adding failed once; nothing more is added, the entry must still be taken out.
    broken: bool,
    finished: bool,
}

/// The running mean's state, for monitoring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreviewStatus {
    pub plants: usize,
    pub samples: u64,
}

/// How the running mean compared with the published (canonical) model of a round.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviewCheck {
    pub round: u64,
    pub outcome: PreviewOutcome,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PreviewOutcome {
    /// Bit for bit the published model.
    Exact,
    /// Differs by rounding: `differing` values, the largest by `max_abs_diff`.
    Rounding { differing: usize, max_abs_diff: f64 },
    /// No comparison: the running mean does not hold exactly the published contributions.
    Unavailable(String),
}

impl Preview {
    pub fn new(acc: StreamingFedAvg) -> Self {
        Self {
            acc: Mutex::new(Some(acc)),
            attempts: AtomicU64::new(0),
            incomplete: AtomicBool::new(false),
        }
    }

    /// Plants counted in so far and their samples; `None` once the round gave it back.
    pub fn status(&self) -> Option<PreviewStatus> {
        lock(&self.acc).as_ref().map(|a| PreviewStatus {
            plants: a.committed().count(),
            samples: a.total_samples(),
        })
    }

    /// Takes the accumulator back (to compare it and reuse its memory next round).
    pub fn take(&self) -> Option<StreamingFedAvg> {
        lock(&self.acc).take()
    }

    /// Adds a whole stored update (a restart re-reads the accepted updates of its round).
    pub fn fold(&self, plant: &str, num_samples: u64, delta: &dyn DeltaSource) {
        let key = self.next_key(plant);
        let mut acc = lock(&self.acc);
        if let Some(a) = acc.as_mut() {
            if let Err(e) = fold(a, &key, num_samples, delta) {
                tracing::warn!(plant, error = %e, "cannot add a stored update to the running mean");
                self.incomplete.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Waits until no attempt is open, then compares the running mean of `base` with the
    /// published `canonical` model, which has `plants` contributions of `samples` in total.
    pub fn check(
        &self,
        round: u64,
        base: &ModelState,
        canonical: &ModelState,
        plants: usize,
        samples: u64,
    ) -> PreviewCheck {
        let outcome = self.compare(base, canonical, plants, samples);
        PreviewCheck { round, outcome }
    }

    fn compare(
        &self,
        base: &ModelState,
        canonical: &ModelState,
        plants: usize,
        samples: u64,
    ) -> PreviewOutcome {
        let unavailable = |why: String| PreviewOutcome::Unavailable(why);
        let started = Instant::now();
        loop {
            let acc = lock(&self.acc);
            let Some(a) = acc.as_ref() else {
                return unavailable("the running mean was given back".into());
            };
            let open = a.open_plants();
            if open > 0 && started.elapsed() < SETTLE {
                drop(acc);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if open > 0 {
                return unavailable(format!("{open} upload attempts are still open"));
            }
            if self.incomplete.load(Ordering::Relaxed) {
                return unavailable("an upload attempt could not be taken out again".into());
            }
            let status = (a.committed().count(), a.total_samples());
            if status != (plants, samples) {
                return unavailable(format!(
                    "it holds {} plants with {} samples, the published model {plants} with {samples}",
                    status.0, status.1
                ));
            }
            return match a.compare_average(base, canonical) {
                Ok((0, _)) => PreviewOutcome::Exact,
                Ok((differing, max_abs_diff)) => PreviewOutcome::Rounding {
                    differing,
                    max_abs_diff,
                },
                Err(e) => unavailable(e.to_string()),
            };
        }
    }

    fn next_key(&self, plant: &str) -> String {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed);
        format!("{plant}#{n}")
    }
}

impl OpenRound {
    /// Opens an entry for one upload attempt of `plant`; `None` when the running mean is gone
    /// or unusable (the upload goes on; only the preview misses it).
    pub fn feed(self: &Arc<Self>, plant: &str, num_samples: u64) -> Option<Feed> {
        let key = self.preview.next_key(plant);
        let mut acc = lock(&self.preview.acc);
        let a = acc.as_mut()?;
        if let Err(e) = a.begin_plant(&key, num_samples) {
            tracing::warn!(plant, error = %e, "the running mean refused an upload");
            return None;
        }
        Some(Feed {
            round: self.clone(),
            key,
            num_samples,
            broken: false,
            finished: false,
        })
    }
}

impl Feed {
    /// Adds decoded values, as the decoder delivers them.
    pub fn add(&mut self, tensor: &str, offset: usize, values: &[f32]) {
        if self.broken {
            return;
        }
        let mut acc = lock(&self.round.preview.acc);
        let Some(a) = acc.as_mut() else { return };
        if let Err(e) = a.add_values(&self.key, tensor, offset, values) {
            tracing::warn!(attempt = %self.key, error = %e, "the running mean refused values");
            self.broken = true;
        }
    }

    /// Counts the attempt in: its update was recorded.
    pub fn commit(mut self) {
        self.finished = true;
        let mut acc = lock(&self.round.preview.acc);
        let Some(a) = acc.as_mut() else { return };
        if let Err(e) = a.commit_plant(&self.key) {
            tracing::warn!(attempt = %self.key, error = %e, "cannot count an upload in the running mean");
            self.round.preview.incomplete.store(true, Ordering::Relaxed);
        }
    }

    /// Counts the attempt in with every value scaled (a clipped update): takes the values it
    /// delivered out again (`delivered`) and adds them as `scaled` reads them.
    pub fn commit_scaled(mut self, delivered: &dyn DeltaSource, scaled: &dyn DeltaSource) {
        self.finished = true;
        let preview = &self.round.preview;
        let mut acc = lock(&preview.acc);
        let Some(a) = acc.as_mut() else { return };
        let key = preview.next_key(&self.key);
        let result = a
            .discard_plant(&self.key, delivered)
            .and_then(|()| fold(a, &key, self.num_samples, scaled));
        if let Err(e) = result {
            tracing::warn!(attempt = %self.key, error = %e, "cannot rescale a clipped update in the running mean");
            preview.incomplete.store(true, Ordering::Relaxed);
        }
    }

    /// Takes the attempt out: subtracts what it delivered, read back from `delivered`.
    pub fn discard(mut self, delivered: &dyn DeltaSource) {
        self.finished = true;
        let mut acc = lock(&self.round.preview.acc);
        let Some(a) = acc.as_mut() else { return };
        if let Err(e) = a.discard_plant(&self.key, delivered) {
            tracing::warn!(attempt = %self.key, error = %e, "cannot take an upload out of the running mean");
            self.round.preview.incomplete.store(true, Ordering::Relaxed);
        }
    }

    /// Takes out an attempt that delivered no value (it failed before its first value).
    pub fn discard_empty(self) {
        self.discard(&NothingDelivered);
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if !self.finished {
            // Without its file the values cannot be subtracted: the preview is incomplete.
            self.round.preview.incomplete.store(true, Ordering::Relaxed);
        }
    }
}

/// Begins `key`, adds every value of `delta` tile by tile, and commits.
fn fold(
    acc: &mut StreamingFedAvg,
    key: &str,
    num_samples: u64,
    delta: &dyn DeltaSource,
) -> Result<(), FedAvgError> {
    acc.begin_plant(key, num_samples)?;
    let mut buf = vec![0f32; TILE];
    let mut added = || -> Result<(), FedAvgError> {
        for (name, shape) in delta.tensors() {
            let numel: usize = shape.iter().product();
            let mut offset = 0;
            while offset < numel {
                let n = TILE.min(numel - offset);
                delta
                    .read(name, offset, &mut buf[..n])
                    .map_err(|source| FedAvgError::Read {
                        plant: key.to_string(),
                        tensor: name.to_string(),
                        source,
                    })?;
                acc.add_values(key, name, offset, &buf[..n])?;
                offset += n;
            }
        }
        Ok(())
    };
    match added() {
        Ok(()) => acc.commit_plant(key),
        Err(e) => {
            // What was added came from `delta`, so it can be taken out again the same way.
            acc.discard_plant(key, delta)?;
            Err(e)
        }
    }
}

/// The delivered values of an attempt that failed before its first value: there are none
/// to read back.
struct NothingDelivered;

impl DeltaSource for NothingDelivered {
    fn tensors(&self) -> Vec<(&str, &[usize])> {
        Vec::new()
    }

    fn read(&self, name: &str, _offset: usize, _out: &mut [f32]) -> io::Result<()> {
        Err(io::Error::other(format!(
            "no value of tensor '{name}' was delivered"
        )))
    }
}
