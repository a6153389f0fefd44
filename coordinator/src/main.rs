//! `coordinator`: serve a federation, store the initial model, or administer a running
//! coordinator. `serve` is a fixed sequence: logging, config, build, spawn, wait for a signal
//! (or a failure), drain with a deadline; or, after the disk recovered from a problem the
//! database cannot undo, drain briefly and restart in place (`node::restart_in_place`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedinspect_common::pki::PkiLayout;
use fedinspect_common::tls::TlsFiles;
use fedinspect_coordinator::node::disk_recovery::Recovered;
use fedinspect_coordinator::node::restart_in_place::{self, Marker};
use fedinspect_coordinator::node::{open_storage, Coordinator, Running};
use fedinspect_coordinator::rpc::admin_client::{self, AdminCommand};
use fedinspect_coordinator::versions::Versions;
use fedinspect_coordinator::Config;

/// How long a stopping coordinator waits for uploads and downloads in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// The fedinspect coordinator: federated rounds, FedAvg, versioned signed models.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the federation and admin services and run rounds until stopped (Ctrl-C, SIGTERM).
    Serve {
        /// The coordinator.toml (see coordinator.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Store a safetensors checkpoint as model version 1 of an empty coordinator.
    InitModel {
        #[arg(long)]
        config: PathBuf,
        /// float32 safetensors checkpoint, named by VarStore paths.
        #[arg(long = "from")]
        from: PathBuf,
    },
    /// Query or change a running coordinator with an admin certificate.
    Admin(AdminArgs),
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The coordinator's address.
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    addr: String,
    /// A PKI folder from `fedinspect-certs init`: uses its ca.pem, admin.pem and admin.key.
    #[arg(long, required_unless_present_all = ["ca", "cert", "key"])]
    pki: Option<PathBuf>,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: AdminCmd,
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    /// Round, versions and plant counts.
    Status,
    /// Registered plants.
    Plants,
    /// Recent rounds, newest first.
    Rounds {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Recent model versions, newest first.
    Models {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One round in full: times, base size and every accepted update.
    Round { round: u64 },
    /// Write a version's safetensors file (as plants download it) to a file, SHA-256 checked.
    ExportModel {
        #[arg(long)]
        version: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Promote a version (needs eval_map50 at least the promoted one's, unless --force).
    Promote {
        version: u64,
        #[arg(long)]
        force: bool,
    },
    /// Roll the promoted version back (to the previous promoted one unless --to).
    Rollback {
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
    /// The audit log, newest first: refusals, revocations, promotions, rollbacks, exports.
    Audit {
        /// Only this kind: refusal, revocation, promotion, rollback, export or other.
        #[arg(long, default_value = "")]
        kind: String,
        /// Only entries about this plant.
        #[arg(long, default_value = "")]
        plant: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Check the data directory: re-hash every model and kept update blob, cross-check the
    /// database indexes. Exits non-zero when it finds a problem.
    Check,
    /// Refuse a plant from now on.
    Revoke {
        plant: String,
        #[arg(long)]
        reason: String,
    },
    /// Release a plant's pinned update-signing key, after enrolling it again with a new key:
    /// its next registration pins the new key.
    ReleaseKey { plant: String },
    /// Inference bundles: the push in force (`status`), or send a canary-installed bundle to
    /// every plant (`confirm <version>`).
    #[command(subcommand)]
    Bundle(BundleCmd),
}

#[derive(Debug, Subcommand)]
enum BundleCmd {
    /// The bundle being pushed, its stage and every plant's install report.
    Status,
    /// Push the bundle of VERSION, installed by the canary plants, to every plant.
    Confirm {
        version: u64,
        /// Confirm although a canary plant reported a failure.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> Result<()> {
    // Before the runtime starts threads that would each take an arena.
    fedinspect_coordinator::malloc::limit_arenas();
    init_logging();
    // Before the runtime's threads start: it removes an environment variable.
    let restarted = restart_in_place::take_marker();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve { config } => {
            let served = match runtime.block_on(serve(config, restarted.as_ref())) {
                Ok(Served::RestartInPlace(marker)) => {
                    // exec ends every thread, stuck storage calls included, and closes the
                    // database and the sockets; it returns only if it failed.
                    let e = restart_in_place::exec(&marker);
                    Err(anyhow::anyhow!(
                        "cannot restart in place (exec /proc/self/exe): {e}; restart the coordinator"
                    ))
                }
                Ok(Served::Stopped) => Ok(()),
                Err(e) => Err(e),
            };
            // A blocking storage call that never returns (sled waits forever on a flush after a
            // write error, e.g. a full disk) must not keep the process from exiting: what was
            // acknowledged is durable already, and a restart recovers the rest.
            runtime.shutdown_timeout(BLOCKING_EXIT_WAIT);
            served
        }
        Command::InitModel { config, from } => init_model(config, from),
        Command::Admin(args) => runtime.block_on(admin(args)),
    }
}

/// How long an exiting coordinator waits for blocking work (storage calls) still running.
const BLOCKING_EXIT_WAIT: Duration = Duration::from_secs(10);

/// A restart in place execs at the latest this long after its grace, even if the drain is
/// stuck (in a storage call, say).
const RESTART_WATCHDOG: Duration = Duration::from_secs(10);

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// How `serve` ended without an error.
enum Served {
    /// Asked to stop (a signal).
    Stopped,
    /// The disk took writes again after a problem the database keeps: restart in place.
    RestartInPlace(Marker),
}

/// Why the coordinator stops serving.
enum Ending {
    Signal,
    Failed(fedinspect_coordinator::node::RunError),
    DiskRecovered(Recovered),
}

async fn serve(config_path: PathBuf, restarted: Option<&Marker>) -> Result<Served> {
    let config = Config::load(&config_path)?;
    let coordinator = Coordinator::build(&config).context("cannot start the coordinator")?;
    if let Some(marker) = restarted {
        restart_in_place::record(coordinator.hub(), marker);
    }
    // tokio sets SO_REUSEADDR, so a restart in place binds again at once although the
    // connections it closed linger in TIME_WAIT.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let mut running = coordinator.spawn(listener)?;
    let hub = running.hub().clone();
    let ending = wait_for_end(&mut running).await;
    // A database that met a disk problem is never dropped: sled flushes on drop, and that flush
    // never returns after its error. Acknowledged work is durable already; exec or exit frees
    // the rest.
    let keep_database = |hub: std::sync::Arc<fedinspect_coordinator::hub::Hub>| {
        if hub.store.database_failed().is_some() {
            std::mem::forget(hub);
        }
    };
    match ending {
        Ending::DiskRecovered(recovered) => {
            let grace = config.storage.restart_grace;
            tracing::warn!(
                "restarting in place: {recovered}; transfers in flight get {grace:?} to finish"
            );
            let marker = Marker::next(restarted, recovered.to_string());
            restart_in_place::exec_after(grace + RESTART_WATCHDOG, marker.clone());
            std::mem::forget(hub);
            match running.stop(grace).await {
                Ok(()) => tracing::info!("drained; restarting in place"),
                Err(e) => {
                    tracing::warn!(error = %e, "restarting in place although the drain did not end cleanly")
                }
            }
            Ok(Served::RestartInPlace(marker))
        }
        Ending::Failed(e) => {
            tracing::info!("stopping: draining connections");
            keep_database(hub);
            let _ = running.stop(DRAIN).await;
            Err(e.into())
        }
        Ending::Signal => {
            tracing::info!("stopping: draining connections");
            keep_database(hub);
            running.stop(DRAIN).await?;
            tracing::info!("stopped");
            Ok(Served::Stopped)
        }
    }
}

/// Waits for a signal, a failure or the disk's recovery. A task that stopped on a disk problem
/// does not end the process when a restart in place can follow: reads are served until then.
async fn wait_for_end(running: &mut Running) -> Ending {
    let recovery = running.disk_recovery();
    tokio::pin!(recovery);
    loop {
        tokio::select! {
            () = shutdown_signal() => return Ending::Signal,
            e = running.failed() => match e.disk_problem() {
                Some(problem) if running.note_disk_problem(problem) => {
                    tracing::error!(error = %e, "a coordinator task stopped on a {problem}; serving reads and restarting in place once data_dir takes writes again");
                }
                _ => return Ending::Failed(e),
            },
            recovered = &mut recovery => return Ending::DiskRecovered(recovered),
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_model(config_path: PathBuf, from: PathBuf) -> Result<()> {
    let config = Config::load(&config_path)?;
    let (store, blobs, signer) = open_storage(&config)?;
    let versions = Versions {
        store: &store,
        blobs: &blobs,
        signer: &signer,
    };
    let v1 = versions
        .init(&from)
        .with_context(|| format!("cannot store {} as version 1", from.display()))?;
    println!(
        "version {} stored: content hash {}, {} bytes",
        v1.version, v1.content_hash.0, v1.size_bytes
    );
    Ok(())
}

async fn admin(args: AdminArgs) -> Result<()> {
    let files = admin_files(&args)?;
    let command = match args.command {
        AdminCmd::Status => AdminCommand::Status,
        AdminCmd::Plants => AdminCommand::Plants,
        AdminCmd::Rounds { limit } => AdminCommand::Rounds { limit },
        AdminCmd::Models { limit } => AdminCommand::Models { limit },
        AdminCmd::Round { round } => AdminCommand::Round { round },
        AdminCmd::ExportModel { version, out } => AdminCommand::ExportModel { version, out },
        AdminCmd::Promote { version, force } => AdminCommand::Promote { version, force },
        AdminCmd::Rollback { to } => AdminCommand::Rollback { to },
        AdminCmd::Revoke { plant, reason } => AdminCommand::Revoke { plant, reason },
        AdminCmd::ReleaseKey { plant } => AdminCommand::ReleaseKey { plant },
        AdminCmd::Audit { kind, plant, limit } => {
            AdminCommand::Audit(admin_client::AuditQuery { kind, plant, limit })
        }
        AdminCmd::Check => AdminCommand::Check,
        AdminCmd::Bundle(BundleCmd::Status) => AdminCommand::BundleStatus,
        AdminCmd::Bundle(BundleCmd::Confirm { version, force }) => {
            AdminCommand::BundleConfirm { version, force }
        }
    };
    let is_check = command == AdminCommand::Check;
    let value = admin_client::run(&args.addr, &files, command).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", admin_client::render_text(&value));
    }
    // `check` fails when it found problems, so scripts and cron notice.
    if let Some(problems) = value.get("problems").and_then(|p| p.as_array()) {
        if is_check && !problems.is_empty() {
            anyhow::bail!(
                "the data directory has {} problem(s); restore data_dir from a backup or investigate the files named",
                problems.len()
            );
        }
    }
    Ok(())
}

/// The admin's TLS files: explicit paths override those of `--pki`.
fn admin_files(args: &AdminArgs) -> Result<TlsFiles> {
    let from_pki = args
        .pki
        .as_ref()
        .map(|dir| PkiLayout::new(dir).admin_files());
    let pick = |explicit: &Option<PathBuf>, pki: Option<PathBuf>, what: &str| {
        explicit
            .clone()
            .or(pki)
            .with_context(|| format!("no admin {what} file; pass --pki DIR or --{what}"))
    };
    Ok(TlsFiles {
        ca_cert: pick(&args.ca, from_pki.as_ref().map(|f| f.ca_cert.clone()), "ca")?,
        cert: pick(
            &args.cert,
            from_pki.as_ref().map(|f| f.cert.clone()),
            "cert",
        )?,
        key: pick(&args.key, from_pki.as_ref().map(|f| f.key.clone()), "key")?,
    })
}
