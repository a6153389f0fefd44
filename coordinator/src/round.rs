//! The round driver: one task that opens rounds, waits for updates until the target or the
//! deadline, aggregates on a blocking thread and publishes the next version, recording every
//! state in sled so that a restart resumes where it stopped.
//!
//! States of a round: open → collecting → aggregating → published, or → failed when fewer
//! than `min_participants` updates arrived by the deadline (or aggregation refused them). On
//! start, a round found open or collecting resumes collecting (its accepted updates are
//! durable, its deadline is kept) and one found aggregating is aggregated again; the canonical
//! FedAvg over the same stored blobs yields the same bits.

use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::delta::{self, Layout};
use fedinspect_common::fedavg::{FedAvg, Strategy};
use fedinspect_common::ModelState;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::aggregation::{self, Input};
use crate::error::CoreError;
use crate::hub::{Hub, OpenRound};
use crate::intake::blocking;
use crate::records::{
    now_unix_ms, Contribution, ModelStatus, RoundRecord, RoundState, TrainPlan, UpdateRecord,
};
use crate::versions::{NewVersion, Versions};

pub struct RoundDriver {
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
}

/// How a collection ended.
enum Collected {
    Close,
    Shutdown,
}

impl RoundDriver {
    pub fn new(hub: Arc<Hub>, shutdown: watch::Receiver<bool>) -> Self {
        Self { hub, shutdown }
    }

    /// Runs rounds until shutdown or `max_rounds`; returns only on shutdown or a storage
    /// failure (a failed round is recorded and the next one starts).
    pub async fn run(mut self) -> Result<(), CoreError> {
        if let Some(round) = self.hub.store.latest_round()? {
            match round.state {
                RoundState::Open | RoundState::Collecting => {
                    tracing::info!(round = round.round, "resuming round");
                    let open = self.reopen(round).await?;
                    if let Collected::Shutdown = self.collect(&open).await? {
                        return Ok(());
                    }
                    self.close(&open).await?;
                }
                RoundState::Aggregating => {
                    tracing::info!(round = round.round, "recomputing the aggregation of round");
                    self.aggregate(round).await?;
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
            if !self.wait_for_plants().await {
                return Ok(());
            }
            let open = self.open(done + 1).await?;
            if let Collected::Shutdown = self.collect(&open).await? {
                return Ok(());
            }
            self.close(&open).await?;
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
    async fn open(&mut self, round: u64) -> Result<Arc<OpenRound>, CoreError> {
        let hub = self.hub.clone();
        let (base, model) = blocking(move || {
            let record = hub.store.latest_usable_model()?.ok_or(CoreError::NoModel)?;
            versions(&hub).load(record.version)
        })
        .await?;
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
            },
            opened_unix_ms: now,
            deadline_unix_ms: now.saturating_add(deadline_ms),
            closed_unix_ms: None,
            published_version: None,
            participants: 0,
            failure: None,
        };
        self.hub.store.put_round(&record)?;
        record.state = RoundState::Collecting;
        self.hub.store.put_round(&record)?;
        self.hub.store.flush().await?;
        let open = Arc::new(OpenRound {
            record,
            base_signature: base.signature,
            layout: Layout::of(&model),
        });
        self.hub.set_open(open.clone())?;
        tracing::info!(round, base = open.record.base_version, "round open");
        Ok(open)
    }

    /// Re-opens a round found open or collecting at start.
    async fn reopen(&mut self, mut record: RoundRecord) -> Result<Arc<OpenRound>, CoreError> {
        let hub = self.hub.clone();
        let version = record.base_version;
        let (base, model) = blocking(move || versions(&hub).load(version)).await?;
        if record.state == RoundState::Open {
            record.state = RoundState::Collecting;
            self.hub.store.put_round(&record)?;
            self.hub.store.flush().await?;
        }
        let open = Arc::new(OpenRound {
            record,
            base_signature: base.signature,
            layout: Layout::of(&model),
        });
        self.hub.set_open(open.clone())?;
        Ok(open)
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
    async fn close(&mut self, open: &OpenRound) -> Result<(), CoreError> {
        self.hub.close(open.record.round);
        let updates = self.hub.store.updates_of_round(open.record.round)?;
        let mut record = open.record.clone();
        record.participants = u32::try_from(updates.len()).unwrap_or(u32::MAX);
        record.closed_unix_ms = Some(now_unix_ms());
        let min = self.hub.policy.min_participants as usize;
        if updates.len() < min {
            let why = format!(
                "only {} of the required {min} plants sent an update by the deadline",
                updates.len()
            );
            return self.fail(record, why).await;
        }
        record.state = RoundState::Aggregating;
        self.hub.store.put_round(&record)?;
        self.hub.store.flush().await?;
        self.aggregate(record).await
    }

    /// Aggregates a round in the aggregating state and publishes its version; a refusal by
    /// the strategy or an unreadable update fails the round.
    async fn aggregate(&mut self, record: RoundRecord) -> Result<(), CoreError> {
        let hub = self.hub.clone();
        let rec = record.clone();
        let started = Instant::now();
        match blocking(move || publish(&hub, rec)).await {
            Ok(version) => {
                tracing::info!(
                    round = record.round,
                    version,
                    secs = started.elapsed().as_secs_f64(),
                    "round published"
                );
                Ok(())
            }
            Err(
                e @ (CoreError::Aggregation(_)
                | CoreError::BadDelta(_)
                | CoreError::Truncated { .. }),
            ) => self.fail(record, e.to_string()).await,
            Err(e) => Err(e),
        }
    }

    async fn fail(&mut self, mut record: RoundRecord, why: String) -> Result<(), CoreError> {
        tracing::warn!(round = record.round, reason = %why, "round failed");
        record.state = RoundState::Failed;
        record.failure = Some(why);
        self.hub.store.put_round(&record)?;
        self.hub.store.flush().await?;
        Ok(())
    }
}

/// The blocking part of aggregation: reads base and updates, averages, stores the version and
/// the published round together. Returns the new version.
fn publish(hub: &Hub, mut record: RoundRecord) -> Result<u64, CoreError> {
    let versions = versions(hub);
    let (_, base) = versions.load(record.base_version)?;
    let updates = hub.store.updates_of_round(record.round)?;
    let layout = Layout::of(&base);
    let deltas = updates
        .iter()
        .map(|u| load_delta(hub, &layout, u))
        .collect::<Result<Vec<_>, _>>()?;
    let inputs: Vec<Input<'_>> = updates
        .iter()
        .zip(&deltas)
        .map(|(u, d)| Input {
            plant_id: &u.plant_id,
            num_samples: u.num_samples,
            delta: d,
            metrics: &u.metrics,
        })
        .collect();
    let strategy = FedAvg;
    let model = aggregation::aggregate(&strategy, &base, &inputs)?;
    let metrics = aggregation::weighted_metrics(&inputs);
    let version = hub.store.latest_model()?.map_or(0, |m| m.version) + 1;
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
    Ok(version)
}

/// Decodes a stored update (checked again: the blob store is outside sled) and clips it.
fn load_delta(hub: &Hub, layout: &Layout, u: &UpdateRecord) -> Result<ModelState, CoreError> {
    let bytes = hub.blobs.read(&u.delta_sha256)?;
    let mut delta = delta::decode_to_model(bytes.as_slice(), layout, Some(u.codec))
        .map_err(CoreError::from_delta)?;
    if let Some(scale) = u.clip_scale {
        aggregation::apply_scale(&mut delta, scale);
    }
    Ok(delta)
}

fn versions(hub: &Hub) -> Versions<'_> {
    Versions {
        store: &hub.store,
        blobs: &hub.blobs,
        signer: &hub.signer,
    }
}
