//! `client`: the plant's binary. `run` is the federation agent, a fixed sequence: logging,
//! config, build, spawn, wait for a signal (or the agent's failure), drain with a deadline.
//! `train`, `eval`, `detect`, `bench` and `bundle` work on local files without a coordinator;
//! their logic is in the library's `cli` modules.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fedinspect_client::agent::Agent;
use fedinspect_client::cli;
use fedinspect_client::config::Config;

/// How long a stopping agent may take to reach a step boundary and let go.
const DRAIN: Duration = Duration::from_secs(120);

/// The fedinspect plant client: local training and evaluation, and the federation agent.
#[derive(Debug, Parser)]
#[command(name = "client", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the federation: train on every round's task until stopped (Ctrl-C, SIGTERM).
    Run {
        /// The plant.toml (see client/plant.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Train a detector on local DeepPCB data and write a checkpoint.
    Train(cli::train::TrainArgs),
    /// Evaluate a checkpoint on the DeepPCB test split.
    Eval(cli::infer::EvalArgs),
    /// Detect defects in images; writes detections.json and annotated PNGs to --out.
    Detect(cli::infer::DetectArgs),
    /// Measure training images/s and inference latency of the detector on this machine.
    Bench(cli::bench::BenchArgs),
    /// Installed inference bundles: install, rollback, show, triton (see docs/bundles.md).
    Bundle(cli::bundle::BundleArgs),
    /// Write a checkpoint's ONNX files: FP32 and, with --int8, calibrated INT8 QDQ.
    Export(cli::export::ExportArgs),
    /// Evaluate an ONNX model with onnxruntime on the DeepPCB test split (scored like eval).
    EvalOnnx(cli::eval_onnx::EvalOnnxArgs),
}

fn main() -> Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Run { config } => run(&config),
        Command::Train(args) => cli::train::run(args),
        Command::Eval(args) => cli::infer::eval(&args),
        Command::Detect(args) => cli::infer::detect(&args),
        Command::Bundle(args) => cli::bundle::run(&args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Export(args) => cli::export::run(&args),
        Command::EvalOnnx(args) => cli::eval_onnx::run(&args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let agent = Agent::build(config).context("cannot start the plant agent")?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut task = tokio::spawn(agent.run(stopped));
        let result = tokio::select! {
            () = shutdown_signal() => {
                tracing::info!("stopping at the next step boundary");
                let _ = stop.send(true);
                match tokio::time::timeout(DRAIN, &mut task).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        task.abort();
                        bail!("the agent did not stop within {DRAIN:?}; a pending update is sent on the next start");
                    }
                }
            }
            joined = &mut task => joined,
        };
        result.context("the agent task failed")??;
        tracing::info!("stopped");
        Ok(())
    })
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
