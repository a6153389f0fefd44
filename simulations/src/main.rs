//! `simulate`: federations of plants on one machine, driving the product's own training,
//! codecs, aggregation and signing code.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use fedinspect_common::delta::Codec;
use fedinspect_simulations::quickstart::{self, QuickstartConfig};

#[derive(Parser)]
#[command(name = "simulate", version, about = "Simulated fedinspect federations")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Three plants, a few rounds of real training and FedAvg, a table of global mAP per round.
    Quickstart {
        /// DeepPCB PCBData folder (holds trainval.txt and test.txt). Without it, synthetic
        /// plants are generated.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Folder for models, keys and reports (a rerun replaces the models).
        #[arg(long, default_value = ".fedinspect/quickstart")]
        out: PathBuf,
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Optimizer steps per plant per round.
        #[arg(long, default_value_t = 60)]
        local_steps: u64,
        /// Delta codec: f32, f16, q8 or q8:<block>.
        #[arg(long, default_value = "q8")]
        codec: Codec,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Evaluate at most this many test images per round (0 = all).
        #[arg(long, default_value_t = 0)]
        eval_limit: usize,
        /// LibTorch CPU threads.
        #[arg(long, default_value_t = 2)]
        threads: i32,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Quickstart {
            data,
            out,
            rounds,
            local_steps,
            codec,
            seed,
            eval_limit,
            threads,
        } => {
            let cfg = QuickstartConfig {
                data,
                out,
                rounds,
                local_steps,
                codec,
                seed,
                eval_limit,
                threads,
                ..QuickstartConfig::default()
            };
            quickstart::run(&cfg)?;
        }
    }
    Ok(())
}
