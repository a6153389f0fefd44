//! One Flower cell in the same invocation, for the ratio: the peer baseline of
//! `shared/bench/flower` (Flower 1.42 deployment runtime, TLS) run by its own `bench.py` on a
//! writable copy of that folder (the shared one is read-only), with the virtual environment
//! its `run.sh` would create when missing. Every figure comes from the raw JSON it writes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

/// Per-round wall times of a Flower cell, and its peak RSS over all Flower processes.
pub struct FlowerCell {
    pub walls_s: Vec<f64>,
    pub peak_rss_all_mib: f64,
    pub fleet_payload_bytes: f64,
    pub lo_bytes: f64,
}

/// `shared/bench/flower`, next to the repository.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/flower")
}

/// Runs `cell` (e.g. `16x10M`) with TLS for `rounds` rounds in a copy under `work`.
pub fn run(work: &Path, cell: &str, rounds: u32) -> Result<FlowerCell> {
    let src = source_dir();
    let dir = work.join("flower");
    run_cmd(
        Command::new("cp").arg("-r").arg(&src).arg(&dir),
        "copy the Flower bench",
    )?;
    run_cmd(
        Command::new("chmod").arg("-R").arg("u+w").arg(&dir),
        "make the copy writable",
    )?;
    let venv = std::env::var_os("FLWR_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/flwr-bench-venv")
        });
    if !venv.join("bin/flower-superlink").exists() {
        eprintln!(
            "flower: creating the venv {} (flwr==1.42.0, numpy, psutil)",
            venv.display()
        );
        run_cmd(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "create the venv",
        )?;
        run_cmd(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "-q",
                "flwr==1.42.0",
                "numpy>=2",
                "psutil",
            ]),
            "install Flower",
        )?;
    }
    run_cmd(
        Command::new("./make_certs.sh")
            .arg("certs")
            .current_dir(&dir),
        "make certs",
    )?;
    let started = Instant::now();
    let log = std::fs::File::create(work.join("flower-bench.out"))?;
    let status = Command::new(venv.join("bin/python"))
        .args(["bench.py", "--modes", "tls", "--cells", cell, "--rounds"])
        .arg(rounds.to_string())
        .env("FLWR_VENV", &venv)
        .current_dir(&dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("cannot start Flower's bench.py")?;
    eprintln!(
        "flower: bench.py {cell} took {:.0} s (exit {status})",
        started.elapsed().as_secs_f64()
    );
    let (k, p) = cell
        .split_once('x')
        .ok_or_else(|| anyhow!("bad cell {cell}"))?;
    let raw = dir.join(format!("results/raw-tls-K{k}-{p}.json"));
    let text = std::fs::read_to_string(&raw).with_context(|| {
        format!(
            "Flower wrote no {}; see {}",
            raw.display(),
            work.join("flower-bench.out").display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(e) = v.get("error") {
        bail!("Flower's cell failed: {e}");
    }
    let rounds = v["rounds"]
        .as_array()
        .ok_or_else(|| anyhow!("no rounds in {}", raw.display()))?;
    let field =
        |name: &str| -> Vec<f64> { rounds.iter().filter_map(|r| r[name].as_f64()).collect() };
    let mean = |xs: Vec<f64>| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    // bench.py keeps the cell's memory figures in results/flower.json, keyed by cell.
    let summary: serde_json::Value = std::fs::read_to_string(dir.join("results/flower.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let cell_summary = &summary[format!("tls-K{k}-{p}")];
    Ok(FlowerCell {
        walls_s: field("wall_s"),
        peak_rss_all_mib: cell_summary["peak_rss_all_flower_procs_mib"]
            .as_f64()
            .unwrap_or(f64::NAN),
        fleet_payload_bytes: mean(field("fleet_payload_bytes")),
        lo_bytes: mean(field("lo_bytes")),
    })
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("cannot {what}"))?;
    if !out.status.success() {
        bail!(
            "cannot {what}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
