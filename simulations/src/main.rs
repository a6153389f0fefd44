//! `simulate`: federations of plants on one machine. `quickstart` runs the coordinator and
//! three plant clients as real processes over mutual TLS (README command one); `run` runs an
//! experiment file (docs/simulations.md) with its baselines, sweeps and reports; `plot` draws
//! several runs' mAP by round on one chart.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fedinspect_common::delta::Codec;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::plot_csv::{self, PlotInput, PlotOptions};
use fedinspect_simulations::quickstart::{self, QuickstartConfig};
use fedinspect_simulations::simulate_run::{self, RunOptions};

#[derive(Parser)]
#[command(name = "simulate", version, about = "Simulated fedinspect federations")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A coordinator and three plant clients as processes on this machine: rounds of real
    /// training and FedAvg, a table of the global model's mAP per round.
    Quickstart {
        /// DeepPCB PCBData folder (holds trainval.txt and test.txt). Without it, synthetic
        /// plants are generated.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Folder for keys, configs, the coordinator's data, models and logs (a rerun
        /// replaces all but the keys and generated data).
        #[arg(long, default_value = ".fedinspect/quickstart")]
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Epochs each plant trains on its own data per round.
        #[arg(long, default_value_t = 3)]
        local_epochs: u32,
        /// Delta codec: f32, f16, q8 or q8:<block>.
        #[arg(long, default_value = "q8")]
        codec: Codec,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Evaluate at most this many test images per round (0 = all).
        #[arg(long, default_value_t = 0)]
        eval_limit: usize,
        /// LibTorch CPU threads of the final evaluation.
        #[arg(long, default_value_t = 2)]
        threads: i32,
        /// LibTorch CPU threads of each plant process.
        #[arg(long, default_value_t = 1)]
        plant_threads: u32,
        /// Where plants train: auto (CUDA when available), cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Runs an experiment file: per run (each combination of its [sweep]) a real federation
    /// and the centralised and local-only baselines, with metrics, plots and report.md.
    Run {
        /// The experiment file (see simulations/experiments/ and docs/simulations.md).
        experiment: PathBuf,
        /// DeepPCB PCBData folder (holds trainval.txt and test.txt), or a COCO training JSON
        /// (source "coco"; data.test_path in the file); replaces the file's data.path.
        /// Without it and without data.path, synthetic plants are generated.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output folder [default: .fedinspect/experiments/<experiment name>].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Draws mAP by round from the map_by_round.csv of several runs on one chart (PNG and
    /// SVG): arms that ran separately, side by side.
    Plot {
        /// Run folders or their map_by_round.csv, each as PATH or LABEL=PATH (the label
        /// prefixes its lines' names in the legend).
        #[arg(required = true)]
        inputs: Vec<PlotInput>,
        /// map_33 or map_50.
        #[arg(long, default_value = "map_33")]
        metric: String,
        /// global, unseen or a plant id.
        #[arg(long, default_value = "global")]
        test_set: String,
        /// Chart title [default: "<test set> <metric> by round"].
        #[arg(long)]
        title: Option<String>,
        /// Output path without extension: writes OUT.png and OUT.svg.
        #[arg(long)]
        out: PathBuf,
    },
    /// The resident-memory chart of a memory_by_round.csv (a run's, or one written from the
    /// coordinator benchmark's `--rounds-memory` figures), drawn again.
    PlotMemory {
        /// round,simulate_bytes,coordinator_bytes; an empty cell: not measured.
        csv: PathBuf,
        /// Output path without extension: writes OUT.png and OUT.svg.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    // Before any thread starts: in-process plants train on threads that would otherwise each
    // take a glibc arena of their own and keep its peak (see `experiment_run`).
    fedinspect_coordinator::malloc::limit_arenas();
    if let Err(e) = run(Cli::parse()) {
        // The cause chain, without a backtrace: these errors say what to do.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Quickstart {
            data,
            out,
            rounds,
            local_epochs,
            codec,
            seed,
            eval_limit,
            threads,
            plant_threads,
            device,
        } => {
            let cfg = QuickstartConfig {
                data,
                out,
                rounds,
                local_epochs,
                codec,
                seed,
                eval_limit,
                threads,
                plant_threads,
                device,
                ..QuickstartConfig::default()
            };
            let interrupt = Interrupt::on_signals()?;
            quickstart::run(&cfg, interrupt)?;
        }
        Command::Run {
            experiment,
            data,
            out,
        } => {
            let opts = RunOptions {
                experiment,
                data,
                out,
                binaries: None,
            };
            simulate_run::run(&opts, Interrupt::on_signals()?)?;
        }
        Command::Plot {
            inputs,
            metric,
            test_set,
            title,
            out,
        } => {
            let written = plot_csv::plot(&PlotOptions {
                inputs,
                metric,
                test_set,
                title,
                out,
            })?;
            for f in written {
                println!("wrote {}", f.display());
            }
        }
        Command::PlotMemory { csv, out } => {
            for f in plot_csv::plot_memory(&csv, &out)? {
                println!("wrote {}", f.display());
            }
        }
    }
    Ok(())
}
