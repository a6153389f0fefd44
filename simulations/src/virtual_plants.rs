//! In-process virtual plants: N real `client::agent::Agent`s on one tokio runtime inside the
//! `simulate` process, each with its own certificate, state folder, signing key and data,
//! talking to the real coordinator process over mutual TLS gRPC with the same codecs, so a
//! large federation (hundreds of plants) fits on one machine: a plant process costs ~385 MiB
//! (mostly LibTorch), an in-process plant its data and a few buffers.
//!
//! Concurrent trainings are bounded: the agent trains on tokio's blocking pool, and this
//! runtime's pool has `concurrent_trainings` threads, which acts as a semaphore over local
//! trainings (the agent's other blocking work, bundle installs, queues behind them). It
//! changes wall time only: each training is blocking code on its own thread with its own
//! tensors and seed, so the updates, and the published models, are the same whatever the bound
//! (`tests/repeatability.rs` checks it bit for bit).
//!
//! A plant may drift: from round r it trains on other data (a camera whose lighting changed).
//! Its agent is stopped once it delivered its update of round r − 1 and rebuilt on the drifted
//! `plant.toml`, keeping its state folder, as a real plant restarted with a new config would be.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fedinspect_client::agent::{Agent, Event};
use fedinspect_client::config::Config;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One virtual plant: its `plant.toml` and, for a drifting plant, the configs it switches to.
#[derive(Clone, Debug)]
pub struct VirtualPlant {
    pub id: String,
    pub config: PathBuf,
    /// `(from_round, plant.toml)`, in increasing round order.
    pub drift: Vec<(u64, PathBuf)>,
}

/// What happened to each plant, counted from its agent's events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlantTally {
    pub delivered: u64,
    pub refused: Vec<String>,
    pub failed: Vec<String>,
    /// Data switches carried out (drift).
    pub switches: u64,
}

/// The running plants; dropping it stops them.
pub struct VirtualPlants {
    runtime: tokio::runtime::Runtime,
    shutdown: watch::Sender<bool>,
    tasks: BTreeMap<String, JoinHandle<Result<()>>>,
    tallies: Arc<Mutex<BTreeMap<String, PlantTally>>>,
    /// First fatal error of a plant, kept for [`VirtualPlants::check`].
    ended: BTreeMap<String, String>,
}

impl VirtualPlants {
    /// Builds every plant's agent (loading its data, in order) and starts them all.
    /// `concurrent_trainings` bounds how many train at once.
    pub fn start(plants: &[VirtualPlant], concurrent_trainings: u32) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(usize::try_from(concurrent_trainings.max(1)).unwrap_or(1))
            .thread_name("virtual-plant")
            .enable_all()
            .build()
            .context("cannot start the virtual plants' async runtime")?;
        let (shutdown, _) = watch::channel(false);
        let tallies = Arc::new(Mutex::new(BTreeMap::new()));
        let mut tasks = BTreeMap::new();
        for p in plants {
            // Built here, one after the other: loading data is blocking work.
            let agent = build(&p.config)?;
            tallies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p.id.clone(), PlantTally::default());
            let task = runtime.spawn(supervise(
                p.clone(),
                agent,
                shutdown.subscribe(),
                tallies.clone(),
            ));
            tasks.insert(p.id.clone(), task);
        }
        Ok(Self {
            runtime,
            shutdown,
            tasks,
            tallies,
            ended: BTreeMap::new(),
        })
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Fails, naming the plant and its error, if a plant's agent has ended.
    pub fn check(&mut self) -> Result<()> {
        let finished: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in finished {
            let task = self.tasks.remove(&id).expect("listed above");
            let why = match self.runtime.block_on(task) {
                Ok(Ok(())) => "it stopped before it was asked to".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("its task panicked or was cancelled ({e})"),
            };
            self.ended.insert(id, why);
        }
        if let Some((id, why)) = self.ended.iter().next() {
            bail!("virtual plant {id} ended: {why}");
        }
        Ok(())
    }

    /// Each plant's tally so far.
    pub fn tallies(&self) -> BTreeMap<String, PlantTally> {
        self.tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Asks every agent to stop and waits up to `grace` for them; returns the plants that
    /// ended with an error (aborting those still running).
    pub fn stop(&mut self, grace: Duration) -> Vec<(String, String)> {
        let _ = self.shutdown.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let mut failed: Vec<(String, String)> =
            std::mem::take(&mut self.ended).into_iter().collect();
        self.runtime.block_on(async {
            for (id, mut task) in tasks {
                match tokio::time::timeout(grace, &mut task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => failed.push((id, format!("{e:#}"))),
                    Ok(Err(e)) => failed.push((id, format!("task failed: {e}"))),
                    Err(_) => {
                        task.abort();
                        failed.push((id, format!("did not stop within {grace:?}")));
                    }
                }
            }
        });
        failed
    }
}

impl Drop for VirtualPlants {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            self.stop(Duration::from_secs(10));
        }
    }
}

/// Sends this process's log (the in-process agents' tracing events, level info and above) to
/// `path` from now on: the first call installs the process's subscriber, later runs of a sweep
/// move it to their own file.
pub fn log_to(path: &Path) -> Result<()> {
    static CURRENT: OnceLock<Arc<Mutex<Option<File>>>> = OnceLock::new();
    let file = File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the plants' log {}", path.display()))?;
    let mut installed = false;
    let current = CURRENT.get_or_init(|| {
        installed = true;
        Arc::new(Mutex::new(None))
    });
    *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    if installed {
        let writer = current.clone();
        // Fails only when another subscriber is installed (a test harness): then it logs there.
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || LogFile(writer.clone()))
            .try_init();
    }
    Ok(())
}

/// Writes to the current log file, or nowhere.
struct LogFile(Arc<Mutex<Option<File>>>);

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

fn build(config: &Path) -> Result<Agent> {
    let cfg =
        Config::load(config).with_context(|| format!("virtual plant {}", config.display()))?;
    Agent::build(cfg).with_context(|| format!("cannot build the agent of {}", config.display()))
}

/// Runs one plant's agent until shutdown, rebuilding it on its drifted config once it has
/// delivered the round before each drift.
async fn supervise(
    plant: VirtualPlant,
    mut agent: Agent,
    mut shutdown: watch::Receiver<bool>,
    tallies: Arc<Mutex<BTreeMap<String, PlantTally>>>,
) -> Result<()> {
    let mut stage = 0;
    loop {
        let switch_after = plant
            .drift
            .get(stage)
            .map(|(from, _)| from.saturating_sub(1));
        let mut events = agent.events();
        let (stop, stop_rx) = watch::channel(false);
        let mut run = tokio::spawn(agent.run(stop_rx));
        loop {
            tokio::select! {
                ended = &mut run => {
                    return match ended {
                        Ok(Ok(())) if *shutdown.borrow() => Ok(()),
                        Ok(Ok(())) => Err(anyhow!("the agent stopped on its own")),
                        Ok(Err(e)) => Err(anyhow::Error::new(e)),
                        Err(e) => Err(anyhow!("the agent's task failed: {e}")),
                    };
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        let _ = stop.send(true);
                        let _ = run.await;
                        return Ok(());
                    }
                }
                Some(event) = events.recv() => {
                    let delivered = tally(&tallies, &plant.id, &event);
                    if matches!((delivered, switch_after), (Some(d), Some(s)) if d >= s) {
                        break;
                    }
                }
            }
        }
        {
            let _ = stop.send(true);
            run.await
                .map_err(|e| anyhow!("the agent's task failed: {e}"))?
                .map_err(anyhow::Error::new)?;
            let (from, config) = plant.drift[stage].clone();
            tracing::info!(plant = %plant.id, from_round = from, config = %config.display(), "drift: the plant's data changes");
            agent = tokio::task::spawn_blocking(move || build(&config))
                .await
                .map_err(|e| anyhow!("rebuilding the drifted agent failed: {e}"))??;
            with_tally(&tallies, &plant.id, |t| t.switches += 1);
            stage += 1;
        }
    }
}

/// Counts `event`; returns the round when it is a delivery.
fn tally(tallies: &Mutex<BTreeMap<String, PlantTally>>, id: &str, event: &Event) -> Option<u64> {
    let mut delivered = None;
    with_tally(tallies, id, |t| match event {
        Event::Delivered { round, .. } => {
            t.delivered += 1;
            delivered = Some(*round);
        }
        Event::Refused { round, message } => t.refused.push(format!("round {round}: {message}")),
        Event::TaskFailed { round, message } => t.failed.push(format!("round {round}: {message}")),
        _ => {}
    });
    delivered
}

fn with_tally(
    tallies: &Mutex<BTreeMap<String, PlantTally>>,
    id: &str,
    f: impl FnOnce(&mut PlantTally),
) {
    let mut all = tallies.lock().unwrap_or_else(|e| e.into_inner());
    f(all.entry(id.to_string()).or_default());
}
