//! Command-line subcommands of the `client` binary whose logic lives in the library, so the
//! binary stays a list of commands and tests can call them directly.

use std::path::Path;

use anyhow::{bail, Result};
use tch::Device;

pub mod bench;
pub mod bundle;
pub mod eval_onnx;
pub mod export;
pub mod infer;
pub mod onnx_bench;
pub mod scoring_data;
pub mod train;

pub fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => bail!("--device cuda but LibTorch sees no CUDA device; use auto or cpu"),
        other => bail!("--device {other}: use auto, cpu or cuda"),
    })
}

/// A clear error for a data path that is not a folder, before any loader reads it.
pub fn require_data_folder(data: &Path) -> Result<()> {
    if !data.is_dir() {
        bail!(
            "--data {}: no such folder; point it at the DeepPCB PCBData folder that holds trainval.txt and test.txt",
            data.display()
        );
    }
    Ok(())
}
