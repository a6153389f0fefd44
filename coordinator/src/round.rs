//! The round driver: one task that opens rounds, waits for updates until the target or the
//! deadline, aggregates on a blocking thread and publishes the next version, recording every
//! state in sled so that a restart resumes where it stopped.
//!
//! States of a round: open → collecting → aggregating → published, or → failed when fewer
//! than `min_participants` updates arrived by the deadline (or aggregation refused them). On
//! start, a round found open or collecting resumes collecting (its accepted updates are
//! durable, its deadline is kept, its running mean is rebuilt from their blobs) and one found
//! aggregating is aggregated again; the canonical FedAvg over the same stored blobs yields the
//! same bits.
//!
//! Memory grows with the model, not with the number of plants: the published model is the
//! configured strategy's (`[aggregation]`: canonical FedAvg by default, or the coordinate-wise
//! median or trimmed mean) read from the update blobs tile by tile (`storage::DeltaFile`), and the
//! running mean is one f64 accumulator, reused from round to round. The base model stays in
//! memory from one round to the next instead of being read back and re-hashed.
//! After each round the allocator's free pages are given back (`malloc::release_free_memory`),
//! so resident memory does not creep up with the number of rounds.

use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::delta::Layout;
use fedinspect_common::fedavg::{DeltaSource, Strategy, StreamingFedAvg};
use fedinspect_common::lr_cycle::LrSpan;
use fedinspect_common::{ModelState, Tensor};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::aggregation::{self, Input};
use crate::config::AggregationStrategy;
use crate::error::CoreError;
use crate::hub::{Hub, OpenRound, Preview, PreviewCheck, PreviewOutcome};
use crate::intake::blocking;
use crate::records::{
    now_unix_ms, Contribution, ModelRecord, ModelStatus, RoundRecord, RoundState, TrainPlan,
    UpdateRecord,
};
use crate::versions::{NewVersion, Versions};

pub struct RoundDriver {
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
    /// The last published version and its model: the next round's base unless rolled back.
    last: Option<(u64, Arc<ModelState>)>,
    /// The last round's accumulator, reset for the next one (fresh pages cost more).
    spare: Option<StreamingFedAvg>,
}

/// A round's base model, shared by the driver and the blocking aggregation.
type Base = Arc<ModelState>;

/// What a publish produced.
struct Published {
    version: u64,
    model: Arc<ModelState>,
    /// Seconds spent reading the blobs and averaging, then storing the version.
    fedavg_secs: f64,
    store_secs: f64,
    plants: usize,
    samples: u64,
}

/// How a collection ended.
enum Collected {
    Close,
    Shutdown,
}

impl RoundDriver {
    pub fn new(hub: Arc<Hub>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            hub,
            shutdown,
            last: None,
            spare: None,
        }
    }

    /// Runs rounds until shutdown or `max_rounds`; returns only on shutdown or a storage
    /// failure (a failed round is recorded and the next one starts).
    pub async fn run(mut self) -> Result<(), CoreError> {
        crate::intake::resume::drop_partials_at_start(&self.hub)?;
        if let Some(round) = self.hub.store.latest_round()? {
            match round.state {
                RoundState::Open | RoundState::Collecting => {
                    tracing::info!(round = round.round, "resuming round");
                    let (open, base) = self.reopen(round).await?;
                    if let Collected::Shutdown = self.collect(&open).await? {
                        return Ok(());
                    }
                    self.close(&open, base).await?;
                }
                RoundState::Aggregating => {
                    tracing::info!(round = round.round, "recomputing the aggregation of round");
                    self.aggregate(round, None, None).await?;
                    release_free_memory().await;
                }
                RoundState::Published | RoundState::Failed => {}
            }
        }
        loop {
            let done = self.hub.store.latest_round()?.map_or(0, |r| r.round);
            let max = self.hub.policy.max_rounds;
            if max != 0 && done >= max {
                tracing::info!(rounds = done, "max_rounds reached; no more rounds");
                let _ = self.shutdown.wait_for(|stop| *stop).await;
                return Ok(());
            }
            if self.hub.policy.hold {
                tracing::info!(
                    rounds = done,
                    "round.hold = true: no round opens; plants can register and fetch the current model (restart with hold = false to train)"
                );
                let _ = self.shutdown.wait_for(|stop| *stop).await;
                return Ok(());
            }
            if !self.wait_for_plants().await {
                return Ok(());
            }
            let (open, base) = self.open(done + 1).await?;
            if let Collected::Shutdown = self.collect(&open).await? {
                return Ok(());
            }
            self.close(&open, base).await?;
            release_free_memory().await;
        }
    }

    /// Waits until `min_participants` plants have an open task stream; false on shutdown.
    async fn wait_for_plants(&mut self) -> bool {
        let mut events = self.hub.subscribe();
        loop {
            events.borrow_and_update();
            let connected = self.hub.connected().len();
            if connected >= self.hub.policy.min_participants as usize {
                return true;
            }
            tokio::select! {
                changed = events.changed() => if changed.is_err() { return false },
                _ = self.shutdown.wait_for(|stop| *stop) => return false,
            }
        }
    }

    /// Opens round `round` on the newest usable version and sends the train tasks.
    async fn open(&mut self, round: u64) -> Result<(Arc<OpenRound>, Base), CoreError> {
        let hub = self.hub.clone();
        let last = self.last.take();
        let spare = self.spare.take();
        let (base, model, acc) = blocking(move || {
            let record = hub.store.latest_usable_model()?.ok_or(CoreError::NoModel)?;
            let model = match last {
                Some((version, model)) if version == record.version => model,
                _ => Arc::new(versions(&hub).load(record.version)?.1),
            };
            let acc = match spare {
                Some(mut acc) => {
                    acc.reset(&model);
                    acc
                }
                None => StreamingFedAvg::begin(&model),
            };
            Ok((record, model, acc))
        })
        .await?;
        let sampled = self.hub.draw_sample(round)?;
        let p = &self.hub.policy;
        let now = now_unix_ms();
        let deadline_ms = i64::try_from(p.deadline.as_millis()).unwrap_or(i64::MAX);
        let mut record = RoundRecord {
            round,
            state: RoundState::Open,
            base_version: base.version,
            base_hash: base.content_hash,
            plan: TrainPlan {
                local_epochs: p.local_epochs,
                learning_rate: p.learning_rate,
                fedprox_mu: p.fedprox_mu,
                batch_size: p.batch_size,
                codec: p.codec,
                lr_span: LrSpan::for_round(round, p.lr_cycle_rounds),
            },
            opened_unix_ms: now,
            deadline_unix_ms: now.saturating_add(deadline_ms),
            closed_unix_ms: None,
            published_version: None,
            participants: 0,
            failure: None,
            bytes_received: 0,
            bytes_sent: 0,
            sampled,
        };
        self.hub.store.put_round(&record)?;
        record.state = RoundState::Collecting;
        self.hub.store.put_round(&record)?;
        self.hub.store.flush().await?;
        let open = Arc::new(OpenRound::new(
            record,
            base.signature,
            Layout::of(&model),
            Preview::new(acc),
        ));
        self.hub.set_open(open.clone())?;
        self.hub.metrics.round_opened();
        tracing::info!(round, base = open.record.base_version, "round open");
        Ok((open, model))
    }

    /// Re-opens a round found open or collecting at start, with its running mean rebuilt from
    /// the updates it had accepted.
    async fn reopen(
        &mut self,
        mut record: RoundRecord,
    ) -> Result<(Arc<OpenRound>, Base), CoreError> {
        let hub = self.hub.clone();
        let (round, version) = (record.round, record.base_version);
        let (base, model, preview) = blocking(move || {
            let (base, model) = versions(&hub).load(version)?;
            let preview = Preview::new(StreamingFedAvg::begin(&model));
            let layout = Layout::of(&model);
            for u in hub.store.updates_of_round(round)? {
                match hub.blobs.delta(&u.delta_sha256, &layout, u.codec) {
                    Ok(file) => preview.fold(&u.plant_id, u.num_samples, &file.with_scale(u.clip_scale)),
                    Err(e) => tracing::warn!(plant = %u.plant_id, error = %e, "cannot add a stored update to the running mean"),
                }
            }
            Ok((base, Arc::new(model), preview))
        })
        .await?;
        if record.state == RoundState::Open {
            record.state = RoundState::Collecting;
            self.hub.store.put_round(&record)?;
            self.hub.store.flush().await?;
        }
        let open = Arc::new(OpenRound::new(
            record,
            base.signature,
            Layout::of(&model),
            preview,
        ));
        self.hub.set_open(open.clone())?;
        Ok((open, model))
    }

    /// Waits for `target_participants` accepted updates or the deadline.
    async fn collect(&mut self, open: &OpenRound) -> Result<Collected, CoreError> {
        let mut events = self.hub.subscribe();
        let left_ms = open
            .record
            .deadline_unix_ms
            .saturating_sub(now_unix_ms())
            .max(0);
        let deadline = Instant::now() + Duration::from_millis(left_ms.unsigned_abs());
        let target = self.hub.policy.target_participants as usize;
        loop {
            events.borrow_and_update();
            if self.hub.store.updates_of_round(open.record.round)?.len() >= target {
                return Ok(Collected::Close);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Ok(Collected::Close),
                changed = events.changed() => if changed.is_err() { return Ok(Collected::Shutdown) },
                _ = self.shutdown.wait_for(|stop| *stop) => return Ok(Collected::Shutdown),
            }
        }
    }

    /// Stops accepting updates, then fails the round or aggregates it.
    async fn close(&mut self, open: &Arc<OpenRound>, base: Base) -> Result<(), CoreError> {
        self.hub.close(open.record.round);
        crate::intake::resume::drop_partials(&self.hub, None);
        let updates = self.hub.store.updates_of_round(open.record.round)?;
        let mut record = open.record.clone();
        record.participants = u32::try_from(updates.len()).unwrap_or(u32::MAX);
        record.closed_unix_ms = Some(now_unix_ms());
        record.bytes_received = updates.iter().map(|u| u.payload_bytes).sum();
        record.bytes_sent = open.bytes_sent.load(std::sync::atomic::Ordering::Relaxed);
        let min = self.hub.policy.min_participants as usize;
        if updates.len() < min {
            let why = format!(
                "only {} of the required {min} plants sent an update by the deadline",
                updates.len()
            );
            self.spare = open.preview.take();
            return self.fail(record, why).await;
        }
        record.state = RoundState::Aggregating;
        self.hub.store.put_round(&record)?;
        self.hub.store.flush().await?;
        self.aggregate(record, Some(open), Some(base)).await
    }

    /// Aggregates a round in the aggregating state and publishes its version; a refusal by
    /// the strategy or an unreadable update fails the round. Then compares the round's
    /// running mean, when it has one, with what was published.
    async fn aggregate(
        &mut self,
        record: RoundRecord,
        open: Option<&Arc<OpenRound>>,
        base: Option<Base>,
    ) -> Result<(), CoreError> {
        let hub = self.hub.clone();
        let rec = record.clone();
        let started = Instant::now();
        let result = blocking(move || {
            let base = match base {
                Some(b) => b,
                None => Arc::new(versions(&hub).load(rec.base_version)?.1),
            };
            let published = publish(&hub, rec, &base)?;
            Ok((base, published))
        })
        .await;
        match result {
            Ok((base, p)) => {
                tracing::info!(
                    round = record.round,
                    version = p.version,
                    secs = started.elapsed().as_secs_f64(),
                    fedavg_secs = p.fedavg_secs,
                    store_secs = p.store_secs,
                    "round published"
                );
                self.hub
                    .metrics
                    .round_published(started.elapsed().as_secs_f64());
                self.hub.remove_old_update_blobs().await;
                self.last = Some((p.version, p.model.clone()));
                if let Some(open) = open {
                    self.check_preview(open, base, p).await?;
                }
                Ok(())
            }
            Err(
                e @ (CoreError::Aggregation(_)
                | CoreError::BadDelta(_)
                | CoreError::Truncated { .. }),
            ) => {
                if let Some(open) = open {
                    self.spare = open.preview.take();
                }
                self.fail(record, e.to_string()).await
            }
            Err(e) => Err(e),
        }
    }

    /// Compares the round's running mean with the published model (logged, and kept in the
    /// hub for monitoring), then takes its accumulator back for the next round.
    async fn check_preview(
        &mut self,
        open: &Arc<OpenRound>,
        base: Base,
        p: Published,
    ) -> Result<(), CoreError> {
        let open = open.clone();
        let round = open.record.round;
        if self.hub.policy.aggregation != AggregationStrategy::FedAvg {
            // The running mean previews FedAvg; a robust strategy's model is not expected to
            // equal it, so a comparison would only report a meaningless difference.
            let why = format!(
                "the round was aggregated with {}; the running mean previews fedavg only",
                self.hub.policy.aggregation
            );
            self.hub.set_preview_check(PreviewCheck {
                round,
                outcome: PreviewOutcome::Unavailable(why),
            });
            self.spare = open.preview.take();
            return Ok(());
        }
        let (check, acc) = blocking(move || {
            let check = open
                .preview
                .check(round, &base, &p.model, p.plants, p.samples);
            Ok((check, open.preview.take()))
        })
        .await?;
        match &check.outcome {
            PreviewOutcome::Exact => {
                tracing::info!(round, "running mean equals the published model bit for bit")
            }
            PreviewOutcome::Rounding {
                differing,
                max_abs_diff,
            } => tracing::info!(
                round,
                differing,
                max_abs_diff,
                "running mean differs from the published model by rounding"
            ),
            PreviewOutcome::Unavailable(why) => {
                tracing::warn!(round, reason = %why, "running mean not compared")
            }
        }
        self.hub.set_preview_check(check);
        self.spare = acc;
        Ok(())
    }

    async fn fail(&mut self, mut record: RoundRecord, why: String) -> Result<(), CoreError> {
        tracing::warn!(round = record.round, reason = %why, "round failed");
        self.hub.forget_hashed_at_intake();
        record.state = RoundState::Failed;
        record.failure = Some(why);
        self.hub.store.put_round(&record)?;
        self.hub.store.flush().await?;
        self.hub.metrics.round_failed();
        self.hub.remove_old_update_blobs().await;
        Ok(())
    }
}

/// The blocking part of aggregation: opens the round's update blobs (re-hashing those this
/// process did not hash at intake), averages them canonically, stores the version and the
/// published round together.
fn publish(hub: &Hub, mut record: RoundRecord, base: &ModelState) -> Result<Published, CoreError> {
    let versions = versions(hub);
    let updates = hub.store.updates_of_round(record.round)?;
    for u in &updates {
        if !hub.take_hashed_at_intake(&u.delta_sha256) {
            hub.blobs.verify(&u.delta_sha256)?;
        }
    }
    // The configured strategy ([aggregation]); its name goes into the version's record.
    let previous = previous_step_origin(hub, &record)?;
    let strategy = aggregation::strategy_for(&hub.policy.aggregation, previous);
    let started = std::time::Instant::now();
    let model = average(hub, strategy.as_ref(), base, &updates)?;
    let fedavg_secs = started.elapsed().as_secs_f64();
    let metrics = aggregation::weighted_metrics(
        updates
            .iter()
            .map(|u| (u.plant_id.as_str(), u.num_samples, &u.metrics)),
    );
    let version = hub
        .store
        .latest_model()?
        .map_or(0, |m: ModelRecord| m.version)
        + 1;
    record.state = RoundState::Published;
    record.published_version = Some(version);
    let contributors = updates
        .iter()
        .map(|u| Contribution {
            plant_id: u.plant_id.clone(),
            num_samples: u.num_samples,
            delta_sha256: u.delta_sha256,
            plant_signature: u.plant_signature.clone(),
        })
        .collect();
    versions.store(
        NewVersion {
            version,
            model: &model,
            parent: record.base_version,
            round: record.round,
            strategy: strategy.name(),
            contributors,
            metrics,
            status: ModelStatus::Candidate,
        },
        Some(&record),
    )?;
    Ok(Published {
        version,
        model: Arc::new(model),
        fedavg_secs,
        store_secs: started.elapsed().as_secs_f64() - fedavg_secs,
        plants: updates.len(),
        samples: updates.iter().map(|u| u.num_samples).sum(),
    })
}

/// The version the round's base was aggregated from, when the strategy steps along it
/// (server momentum: `fedavg::ServerStep`); `None` for an initial base or another strategy.
/// Read from the lineage, so a restart or a rollback needs no optimiser state.
fn previous_step_origin(
    hub: &Hub,
    record: &RoundRecord,
) -> Result<Option<Arc<ModelState>>, CoreError> {
    match &hub.policy.aggregation {
        AggregationStrategy::ServerStep(s) if s.needs_previous() => {}
        _ => return Ok(None),
    }
    let base = hub
        .store
        .model(record.base_version)?
        .ok_or(CoreError::UnknownVersion(record.base_version))?;
    if base.parent == 0 {
        return Ok(None);
    }
    Ok(Some(Arc::new(versions(hub).load(base.parent)?.1)))
}

/// Most threads one aggregation uses (each reads every blob's share of its tensors).
const MAX_AGGREGATION_THREADS: usize = 4;

/// The strategy's model over the stored updates, computed in parts on up to one thread per
/// core while the plants wait; each thread reads the blobs through its own files.
fn average(
    hub: &Hub,
    strategy: &(dyn Strategy + Sync),
    base: &ModelState,
    updates: &[UpdateRecord],
) -> Result<ModelState, CoreError> {
    let layout = Layout::of(base);
    let parts = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_AGGREGATION_THREADS);
    let part = |part: usize| -> Result<Vec<(String, Tensor)>, CoreError> {
        let mut files = Vec::with_capacity(updates.len());
        for u in updates {
            let file = hub.blobs.delta(&u.delta_sha256, &layout, u.codec)?;
            files.push(file.with_scale(u.clip_scale));
        }
        let inputs: Vec<Input<'_>> = updates
            .iter()
            .zip(&files)
            .map(|(u, d)| Input {
                plant_id: &u.plant_id,
                num_samples: u.num_samples,
                delta: d as &dyn DeltaSource,
                metrics: &u.metrics,
            })
            .collect();
        Ok(aggregation::aggregate_part(
            strategy, base, &inputs, part, parts,
        )?)
    };
    let tensors = std::thread::scope(|s| {
        let others: Vec<_> = (1..parts).map(|p| s.spawn(move || part(p))).collect();
        let mut all = part(0)?;
        for t in others {
            let mine = t
                .join()
                .map_err(|_| CoreError::Internal("an aggregation thread panicked".into()))??;
            all.extend(mine);
        }
        Ok::<_, CoreError>(all)
    })?;
    Ok(ModelState::from_tensors(tensors)?)
}

/// Gives the allocator's free pages back after a round (`malloc::release_free_memory`), on a
/// blocking thread: the round's transient buffers are gone by now, and without this the
/// fragmented arenas kept them resident, round after round.
async fn release_free_memory() {
    let started = std::time::Instant::now();
    let released = tokio::task::spawn_blocking(crate::malloc::release_free_memory)
        .await
        .unwrap_or(false);
    tracing::debug!(
        released,
        secs = started.elapsed().as_secs_f64(),
        "free heap pages given back"
    );
}

fn versions(hub: &Hub) -> Versions<'_> {
    Versions {
        store: &hub.store,
        blobs: &hub.blobs,
        signer: &hub.signer,
    }
}
