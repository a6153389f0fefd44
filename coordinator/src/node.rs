//! A coordinator built from its config ([`Coordinator::build`]: TLS, signing key, storage and
//! the initial model, all checked before anything listens) and running
//! ([`Coordinator::spawn`]: the gRPC server and the round driver, each a task with its span,
//! stopped together by [`Running::stop`]). TLS is accepted by our own acceptor
//! (`node::accept`) so that refused client certificates reach the audit log
//! (`node::refusal_audit`). After the database met a disk problem, `node::disk_recovery`
//! watches the data directory and [`Running::disk_recovery`] tells `main` when to restart in
//! place (`node::restart_in_place`).

mod accept;
pub mod disk_recovery;
pub mod refusal_audit;
pub mod restart_in_place;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fedinspect_common::signing::{SigningError, SigningKey};
use fedinspect_common::tls::{AuditedServerTls, Role, TlsError, TlsMaterial};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::{Config, StorageSettings};
use crate::error::CoreError;
use crate::hub::Hub;
use crate::round::RoundDriver;
use crate::rpc;
use crate::storage::{BlobStore, DiskProblem, Store};
use crate::versions::Versions;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("cannot create data_dir {}: {source}", path.display())]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Bundles(#[from] crate::bundle::BundleSetupError),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("the round driver failed: {0}")]
    Driver(#[from] CoreError),
    #[error("a coordinator task panicked or was aborted: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0} stopped without being asked to")]
    Stopped(&'static str),
    #[error("the coordinator did not drain within {0:?}; its tasks were aborted")]
    DrainTimeout(Duration),
}

impl RunError {
    /// The disk problem that stopped a task, if that is what stopped it.
    pub fn disk_problem(&self) -> Option<DiskProblem> {
        match self {
            RunError::Driver(CoreError::DiskFull(e) | CoreError::DataReadOnly(e)) => {
                e.disk_problem()
            }
            _ => None,
        }
    }
}

/// A coordinator ready to serve.
pub struct Coordinator {
    hub: Arc<Hub>,
    tls: AuditedServerTls,
    /// `[metrics] listen`, when set.
    metrics_listen: Option<SocketAddr>,
    data_dir: PathBuf,
    storage: StorageSettings,
}

/// A serving coordinator.
pub struct Running {
    addr: SocketAddr,
    hub: Arc<Hub>,
    shutdown: watch::Sender<bool>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    driver: Option<JoinHandle<Result<(), CoreError>>>,
    /// The TLS acceptor and the task auditing its refusals; they stop on the shutdown signal.
    accepting: Vec<JoinHandle<()>>,
    /// The Prometheus endpoint's address and task, when `[metrics] listen` is set.
    metrics: Option<(SocketAddr, JoinHandle<std::io::Result<()>>)>,
    /// The disk watch, with `storage.restart_when_disk_recovers`; ends when the disk took
    /// writes again after a problem. Taken by [`Running::disk_recovery`].
    recovery: Option<JoinHandle<Option<disk_recovery::Recovered>>>,
    /// Stops the disk watch at [`Running::stop`].
    recovery_abort: Option<tokio::task::AbortHandle>,
    /// A disk problem that stopped a task, for the disk watch (`Running::note_disk_problem`).
    noted_disk_problem: Arc<OnceLock<DiskProblem>>,
}

/// The store, blob store and signing key in `config.data_dir`, for commands that need no
/// network (`init-model`).
pub fn open_storage(config: &Config) -> Result<(Store, BlobStore, SigningKey), BuildError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| BuildError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let signer = SigningKey::load(&config.signing_key)?;
    let store = Store::open(&dir.join("db")).map_err(CoreError::from)?;
    let blobs = BlobStore::open(&dir.join("blobs")).map_err(CoreError::from)?;
    Ok((store, blobs, signer))
}

impl Coordinator {
    /// Loads and checks everything the coordinator needs; stores `initial_model` as version 1
    /// when no version exists yet, and refuses to build without any model.
    pub fn build(config: &Config) -> Result<Self, BuildError> {
        let material = TlsMaterial::load(&config.tls, Role::Coordinator)?;
        let tls = material.audited_server_tls(&[b"h2"])?;
        let (store, blobs, signer) = open_storage(config)?;
        if store.latest_model().map_err(CoreError::from)?.is_none() {
            let path = config.initial_model.as_ref().ok_or(CoreError::NoModel)?;
            let versions = Versions {
                store: &store,
                blobs: &blobs,
                signer: &signer,
            };
            let v1 = versions.init(path)?;
            tracing::info!(hash = %v1.content_hash.0, path = %path.display(), "stored the initial model as version 1");
        }
        let hub = Hub::new(
            store,
            blobs,
            config.round.clone(),
            config.limits.clone(),
            signer,
            material.identity().id.clone(),
        );
        if let Some(bundles) = &config.bundles {
            let push = crate::bundle::BundlePush::start(bundles.clone(), std::env::var_os("PATH"))?;
            let _ = hub.bundles.set(Arc::new(push));
        }
        Ok(Self {
            hub: Arc::new(hub),
            tls,
            metrics_listen: config.metrics_listen,
            data_dir: config.data_dir.clone(),
            storage: config.storage.clone(),
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Starts the gRPC server on `listener` and the round driver.
    pub fn spawn(self, listener: TcpListener) -> std::io::Result<Running> {
        let addr = listener.local_addr()?;
        let (shutdown, rx) = watch::channel(false);
        let mut server_rx = rx.clone();
        let bundles_rx = rx.clone();
        let signal = async move {
            let _ = server_rx.wait_for(|stop| *stop).await;
        };
        let idle = self.hub.policy.stream_idle_timeout;
        let (refusals, refused) = tokio::sync::mpsc::channel(refusal_audit::QUEUE);
        let acceptor = accept::Acceptor {
            tls: self.tls,
            handshake_timeout: idle,
            refusals,
            metrics: self.hub.metrics.clone(),
        };
        let (incoming, accepting) = acceptor.spawn(listener, rx.clone());
        let auditing = tokio::spawn(
            refusal_audit::run(self.hub.clone(), refused, rx.clone())
                .instrument(tracing::info_span!("tls_refusals")),
        );
        let server = tokio::spawn(
            rpc::serve_accepted(self.hub.clone(), incoming, idle, signal)
                .instrument(tracing::info_span!("grpc", %addr)),
        );
        let driver = tokio::spawn(
            RoundDriver::new(self.hub.clone(), rx)
                .run()
                .instrument(tracing::info_span!("rounds")),
        );
        if let Some(push) = self.hub.bundles.get() {
            tokio::spawn(
                push.clone()
                    .run(self.hub.clone(), bundles_rx)
                    .instrument(tracing::info_span!("bundles")),
            );
        }
        if let Some(gate) = self.hub.policy.promotion_gate.clone() {
            if gate.evaluate_on_publish {
                tokio::spawn(
                    crate::gate::evaluate_published(self.hub.clone(), gate, shutdown.subscribe())
                        .instrument(tracing::info_span!("evaluations")),
                );
            }
        }
        let metrics = match self.metrics_listen {
            Some(at) => Some(spawn_metrics(self.hub.clone(), at, shutdown.subscribe())?),
            None => None,
        };
        let noted_disk_problem = Arc::new(OnceLock::new());
        let recovery = self.storage.restart_when_disk_recovers.then(|| {
            let watch = disk_recovery::DiskWatch {
                store: self.hub.store.clone(),
                data_dir: self.data_dir.clone(),
                settings: self.storage.clone(),
                noted: noted_disk_problem.clone(),
            };
            tokio::spawn(
                watch
                    .run(shutdown.subscribe())
                    .instrument(tracing::info_span!("disk_watch")),
            )
        });
        tracing::info!(%addr, "coordinator serving");
        Ok(Running {
            addr,
            hub: self.hub,
            shutdown,
            server: Some(server),
            driver: Some(driver),
            accepting: vec![accepting, auditing],
            metrics,
            recovery_abort: recovery.as_ref().map(JoinHandle::abort_handle),
            recovery,
            noted_disk_problem,
        })
    }
}

/// Binds `[metrics] listen` and serves `/metrics` until shutdown.
fn spawn_metrics(
    hub: Arc<Hub>,
    at: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, JoinHandle<std::io::Result<()>>)> {
    let bind_err = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {at} (metrics.listen): {e}"),
        )
    };
    let std_listener = std::net::TcpListener::bind(at).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let listener = TcpListener::from_std(std_listener).map_err(bind_err)?;
    let addr = listener.local_addr()?;
    let signal = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let task = tokio::spawn(
        crate::metrics::server::serve(hub, listener, signal)
            .instrument(tracing::info_span!("metrics", %addr)),
    );
    tracing::info!(%addr, "metrics endpoint serving /metrics");
    Ok((addr, task))
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the metrics endpoint listens, when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Resolves if the server or the driver ends on its own, which only happens on failure.
    pub async fn failed(&mut self) -> RunError {
        let (Some(server), Some(driver)) = (self.server.as_mut(), self.driver.as_mut()) else {
            return std::future::pending().await;
        };
        tokio::select! {
            r = server => {
                self.server = None;
                match r {
                    Ok(Ok(())) => RunError::Stopped("the gRPC server"),
                    Ok(Err(e)) => e.into(),
                    Err(e) => e.into(),
                }
            }
            r = driver => {
                self.driver = None;
                match r {
                    // Even after max_rounds the driver waits for shutdown.
                    Ok(Ok(())) => RunError::Stopped("the round driver"),
                    Ok(Err(e)) => e.into(),
                    Err(e) => e.into(),
                }
            }
        }
    }

    /// A future that resolves once the data directory takes writes again after the database
    /// (or a task, [`Running::note_disk_problem`]) met a disk problem: the process should then
    /// restart in place (`node::restart_in_place`). It never resolves without
    /// `storage.restart_when_disk_recovers`, nor when taken a second time, nor after
    /// [`Running::stop`].
    pub fn disk_recovery(
        &mut self,
    ) -> impl std::future::Future<Output = disk_recovery::Recovered> + Send + 'static {
        let task = self.recovery.take();
        async move {
            if let Some(task) = task {
                match task.await {
                    Ok(Some(recovered)) => return recovered,
                    Ok(None) => {}
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!(error = %e, "the disk watch failed"),
                }
            }
            std::future::pending().await
        }
    }

    /// Tells the disk watch that a task stopped on `problem` (outside sled, which the watch
    /// sees by itself); returns whether a restart in place will follow once the disk recovers.
    pub fn note_disk_problem(&self, problem: DiskProblem) -> bool {
        let _ = self.noted_disk_problem.set(problem);
        self.recovery_abort
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }

    /// Stops the round driver, ends the task streams and drains the server, aborting whatever
    /// is left after `deadline`.
    pub async fn stop(mut self, deadline: Duration) -> Result<(), RunError> {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.recovery_abort.take() {
            task.abort();
        }
        self.hub.disconnect_all();
        if let Some((_, task)) = self.metrics.take() {
            // It stops on the same signal; a scrape in flight is not worth waiting for.
            task.abort();
        }
        let server = self.server.take();
        let driver = self.driver.take();
        let accepting = std::mem::take(&mut self.accepting);
        let aborts: Vec<_> = server
            .iter()
            .map(|h| h.abort_handle())
            .chain(driver.iter().map(|h| h.abort_handle()))
            .chain(accepting.iter().map(|h| h.abort_handle()))
            .collect();
        let drain = async {
            let mut result = Ok(());
            if let Some(d) = driver {
                if let Err(e) = d
                    .await
                    .map_err(RunError::from)
                    .and_then(|r| r.map_err(RunError::from))
                {
                    result = Err(e);
                }
            }
            if let Some(s) = server {
                if let Err(e) = s
                    .await
                    .map_err(RunError::from)
                    .and_then(|r| r.map_err(RunError::from))
                {
                    result = result.and(Err(e));
                }
            }
            for task in accepting {
                // They stop on the same signal; the auditor writes what is queued first.
                let _ = task.await;
            }
            result
        };
        match tokio::time::timeout(deadline, drain).await {
            Ok(result) => result,
            Err(_) => {
                aborts.iter().for_each(|a| a.abort());
                Err(RunError::DrainTimeout(deadline))
            }
        }
    }
}
