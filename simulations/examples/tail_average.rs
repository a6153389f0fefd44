//! A research diagnostic, not part of the product: would the mean of the federation's last
//! few global versions score better than the last one? Past round 60 of the DeepPCB study the
//! federated map_33 wanders by a few thousandths from round to round (0.978 at 65, 0.974 at
//! 80) while the centralised model is flat; averaging the weights of consecutive versions
//! (tail averaging, as stochastic weight averaging does along one training run) removes that
//! wander if it is noise around a common optimum. This averages every version of each window
//! element by element (weights and BatchNorm statistics alike, uniform weights) and scores
//! the mean on the official test split. It reads the versions a run's coordinator stored, so
//! any window of a finished run can be tried; `data.tail_mean` in an experiment file scores
//! the last N models of every method (federated and both baselines) during the run. A
//! deployment would publish such a mean as its own version. Results: docs/simulations.md,
//! "Past the reference's budget".
//!
//!   scripts/cargo run --release -p fedinspect-simulations --example tail_average -- \
//!       RUN/site/models /path/to/PCBData 62-81 72-81 [...] [INPUT_SIZE=640] [WIDTH=1.0]
//!
//! A window `A-B` is versions A to B inclusive (`vNNNN.safetensors` in the folder).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use fedinspect_common::ModelState;
use fedinspect_simulations::evaluation::TestSet;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::site::SiteSpec;
use fedinspect_simulations::tail_mean::mean_of;
use tch::Device;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: tail_average MODELS_DIR PCBData FROM-TO [FROM-TO ...] [INPUT_SIZE=640] [WIDTH=1.0]";
    if args.len() < 3 {
        bail!("{usage}");
    }
    let models = PathBuf::from(&args[0]);
    let root = PathBuf::from(&args[1]);
    let mut windows = Vec::new();
    let mut rest = Vec::new();
    for a in &args[2..] {
        match a.split_once('-') {
            Some((from, to)) => {
                let from: u64 = from
                    .parse()
                    .with_context(|| format!("window {a}: {usage}"))?;
                let to: u64 = to.parse().with_context(|| format!("window {a}: {usage}"))?;
                ensure!(
                    from >= 1 && from <= to,
                    "window {a}: FROM must be 1 or more and at most TO"
                );
                windows.push((from, to));
            }
            None => rest.push(a.as_str()),
        }
    }
    ensure!(!windows.is_empty(), "no window given; {usage}");
    let input_size: u32 = rest
        .first()
        .map_or(Ok(640), |v| v.parse())
        .context("INPUT_SIZE")?;
    let width: f64 = rest
        .get(1)
        .map_or(Ok(1.0), |v| v.parse())
        .context("WIDTH")?;
    let arch = SiteSpec::deeppcb_arch(input_size, width);
    let test = TestSet::load(&root, input_size, 0)?;
    let interrupt = Interrupt::default();
    for (from, to) in windows {
        let mean = mean_of_versions(&models, from, to)?;
        let score = test.evaluate(&arch, &mean, Device::Cpu, &interrupt)?;
        println!(
            "mean of versions {from}-{to} ({} models): map_33 {:.4} map_50 {:.4} ({} test images)",
            to - from + 1,
            score.map_33,
            score.map_50,
            test.len()
        );
    }
    Ok(())
}

/// The element-wise mean of versions `from..=to` ([`mean_of`]).
fn mean_of_versions(dir: &Path, from: u64, to: u64) -> Result<ModelState> {
    let models = (from..=to)
        .map(|v| {
            let path = dir.join(format!("v{v:04}.safetensors"));
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let (model, _) = ModelState::from_safetensors_bytes(&bytes)
                .with_context(|| format!("{} is not a model file", path.display()))?;
            Ok(model)
        })
        .collect::<Result<Vec<_>>>()?;
    mean_of(&models.iter().collect::<Vec<_>>())
        .with_context(|| format!("versions {from}-{to} cannot be averaged"))
}
