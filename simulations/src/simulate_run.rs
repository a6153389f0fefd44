//! `simulate run <experiment.toml>`: every run of an experiment file (the cartesian product of
//! its `[sweep]`), one after the other, each in its own folder ([`experiment_run`]), then the
//! sweep summary at the output's root. Without a data path the plants are synthetic, and it
//! says how to point it at DeepPCB.
//!
//! [`experiment_run`]: crate::experiment_run

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::experiment::{Experiment, Source};
use crate::experiment_run::run_one;
use crate::interrupt::Interrupt;
use crate::processes::Binaries;
use crate::progress::Clock;
use crate::run_metrics::RunMetrics;
use crate::run_report::write_summary;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub experiment: PathBuf,
    /// A DeepPCB `PCBData` folder or a COCO training JSON; replaces the file's `data.path`.
    pub data: Option<PathBuf>,
    /// Output folder; default `.fedinspect/experiments/<name>`.
    pub out: Option<PathBuf>,
    /// Folder of the `coordinator` and `client` binaries; `None`: beside this program.
    pub binaries: Option<PathBuf>,
}

/// Runs the experiment; returns every run's metrics in sweep order.
pub fn run(opts: &RunOptions, interrupt: Interrupt) -> Result<Vec<RunMetrics>> {
    let exp = Experiment::load(&opts.experiment, opts.data.as_deref())?;
    let bins = match &opts.binaries {
        Some(dir) => Binaries::in_dir(dir)?,
        None => Binaries::beside_current_exe()?,
    };
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| Path::new(".fedinspect/experiments").join(&exp.base.name));
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = fs::canonicalize(&out)?;
    if exp.base.data.source == Source::Synthetic {
        println!(
            "no data path: the plants are synthetic boards. For real PCB data pass --data /path/to/DeepPCB/PCBData \
             (the folder holding trainval.txt and test.txt), or set source = \"deeppcb\" and path in [data]"
        );
    }
    let runs = exp.sweep.expand(&exp.base);
    let clock = Clock::start();
    clock.say(format!(
        "experiment {}: {} run(s) into {}",
        exp.base.name,
        runs.len(),
        out.display()
    ));
    let mut done = Vec::with_capacity(runs.len());
    for (i, run) in runs.iter().enumerate() {
        clock.say(format!("run {}/{}: {}", i + 1, runs.len(), run.label));
        let metrics = run_one(run, &out, &bins, &interrupt, &clock)
            .with_context(|| format!("run {} failed", run.label))?;
        done.push(metrics);
        // The summary is rewritten after every run, so a stopped sweep keeps what it finished.
        write_summary(&done, &exp.base.name, &out)?;
    }
    clock.say(format!(
        "done: summary in {}/report.md and summary.csv",
        out.display()
    ));
    Ok(done)
}
