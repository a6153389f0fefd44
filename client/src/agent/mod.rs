//! The plant's federation agent (`client run`): one async task that connects to the
//! coordinator over mutual TLS, registers, follows the task stream and carries out each train
//! task, reconnecting with exponential backoff and jitter whenever the connection fails.
//!
//! A train task, in order: check the coordinator's signature over the base (the key pinned in
//! the config), take the base from the cache or download it (`state`), train on a blocking
//! thread (`local`), sign the update, save it as pending *before* its first byte is sent, and
//! upload it. A pending update is sent again with the same update id after a broken
//! connection or a restart, so the coordinator counts it once: the agent first asks
//! `UploadStatus`, stops if the update was accepted, and otherwise resumes from the bytes the
//! coordinator holds durably (from byte 0 if it refuses the resume). A coordinator that
//! restarts is ridden out the same way: reconnect with backoff, register, deliver the pending
//! update, follow the new task stream. A refusal is logged with the coordinator's message and
//! the agent waits for the next task.
//!
//! Shutdown (the watch channel turns true) is honoured between training steps, while waiting
//! for a task, and during transfers (a pending update then waits for the next start).
//!
//! After an update is acknowledged, the activation ranges of the trained model on the plant's
//! images (`calibration`, INT8 calibration) are sent; only numbers. An install task (a signed
//! inference bundle after a promotion or rollback) is carried out by `bundle_task`: download,
//! verify and install atomically, report.
//!
//! Reading order: `types`, `error`, `rpc` (the only module that knows protobuf), `state`,
//! `local`, `capabilities`, `backoff`, `bundle_task`, then this file.

mod backoff;
pub mod bundle_task;
mod calibration;
mod capabilities;
mod error;
pub mod local;
pub mod rpc;
pub mod state;
pub mod types;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::manifests;
use fedinspect_common::ModelState;
use tch::Device;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::config::{Config, DeviceChoice};
use backoff::Backoff;
use local::{Job, Outcome, PlantData, Trained};
use rpc::Connection;
use state::{Pending, StateDir};
use types::{Capabilities, Registration, Task, TrainTask, UpdateHeader};

use error::Scope;
pub use error::{AgentError, BuildError};
pub use types::{Event, Faults};

/// How a step ended when it did not fail.
enum Step {
    Done,
    Shutdown,
}

enum SessionEnd {
    Shutdown,
    StreamEnded,
}

pub struct Agent {
    config: Config,
    data: Arc<PlantData>,
    state: StateDir,
    device: Device,
    arch: ArchConfig,
    capabilities: Capabilities,
    faults: Faults,
    events: Option<mpsc::UnboundedSender<Event>>,
    /// Newest round whose update the coordinator acknowledged in this process.
    delivered_round: Option<u64>,
    /// Sessions that failed since the last registration (for the "reconnected" report).
    failed_sessions: u32,
    /// Installed inference bundles and the engine builder (install tasks).
    bundles: bundle_task::BundleSide,
    /// AdamW's moments at the end of the last round this process trained, kept when that
    /// round did not end its learning-rate cycle (`TrainPlan::lr_span`) and continued by the
    /// cycle's next round. In memory only: a plant restarted mid-cycle starts its moments
    /// afresh, with a warmup.
    moments: Option<crate::detector::train::AdamWState>,
}

impl Agent {
    /// Loads the plant's data, resolves the device and checks the architecture; blocking.
    pub fn build(config: Config) -> Result<Self, BuildError> {
        if let Some(threads) = config.training.threads {
            tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
        }
        let device = match config.training.device {
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceChoice::Cuda => return Err(BuildError::NoCuda),
        };
        let data = PlantData::load(&config.data, &config.model, &config.training)?;
        let arch = config
            .model
            .arch(config.data.channels, data.class_names.len());
        arch.graph()?;
        let state = StateDir::open(&config.state_dir)?;
        let capabilities = capabilities::probe(device, &data);
        let bundles = bundle_task::BundleSide::open(
            &config.state_dir,
            config.coordinator.public_key,
            &capabilities.compute_capability,
        )?;
        tracing::info!(
            plant = %config.plant_id,
            device = %capabilities.device,
            samples = data.num_samples(),
            held_out = data.holdout.as_ref().map_or(0, |h| h.len()),
            "plant agent ready"
        );
        Ok(Self {
            config,
            data: Arc::new(data),
            state,
            device,
            arch,
            capabilities,
            faults: Faults::default(),
            events: None,
            delivered_round: None,
            failed_sessions: 0,
            bundles,
            moments: None,
        })
    }

    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// A receiver of every [`Event`] from now on.
    pub fn events(&mut self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.events = Some(tx);
        rx
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), or a fatal error.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", plant = %self.config.plant_id);
        async move {
            let a = &self.config.agent;
            let mut backoff = Backoff::new(a.backoff_initial, a.backoff_max);
            loop {
                let reason = match self.session(&mut backoff, &shutdown).await {
                    Ok(SessionEnd::Shutdown) => return Ok(()),
                    Ok(SessionEnd::StreamEnded) => "the coordinator ended the task stream".into(),
                    Err(e) if e.scope() == Scope::Fatal => return Err(e),
                    Err(e) => e.to_string(),
                };
                let delay = backoff.next_delay();
                self.failed_sessions = self.failed_sessions.saturating_add(1);
                tracing::warn!(%reason, delay_ms = delay.as_millis() as u64, "disconnected; reconnecting");
                self.emit(Event::Disconnected { reason });
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(shutdown.clone()) => return Ok(()),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One connection: register, deliver a pending update, then follow the task stream.
    async fn session(
        &mut self,
        backoff: &mut Backoff,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<SessionEnd, AgentError> {
        let connect = async {
            let a = &self.config.agent;
            let bounds = rpc::Bounds {
                connect: a.connect_timeout,
                call: a.call_timeout,
                stream_idle: a.stream_idle_timeout,
            };
            let mut conn =
                rpc::connect_with(&self.config.coordinator, &self.config.tls, bounds).await?;
            let key = self.config.signing_key.verifying_key();
            let reg = conn.register(&self.capabilities, &key).await.map_err(|e| {
                if e.is_transient() {
                    AgentError::Rpc(e)
                } else {
                    AgentError::Registration(e)
                }
            })?;
            Ok::<_, AgentError>((conn, reg))
        };
        let (mut conn, reg) = tokio::select! {
            r = connect => r?,
            () = stopped(shutdown.clone()) => return Ok(SessionEnd::Shutdown),
        };
        self.check_registration(&reg)?;
        backoff.reset();
        tracing::info!(coordinator = %reg.coordinator_id, "registered");
        if self.failed_sessions > 0 {
            let failed = std::mem::take(&mut self.failed_sessions);
            tracing::info!(failed, "reconnected to the coordinator");
            self.emit(Event::Reconnected { failed });
        }
        self.emit(Event::Registered {
            plant_id: reg.plant_id,
            coordinator_id: reg.coordinator_id,
        });
        if let Some(pending) = self.state.pending() {
            tracing::info!(
                round = pending.header.round,
                update = %hex::encode(pending.header.update_id),
                "sending the pending update again"
            );
            if let Step::Shutdown = self.deliver(&mut conn, pending, true, shutdown).await? {
                return Ok(SessionEnd::Shutdown);
            }
        }
        let mut tasks = conn.tasks().await?;
        loop {
            let next = tokio::select! {
                t = tasks.next() => t?,
                () = stopped(shutdown.clone()) => return Ok(SessionEnd::Shutdown),
            };
            let task = match next {
                None => return Ok(SessionEnd::StreamEnded),
                Some(Task::Other(kind)) => {
                    tracing::info!(
                        kind,
                        "this agent does not carry out such tasks yet; ignoring it"
                    );
                    continue;
                }
                Some(Task::InstallBundle(t)) => {
                    let span =
                        tracing::info_span!("install", bundle = %t.bundle_id, canary = t.canary);
                    match self
                        .install_bundle(&mut conn, t, shutdown)
                        .instrument(span)
                        .await?
                    {
                        Step::Done => continue,
                        Step::Shutdown => return Ok(SessionEnd::Shutdown),
                    }
                }
                Some(Task::Train(t)) => t,
            };
            let round = task.round;
            let span = tracing::info_span!("round", round, base = task.base_version);
            match self
                .train_round(&mut conn, task, shutdown)
                .instrument(span)
                .await
            {
                Ok(Step::Done) => {}
                Ok(Step::Shutdown) => return Ok(SessionEnd::Shutdown),
                Err(e) if e.scope() == Scope::Task => {
                    tracing::warn!(round, error = %e, "round given up");
                    self.emit(Event::TaskFailed {
                        round,
                        message: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn check_registration(&self, reg: &Registration) -> Result<(), AgentError> {
        let pinned = self.config.coordinator.public_key;
        if reg.coordinator_public_key != pinned.as_bytes() {
            return Err(AgentError::KeyMismatch {
                pinned: pinned.to_hex(),
                found: hex::encode(&reg.coordinator_public_key),
            });
        }
        if reg.plant_id != self.config.plant_id {
            return Err(AgentError::PlantIdMismatch {
                registered: reg.plant_id.clone(),
                certificate: self.config.plant_id.clone(),
            });
        }
        Ok(())
    }

    /// Carries out one train task, from the signature check to the acknowledged upload.
    async fn train_round(
        &mut self,
        conn: &mut Connection,
        task: TrainTask,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Step, AgentError> {
        if self.delivered_round.is_some_and(|r| task.round <= r) {
            tracing::info!("already delivered an update for this round; ignoring the task");
            return Ok(Step::Done);
        }
        if let Some(p) = self.state.pending() {
            if (p.header.round, p.header.base_version) == (task.round, task.base_version) {
                return self.deliver(conn, p, true, shutdown).await;
            }
            self.state.drop_pending();
        }
        let stop_at = self.stop_at(&task)?;
        manifests::verify_model(
            &self.config.coordinator.public_key,
            task.base_version,
            &task.base_hash,
            &task.base_signature,
        )
        .map_err(|e| AgentError::Base {
            version: task.base_version,
            reason: format!("its signature does not verify with the pinned coordinator key ({e})"),
        })?;
        let fetching = Instant::now();
        let Some(base) = self.base_model(conn, &task, shutdown).await? else {
            return Ok(Step::Shutdown);
        };
        // From the cache or over the network: the round's time split shows which.
        let download_seconds = fetching.elapsed().as_secs_f64();
        let Some(mut trained) = self.train(&task, base, stop_at, shutdown).await? else {
            return Ok(Step::Shutdown);
        };
        // Kept only for a next round of the same cycle: otherwise nothing reads them, and
        // they are twice the model's size.
        let continued = task.plan.moments_continue();
        self.moments = trained.report.moments.take().filter(|_| continued);
        trained
            .metrics
            .insert("download_seconds".to_string(), download_seconds);
        let calibration = std::mem::take(&mut trained.calibration);
        let header = self.signed_header(&task, &trained)?;
        let pending = Pending {
            header,
            payload: trained.payload.into(),
        };
        // Saved before the first byte goes out: a retry reuses this update id.
        self.state.save_pending(&pending, &trained.residual)?;
        let step = self.deliver(conn, pending, false, shutdown).await?;
        if self.delivered_round == Some(task.round) && !calibration.is_empty() {
            // Only numbers leave the plant; a coordinator without bundles does not want them.
            match conn.report_calibration(task.round, &calibration).await {
                Ok(()) => tracing::info!(points = calibration.len(), "calibration ranges sent"),
                Err(e) if e.code() == Some(tonic::Code::Unimplemented) => {
                    tracing::debug!(error = %e, "the coordinator takes no calibration ranges")
                }
                Err(e) => tracing::warn!(error = %e, "calibration ranges not sent"),
            }
        }
        Ok(step)
    }

    /// When training must stop to leave `deadline_margin` for the upload.
    fn stop_at(&self, task: &TrainTask) -> Result<Option<Instant>, AgentError> {
        if task.deadline_unix_ms <= 0 {
            return Ok(None);
        }
        let margin = i64::try_from(self.config.agent.deadline_margin.as_millis()).unwrap_or(0);
        let left_ms = task.deadline_unix_ms - now_unix_ms() - margin;
        if left_ms <= 0 {
            return Err(AgentError::TooLate {
                round: task.round,
                left_ms: left_ms + margin,
            });
        }
        Ok(Some(
            Instant::now() + Duration::from_millis(left_ms.unsigned_abs()),
        ))
    }

    /// The task's base from the cache, or downloaded and cached; `None` on shutdown.
    async fn base_model(
        &mut self,
        conn: &mut Connection,
        task: &TrainTask,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<ModelState>, AgentError> {
        let ready = |from_cache| Event::BaseReady {
            round: task.round,
            version: task.base_version,
            from_cache,
        };
        if let Some(model) = self.state.cached_model(&task.base_hash) {
            self.emit(ready(true));
            return Ok(Some(model));
        }
        let bytes = tokio::select! {
            b = conn.download(task.base_version) => b?,
            () = stopped(shutdown.clone()) => return Ok(None),
        };
        let refuse = |reason: String| AgentError::Base {
            version: task.base_version,
            reason,
        };
        let (model, _) = ModelState::from_safetensors_bytes(&bytes)
            .map_err(|e| refuse(format!("the download is not a model ({e})")))?;
        if model.content_hash() != task.base_hash {
            return Err(refuse(
                "the download's content hash differs from the signed one".into(),
            ));
        }
        self.state.store_model(&task.base_hash, &bytes)?;
        tracing::info!(bytes = bytes.len(), "base model downloaded");
        self.emit(ready(false));
        Ok(Some(model))
    }

    /// Trains on a blocking thread; shutdown stops it at the next step (`None`).
    async fn train(
        &mut self,
        task: &TrainTask,
        base: ModelState,
        stop_at: Option<Instant>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<Box<Trained>>, AgentError> {
        let cfg = &self.config.training;
        let batch = cfg.batch_size.unwrap_or(match task.plan.batch_size {
            0 => 8,
            n => n as usize,
        });
        let layout = fedinspect_common::delta::Layout::of(&base);
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            arch: self.arch.clone(),
            class_names: self.data.class_names.clone(),
            device: self.device,
            train: local::train_config(cfg, &task.plan, task.round, &base, self.moments.take()),
            residual: self.state.residual(&layout),
            base,
            loader: self.data.train_loader(batch)?,
            holdout: self.data.holdout_loader(),
            codec: task.plan.codec,
            cancel: cancel.clone(),
            stop_at,
        };
        let watcher = tokio::spawn({
            let rx = shutdown.clone();
            async move {
                stopped(rx).await;
                cancel.store(true, Ordering::Relaxed);
            }
        });
        let span = tracing::Span::current();
        let joined = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            local::run(job)
        })
        .await;
        watcher.abort();
        let outcome = joined.map_err(|e| AgentError::Join(e.to_string()))??;
        let trained = match outcome {
            Outcome::Cancelled => return Ok(None),
            Outcome::Trained(t) => t,
        };
        tracing::info!(
            steps = trained.report.steps,
            seconds = trained.report.seconds,
            loss = trained.report.last_loss,
            bytes = trained.payload.len(),
            "trained"
        );
        self.emit(Event::Trained {
            round: task.round,
            steps: trained.report.steps,
            seconds: trained.report.seconds,
        });
        Ok(Some(trained))
    }

    /// The update's header with a fresh update id, signed with the plant's key.
    fn signed_header(&self, task: &TrainTask, t: &Trained) -> Result<UpdateHeader, AgentError> {
        let mut header = UpdateHeader {
            update_id: rand::random(),
            round: task.round,
            base_version: task.base_version,
            base_hash: task.base_hash,
            codec: task.plan.codec,
            num_samples: self.data.num_samples(),
            payload_bytes: t.payload.len() as u64,
            payload_sha256: t.payload_sha256,
            plant_signature: Vec::new(),
            metrics: t.metrics.clone(),
        };
        header.plant_signature = header
            .manifest(&self.config.plant_id)
            .sign(&self.config.signing_key)?;
        Ok(header)
    }

    /// Uploads a pending update; `again` when it may have been sent before (then the
    /// coordinator is asked what it holds first). Acknowledged (or a duplicate): delivered.
    /// Refused: dropped, with the coordinator's message logged. The connection failed: kept
    /// for the next try.
    async fn deliver(
        &mut self,
        conn: &mut Connection,
        p: Pending,
        again: bool,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Step, AgentError> {
        let round = p.header.round;
        let id = p.header.update_id;
        let from = if again {
            let status = tokio::select! {
                r = self.resume_point(conn, &p) => r?,
                () = stopped(shutdown.clone()) => return Ok(Step::Shutdown),
            };
            match status {
                None => return self.delivered(round, id, true),
                Some(from) => from,
            }
        } else {
            0
        };
        let cut = self.faults.cut_first_upload;
        let to = if cut {
            p.header.payload_bytes / 2
        } else {
            p.header.payload_bytes
        };
        let mut sent = tokio::select! {
            r = conn.upload_range(&p.header, p.payload.clone(), from, to) => r,
            () = stopped(shutdown.clone()) => return Ok(Step::Shutdown),
        };
        if cut && sent.as_ref().err().and_then(|e| e.code()) == Some(tonic::Code::DataLoss) {
            self.faults.cut_first_upload = false; // the coordinator saw the cut-off stream
        }
        if from > 0 && sent.as_ref().is_err_and(|e| !e.is_transient()) {
            if let Err(e) = &sent {
                tracing::warn!(update = %hex::encode(id), from, refusal = %e, "the coordinator refused the resume; sending the update from byte 0");
            }
            sent = tokio::select! {
                r = conn.upload(&p.header, p.payload.clone(), 0) => r,
                () = stopped(shutdown.clone()) => return Ok(Step::Shutdown),
            };
        }
        match sent {
            Ok(_) if self.faults.lose_first_ack => {
                self.faults.lose_first_ack = false;
                Err(AgentError::InjectedAckLoss(hex::encode(id)))
            }
            Ok(ack) => self.delivered(round, id, ack.duplicate),
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                tracing::warn!(update = %hex::encode(id), refusal = %e, "the coordinator refused the update; dropping it");
                self.state.drop_pending();
                self.emit(Event::Refused {
                    round,
                    message: e.to_string(),
                });
                Ok(Step::Done)
            }
        }
    }

    /// Where to send a pending update from: `None` when the coordinator accepted it already,
    /// else its durable byte count (0 when it holds nothing or cannot say).
    async fn resume_point(
        &mut self,
        conn: &mut Connection,
        p: &Pending,
    ) -> Result<Option<u64>, AgentError> {
        let id = p.header.update_id;
        let status = match conn.upload_status(&id).await {
            Ok(s) => s,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(update = %hex::encode(id), error = %e, "cannot ask what the coordinator holds of the update; sending it from byte 0");
                return Ok(Some(0));
            }
        };
        if status.accepted {
            tracing::info!(update = %hex::encode(id), "the coordinator accepted the update already");
            return Ok(None);
        }
        let from = status.durable_bytes;
        if from == 0 || from > p.header.payload_bytes {
            return Ok(Some(0));
        }
        tracing::info!(update = %hex::encode(id), from, of = p.header.payload_bytes, "resuming the upload");
        self.emit(Event::UploadResumed {
            round: p.header.round,
            update_id: id,
            from,
        });
        Ok(Some(from))
    }

    /// Records a delivered update: the pending one becomes the last delivered.
    fn delivered(&mut self, round: u64, id: [u8; 16], duplicate: bool) -> Result<Step, AgentError> {
        self.state.delivered()?;
        self.delivered_round = self.delivered_round.max(Some(round));
        tracing::info!(update = %hex::encode(id), duplicate, "update delivered");
        self.emit(Event::Delivered {
            round,
            update_id: id,
            duplicate,
        });
        Ok(Step::Done)
    }

    fn emit(&self, event: Event) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }
}

/// Resolves once shutdown is asked for, or when nobody can ask any more.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
