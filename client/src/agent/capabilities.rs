//! What the plant reports about itself when it registers: its device (and GPU, read from
//! `nvidia-smi`), the TensorRT version (from `trtexec`, when it is on the PATH) and what its
//! data holds. External tools are run once at start-up, each with a time limit.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tch::Device;

use super::local::PlantData;
use super::types::Capabilities;

/// How long an external tool may take to answer.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn probe(device: Device, data: &PlantData) -> Capabilities {
    let (device_name, gpu_name, compute_capability) = match device {
        Device::Cuda(i) => {
            let (name, cc) = gpu_info(i).unwrap_or_default();
            (format!("cuda:{i}"), name, cc)
        }
        _ => ("cpu".to_string(), String::new(), String::new()),
    };
    Capabilities {
        device: device_name,
        gpu_name,
        compute_capability,
        tensorrt_version: tensorrt_version().unwrap_or_default(),
        samples_per_class: data.samples_per_class(),
        num_samples: data.num_samples(),
        client_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// GPU `index`'s name and compute capability, as `nvidia-smi` reports them.
fn gpu_info(index: usize) -> Option<(String, String)> {
    let out = run(
        Path::new("nvidia-smi"),
        &[
            "--query-gpu=name,compute_cap",
            "--format=csv,noheader",
            &format!("--id={index}"),
        ],
    )?;
    let line = out.lines().next()?;
    let (name, cc) = line.rsplit_once(',')?;
    Some((name.trim().to_string(), cc.trim().to_string()))
}

/// The version `trtexec` prints in its banner (`[TensorRT v100300]` → `100300`).
fn tensorrt_version() -> Option<String> {
    let trtexec = on_path("trtexec")?;
    let out = run(&trtexec, &["--help"])?;
    Some(parse_tensorrt_version(&out).unwrap_or_else(|| "unknown".to_string()))
}

pub fn parse_tensorrt_version(banner: &str) -> Option<String> {
    let rest = &banner[banner.find("TensorRT v")? + "TensorRT v".len()..];
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Stdout and stderr of `program args`, or `None` if it cannot run or exceeds the time limit.
fn run(program: &Path, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    // Read both pipes while the tool runs, so a long output cannot fill a pipe and stall it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < TOOL_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(program = %program.display(), "no answer in time; leaving its capability empty");
                return None;
            }
        }
    }
    let mut text = out.join().ok()?;
    text.push_str(&err.join().ok()?);
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_from_a_trtexec_banner() {
        let banner = "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help\n";
        assert_eq!(parse_tensorrt_version(banner).as_deref(), Some("100300"));
        assert_eq!(parse_tensorrt_version("usage: trtexec"), None);
    }
}
