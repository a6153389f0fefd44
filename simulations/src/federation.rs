//! A federation of real processes on this machine: `coordinator init-model`, then
//! `coordinator serve` and one `client run` per plant, all over mutual TLS on loopback, driven
//! and watched through the coordinator's Admin service with the site's admin certificate.
//! Every wait checks that no process died (naming its log) and that nobody interrupted;
//! dropping a `Federation` stops its processes. With [`Federation::start_in_process`] the
//! plants are [`VirtualPlants`] inside this process instead of `client run` processes (same
//! agent code, certificates, gRPC and codecs; see `virtual_plants`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fedinspect_coordinator::rpc::admin_client::{
    AdminClientError, AdminSession, ExportedModel, ModelView, PlantView, RoundDetailView,
    StatusView,
};

use crate::interrupt::Interrupt;
use crate::processes::{describe, stop_all, Binaries, Process};
use crate::site::Site;
use crate::virtual_plants::{VirtualPlant, VirtualPlants};

/// How often the coordinator is asked while waiting.
const POLL: Duration = Duration::from_millis(250);
/// How long the coordinator may take to accept admin connections after starting.
const STARTUP: Duration = Duration::from_secs(60);
/// Lines of a dead process's log shown in the error.
const TAIL_LINES: usize = 15;
/// How long plants may take to start and register.
pub const REGISTER_WAIT: Duration = Duration::from_secs(180);
/// How long the plants get to stop cleanly at the end of a run before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long stopping processes get before SIGKILL when a federation is dropped.
const DROP_GRACE: Duration = Duration::from_secs(10);

pub struct Federation {
    site: Site,
    bins: Binaries,
    runtime: tokio::runtime::Runtime,
    admin: AdminSession,
    coordinator: Process,
    plants: BTreeMap<String, Process>,
    virtual_plants: Option<VirtualPlants>,
    interrupt: Interrupt,
}

impl Federation {
    /// Stores the initial model, starts the coordinator, waits until it answers, and starts
    /// every plant of the site.
    pub fn start(site: Site, bins: Binaries, interrupt: Interrupt) -> Result<Self> {
        let mut fed = Self::start_coordinator(site, bins, interrupt)?;
        for id in fed.site.plant_ids() {
            fed.start_plant(&id)?;
        }
        Ok(fed)
    }

    /// Like [`Federation::start`], with every plant of the site an in-process agent (its
    /// `plant.toml` as written by the site; `drift` adds a plant's later configs), at most
    /// `concurrent_trainings` of them training at once.
    pub fn start_in_process(
        site: Site,
        bins: Binaries,
        interrupt: Interrupt,
        drift: &BTreeMap<String, Vec<(u64, std::path::PathBuf)>>,
        concurrent_trainings: u32,
    ) -> Result<Self> {
        let mut fed = Self::start_coordinator(site, bins, interrupt)?;
        crate::virtual_plants::log_to(&fed.site.logs().join("plants-in-process.log"))?;
        let plants: Vec<VirtualPlant> = fed
            .site
            .plant_ids()
            .into_iter()
            .map(|id| VirtualPlant {
                config: fed.site.plant_config(&id),
                drift: drift.get(&id).cloned().unwrap_or_default(),
                id,
            })
            .collect();
        fed.virtual_plants = Some(VirtualPlants::start(&plants, concurrent_trainings)?);
        Ok(fed)
    }

    /// Stores the initial model, starts the coordinator and waits until it answers.
    fn start_coordinator(site: Site, bins: Binaries, interrupt: Interrupt) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        init_model(&site, &bins, &interrupt)?;
        let config = site.coordinator_config();
        let mut coordinator = Process::spawn(
            "coordinator",
            &bins.coordinator,
            [
                Path::new("serve").as_os_str(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
            &site.logs().join("coordinator.log"),
        )?;
        let admin = connect_admin(&runtime, &site, &mut coordinator, &interrupt)?;
        Ok(Self {
            site,
            bins,
            runtime,
            admin,
            coordinator,
            plants: BTreeMap::new(),
            virtual_plants: None,
            interrupt,
        })
    }

    /// The in-process plants, when the federation runs them.
    pub fn virtual_plants(&self) -> Option<&VirtualPlants> {
        self.virtual_plants.as_ref()
    }

    pub fn site(&self) -> &Site {
        &self.site
    }

    /// Starts plant `id`'s `client run` (again, after a kill: same config, same state folder,
    /// its output appended to the same log).
    pub fn start_plant(&mut self, id: &str) -> Result<()> {
        let config = self.site.plant_config(id);
        let process = Process::spawn(
            id,
            &self.bins.client,
            [
                Path::new("run").as_os_str(),
                "--config".as_ref(),
                config.as_os_str(),
            ],
            &self.site.logs().join(format!("{id}.log")),
        )?;
        self.plants.insert(id.to_string(), process);
        Ok(())
    }

    /// Kills plant `id` at once (SIGKILL), as a crash or a power cut would; it is no longer
    /// watched until [`Federation::start_plant`] starts it again.
    pub fn kill_plant(&mut self, id: &str) -> Result<ExitStatus> {
        let mut p = self
            .plants
            .remove(id)
            .with_context(|| format!("no plant process '{id}'"))?;
        Ok(p.kill())
    }

    pub fn plant_pid(&self, id: &str) -> Option<u32> {
        self.plants.get(id).map(Process::pid)
    }

    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.pid()
    }

    /// Fails, naming the process and showing its log's end, if a process has exited.
    pub fn check_processes(&mut self) -> Result<()> {
        if let Some(v) = &mut self.virtual_plants {
            v.check()?;
        }
        for p in std::iter::once(&mut self.coordinator).chain(self.plants.values_mut()) {
            if let Some(status) = p.exited() {
                bail!(
                    "{} exited ({}); the end of its log {}:\n{}",
                    p.name(),
                    describe(status),
                    p.log().display(),
                    p.log_tail(TAIL_LINES)
                );
            }
        }
        Ok(())
    }

    pub fn status(&mut self) -> Result<StatusView> {
        self.runtime
            .block_on(self.admin.status())
            .map_err(|e| admin_err(e, "status"))
    }

    pub fn plants(&mut self) -> Result<Vec<PlantView>> {
        self.runtime
            .block_on(self.admin.plants())
            .map_err(|e| admin_err(e, "plants"))
    }

    pub fn round(&mut self, round: u64) -> Result<RoundDetailView> {
        self.runtime
            .block_on(self.admin.round(round))
            .map_err(|e| admin_err(e, "round"))
    }

    /// Version `version` as the coordinator lists it.
    pub fn model(&mut self, version: u64) -> Result<ModelView> {
        self.runtime
            .block_on(self.admin.model(version))
            .map_err(|e| admin_err(e, "models"))
    }

    /// Exports `version` into `out` through the Admin service (SHA-256 checked).
    pub fn export_model(&mut self, version: u64, out: &Path) -> Result<ExportedModel> {
        self.runtime
            .block_on(self.admin.export_model(version, out))
            .map_err(|e| admin_err(e, "export-model"))
    }

    /// Polls `ready` until it returns a value, checking the processes and the interrupt flag
    /// between polls; fails after `timeout`, saying it waited for `what`.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut Self) -> Result<Option<T>>,
    ) -> Result<T> {
        let until = Instant::now() + timeout;
        loop {
            self.interrupt.check()?;
            let polled = self.check_processes().and_then(|()| ready(self));
            if let Some(v) = polled.map_err(|e| self.interrupt.attribute(e))? {
                return Ok(v);
            }
            if Instant::now() >= until {
                bail!(
                    "{what} did not happen within {timeout:?}; see the logs in {}",
                    self.site.logs().display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until round `round` is published or failed; `progress` sees it on every poll
    /// once it is open.
    pub fn wait_for_round(
        &mut self,
        round: u64,
        timeout: Duration,
        progress: &mut dyn FnMut(&RoundDetailView),
    ) -> Result<RoundDetailView> {
        self.wait_for(&format!("the end of round {round}"), timeout, |fed| {
            if fed.status()?.current_round < round {
                return Ok(None);
            }
            let detail = fed.round(round)?;
            progress(&detail);
            Ok(matches!(detail.round.state.as_str(), "published" | "failed").then_some(detail))
        })
    }

    /// Stops the plants, then the coordinator (SIGTERM, SIGKILL after `grace`), and returns
    /// how each ended.
    pub fn stop(&mut self, grace: Duration) -> Vec<(String, ExitStatus)> {
        self.stop_virtual_plants(grace);
        let mut ended = Vec::new();
        let mut plants: Vec<&mut Process> = self.plants.values_mut().collect();
        let statuses = stop_all(&mut plants, grace);
        ended.extend(plants.iter().map(|p| p.name().to_string()).zip(statuses));
        ended.push(("coordinator".to_string(), self.coordinator.stop(grace)));
        ended
    }
}

impl Federation {
    /// Stops the in-process plants (if any, and not yet stopped); returns those that ended
    /// with an error, and the error.
    pub fn stop_virtual_plants(&mut self, grace: Duration) -> Vec<(String, String)> {
        self.virtual_plants
            .take()
            .map(|mut v| v.stop(grace))
            .unwrap_or_default()
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        self.stop(DROP_GRACE);
    }
}

/// Runs `coordinator init-model`, storing the site's initial model as version 1.
fn init_model(site: &Site, bins: &Binaries, interrupt: &Interrupt) -> Result<()> {
    let config = site.coordinator_config();
    let initial = site.initial_model();
    let mut p = Process::spawn(
        "coordinator init-model",
        &bins.coordinator,
        [
            Path::new("init-model").as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
            "--from".as_ref(),
            initial.as_os_str(),
        ],
        &site.logs().join("coordinator-init-model.log"),
    )?;
    let until = Instant::now() + STARTUP;
    let status = loop {
        interrupt.check()?;
        if let Some(s) = p.exited() {
            break s;
        }
        if Instant::now() >= until {
            bail!("coordinator init-model did not finish within {STARTUP:?}");
        }
        std::thread::sleep(POLL);
    };
    if !status.success() {
        bail!(
            "coordinator init-model failed ({}):\n{}",
            describe(status),
            p.log_tail(TAIL_LINES)
        );
    }
    Ok(())
}

/// Connects to the starting coordinator's Admin service, retrying until it listens.
fn connect_admin(
    runtime: &tokio::runtime::Runtime,
    site: &Site,
    coordinator: &mut Process,
    interrupt: &Interrupt,
) -> Result<AdminSession> {
    let files = site.pki.admin_files();
    let until = Instant::now() + STARTUP;
    loop {
        interrupt.check()?;
        if let Some(status) = coordinator.exited() {
            bail!(
                "the coordinator exited at start ({}); the end of its log {}:\n{}",
                describe(status),
                coordinator.log().display(),
                coordinator.log_tail(TAIL_LINES)
            );
        }
        let attempt = runtime.block_on(async {
            let mut s = AdminSession::connect(&site.address, &files).await?;
            s.status().await?;
            Ok::<_, AdminClientError>(s)
        });
        match attempt {
            Ok(session) => return Ok(session),
            Err(e) if Instant::now() >= until => {
                return Err(admin_err(e, "status")).context(format!(
                    "the coordinator does not answer at {} after {STARTUP:?}",
                    site.address
                ))
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn admin_err(e: AdminClientError, what: &str) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("coordinator admin {what}"))
}
