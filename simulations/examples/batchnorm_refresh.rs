//! A research diagnostic, not part of the product: how much of a published DeepPCB model's
//! score is lost to its BatchNorm running statistics? FedAvg averages the plants' running
//! means and variances along with the weights, but those statistics describe each plant's own
//! trained network, not the averaged one. This scores `MODEL` on the official test split,
//! then recomputes the statistics of the model's own weights with forward passes (train mode,
//! no gradients, PyTorch's momentum 0.1) over `BATCHES` batches of 8 letterboxed trainval
//! images, and scores it again. The images are the union of the plants', read in one place:
//! it estimates what a statistics pass at the plants could recover, it is not something a
//! deployment does. Results: docs/simulations.md, "BatchNorm statistics after averaging".
//!
//!   scripts/cargo run --release -p fedinspect-simulations --example batchnorm_refresh -- \
//!       RUN/site/models/v0006.safetensors /path/to/PCBData [BATCHES=60] [INPUT_SIZE=640] [WIDTH=1.0]

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fedinspect_client::cli::scoring_data::eval_loader;
use fedinspect_client::data::deeppcb::{self, DeepPcbOptions, Split};
use fedinspect_client::data::{Channels, Preprocess};
use fedinspect_client::detector::Detector;
use fedinspect_common::ModelState;
use fedinspect_simulations::evaluation::TestSet;
use fedinspect_simulations::interrupt::Interrupt;
use fedinspect_simulations::site::SiteSpec;
use tch::Device;

const BATCH: usize = 8;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: batchnorm_refresh MODEL.safetensors PCBData [BATCHES=60] [INPUT_SIZE=640] [WIDTH=1.0]");
    }
    let model_path = PathBuf::from(&args[0]);
    let root = PathBuf::from(&args[1]);
    let arg = |i: usize, name: &str, default: &str| -> Result<String> {
        let v = args.get(i).map_or(default, String::as_str);
        if v.is_empty() {
            bail!("{name} is empty");
        }
        Ok(v.to_string())
    };
    let batches: usize = arg(2, "BATCHES", "60")?.parse().context("BATCHES")?;
    let input_size: u32 = arg(3, "INPUT_SIZE", "640")?.parse().context("INPUT_SIZE")?;
    let width: f64 = arg(4, "WIDTH", "1.0")?.parse().context("WIDTH")?;
    let bytes = std::fs::read(&model_path)
        .with_context(|| format!("cannot read {}", model_path.display()))?;
    let (model, _) = ModelState::from_safetensors_bytes(&bytes)
        .with_context(|| format!("{} is not a model file", model_path.display()))?;
    let channels = Channels::GrayTemplate;
    let arch = SiteSpec::deeppcb_arch(input_size, width);
    let test = TestSet::load(&root, input_size, 0)?;
    let interrupt = Interrupt::default();
    let before = test.evaluate(&arch, &model, Device::Cpu, &interrupt)?;
    println!(
        "as published: map_33 {:.4} map_50 {:.4} ({} test images)",
        before.map_33,
        before.map_50,
        test.len()
    );

    let data = deeppcb::load(&root, Split::TrainVal, &DeepPcbOptions { template: true })?.dataset;
    let classes = data.class_names.clone();
    // Letterboxed and unaugmented like the test images; `train_epoch` only shuffles them.
    let loader = eval_loader(
        data,
        Preprocess {
            input_size,
            channels,
            clahe: None,
        },
        BATCH,
    )?;
    let det = Detector::from_state(arch.clone(), classes, &model, Device::Cpu)?;
    let mut seen = 0;
    {
        let _no_grad = tch::no_grad_guard();
        for batch in loader.train_epoch(0).take(batches) {
            det.forward(&det.images_tensor(&batch)?, true)?;
            seen += 1;
        }
    }
    let after = test.evaluate(&arch, &det.state()?, Device::Cpu, &interrupt)?;
    println!(
        "statistics recomputed over {seen} batches of {BATCH}: map_33 {:.4} map_50 {:.4}",
        after.map_33, after.map_50
    );
    Ok(())
}
