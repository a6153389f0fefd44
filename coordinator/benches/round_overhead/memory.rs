//! The memory-over-rounds mode (issue 7, "memory must not grow with rounds"): K plants × P
//! f32 parameters × R rounds against the real `coordinator` binary over mutual TLS on
//! loopback, as fast as the plants can go (no training). Every N published rounds it prints
//! the coordinator's resident memory (`VmRSS`, and `RssAnon`: heap and stacks) and the size of
//! its sled database on disk and its thread count; at the end, the growth per round and per
//! accepted update over the second half of the run (a least-squares slope: the first rounds
//! fill caches), the rounds per hour, and the median RSS of each quarter of the run (one sample
//! can catch a round's transient buffers; the medians show whether the level still rises).
//!
//! `--coordinator label=PATH,...` runs the same workload once per coordinator binary, one after
//! the other in one invocation (e.g. a build of the code before a fix and this one); by default
//! it is this build's `coordinator`. `--wrap "heaptrack -o /tmp/c"` starts each coordinator
//! under a profiler; the figures are then read from the coordinator process below the wrapper.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedinspect_common::fedavg::workload::{self, ModelSize};
use fedinspect_common::pki::{self, InitOptions};
use fedinspect_proto::v1 as pb;
use tokio::sync::Semaphore;

use crate::cell;
use crate::plant::{Encoder, Plant};
use crate::procfs;

const MIB: f64 = 1024.0 * 1024.0;

/// What the mode runs.
pub struct MemoryArgs {
    pub clients: u32,
    pub size: ModelSize,
    pub rounds: u32,
    /// Print a sample every this many published rounds.
    pub every: u32,
    /// `round.keep_update_blobs_rounds` of the coordinator (retention runs every round).
    pub keep_blobs: u64,
    /// (label, coordinator binary), run in this order.
    pub coordinators: Vec<(String, PathBuf)>,
    /// A command line the coordinator is started under (`heaptrack -o FILE`).
    pub wrap: Option<String>,
}

/// One sample: after `round` published rounds.
#[derive(Clone, Copy)]
struct Sample {
    round: u32,
    rss: u64,
    anon: u64,
    db_bytes: u64,
    /// The coordinator's threads (tokio workers, blocking pool, sled's pool).
    threads: u64,
}

/// What one coordinator's run gave.
struct RunSummary {
    label: String,
    samples: Vec<Sample>,
    wall: Duration,
    plants_hwm: u64,
}

/// Parses `KxPxR`, e.g. `64xtinyx300`.
pub fn parse_spec(spec: &str) -> Result<(u32, ModelSize, u32)> {
    let parts: Vec<&str> = spec.split('x').collect();
    let [k, p, r] = parts.as_slice() else {
        bail!("--rounds-memory '{spec}' is not KxPxR, e.g. 64xtinyx300");
    };
    let size = ModelSize::from_label(p)
        .ok_or_else(|| anyhow!("size '{p}' in '{spec}' is not one of tiny, 1M, 10M"))?;
    Ok((
        k.parse().with_context(|| format!("K in '{spec}'"))?,
        size,
        r.parse().with_context(|| format!("R in '{spec}'"))?,
    ))
}

/// Parses `label=PATH,...`.
pub fn parse_coordinators(list: &str) -> Result<Vec<(String, PathBuf)>> {
    list.split(',')
        .map(|item| {
            let (label, path) = item.split_once('=').ok_or_else(|| {
                anyhow!(
                    "--coordinator '{item}' is not label=PATH, e.g. before=/tmp/old/coordinator"
                )
            })?;
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("--coordinator {label}: no file at {}", path.display());
            }
            Ok((label.to_string(), path))
        })
        .collect()
}

/// Runs the workload once per coordinator and prints the figures; all runs in `work`.
pub async fn run(work: &Path, args: &MemoryArgs) -> Result<()> {
    println!(
        "rounds-memory: {} plants x {} f32 ({} params) x {} rounds, mTLS on 127.0.0.1, keep_update_blobs_rounds {}; {} cores; load at start {}",
        args.clients,
        args.size.label(),
        args.size.num_params(),
        args.rounds,
        args.keep_blobs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        procfs::loadavg()
    );
    let mut summaries = Vec::new();
    for (label, binary) in &args.coordinators {
        let dir = work.join(format!("memory-{label}"));
        println!("== {label}: {}", binary.display());
        let s = run_one(&dir, label, binary, args).await?;
        print_summary(&s, args);
        summaries.push(s);
    }
    if summaries.len() > 1 {
        println!(
            "== side by side (growth per round over rounds {}-{}, least squares)",
            args.rounds / 2,
            args.rounds
        );
        for s in &summaries {
            print_summary(s, args);
        }
    }
    println!("load at end {}", procfs::loadavg());
    Ok(())
}

async fn run_one(dir: &Path, label: &str, binary: &Path, args: &MemoryArgs) -> Result<RunSummary> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    let layout = pki::init(
        &dir.join("pki"),
        &InitOptions::with_plant_count(args.clients as usize),
    )?;
    let initial = dir.join("initial.safetensors");
    workload::initial_global(args.size).save_safetensors(&initial, &Default::default())?;
    let port = cell::free_port()?;
    let config = cell::write_config(
        dir,
        &data,
        &layout,
        &initial,
        port,
        args.clients,
        args.rounds,
    )?;
    // Retention on, as an operator running for months would set it.
    let text = std::fs::read_to_string(&config)?.replace(
        "\n[limits]",
        &format!("keep_update_blobs_rounds = {}\n\n[limits]", args.keep_blobs),
    );
    std::fs::write(&config, text)?;
    let mut child = spawn(dir, binary, &config, args.wrap.as_deref())?;
    let measured = async {
        let pid = coordinator_pid(&mut child, binary).await?;
        let url = format!("https://127.0.0.1:{port}");
        let mut admin = cell::wait_for_admin(&url, &layout, &mut child).await?;
        procfs::reset_own_peak()?;
        let generate = Arc::new(Semaphore::new(2));
        let encoder = Arc::new(Encoder::new(args.size));
        let mut plants = tokio::task::JoinSet::new();
        let started = Instant::now();
        for index in 0..args.clients {
            let plant = Plant {
                index,
                files: layout.plant_files(&format!("plant-{}", index + 1)),
                prune: data.join("blobs"),
            };
            plants.spawn(plant.run(url.clone(), encoder.clone(), args.rounds, generate.clone()));
        }
        let mut samples = Vec::new();
        let mut next = 1;
        loop {
            let s = admin.status(pb::StatusRequest {}).await?.into_inner();
            let published = u32::try_from(s.latest_version.saturating_sub(1))?;
            if published >= next {
                let sample = Sample {
                    round: published,
                    rss: procfs::status_bytes(pid, "VmRSS:")?,
                    anon: procfs::status_bytes(pid, "RssAnon:")?,
                    db_bytes: dir_bytes(&data.join("db")),
                    threads: procfs::status_number(pid, "Threads:")?,
                };
                print_sample(label, &sample, started.elapsed());
                samples.push(sample);
                next = (published / args.every + 1) * args.every;
                if published >= args.rounds {
                    break;
                }
                next = next.min(args.rounds);
            }
            if let Some(done) = plants.try_join_next() {
                done??;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = started.elapsed();
        while let Some(done) = plants.join_next().await {
            done??;
        }
        let plants_hwm = procfs::status_bytes(std::process::id(), "VmHWM:")?;
        Ok::<_, anyhow::Error>((pid, samples, wall, plants_hwm))
    }
    .await;
    let stopped = stop(&mut child, measured.as_ref().ok().map(|m| m.0));
    let (_, samples, wall, plants_hwm) = measured
        .with_context(|| format!("coordinator log: {}", dir.join("coordinator.log").display()))?;
    stopped?;
    let _ = std::fs::remove_dir_all(dir.join("data").join("blobs"));
    Ok(RunSummary {
        label: label.to_string(),
        samples,
        wall,
        plants_hwm,
    })
}

fn print_sample(label: &str, s: &Sample, elapsed: Duration) {
    println!(
        "  {label} round {:>5}: coordinator RSS {:7.1} MiB (anon {:7.1} MiB) | {:3} threads | sled db on disk {:6.1} MiB | {:6.0} s",
        s.round,
        s.rss as f64 / MIB,
        s.anon as f64 / MIB,
        s.threads,
        s.db_bytes as f64 / MIB,
        elapsed.as_secs_f64()
    );
}

fn print_summary(s: &RunSummary, args: &MemoryArgs) {
    let half = args.rounds / 2;
    let late: Vec<&Sample> = s.samples.iter().filter(|x| x.round >= half).collect();
    let slope = |f: fn(&Sample) -> u64| -> f64 {
        let pts: Vec<(f64, f64)> = late
            .iter()
            .map(|x| (f64::from(x.round), f(x) as f64))
            .collect();
        least_squares_slope(&pts)
    };
    let rss = slope(|x| x.rss);
    let anon = slope(|x| x.anon);
    let db = slope(|x| x.db_bytes);
    let last = s.samples.last().copied();
    let first = s.samples.first().copied();
    println!(
        "MEMORY {} K={} P={} R={}: RSS round {} {:.1} MiB -> round {} {:.1} MiB | growth over rounds {half}-{}: RSS {:.1} KiB/round ({:.0} B per accepted update), anon {:.1} KiB/round, sled db {:.1} KiB/round | db at end {:.1} MiB | {:.0} rounds per hour | plants (this process) peak {:.0} MiB",
        s.label,
        args.clients,
        args.size.label(),
        args.rounds,
        first.map_or(0, |x| x.round),
        first.map_or(f64::NAN, |x| x.rss as f64 / MIB),
        last.map_or(0, |x| x.round),
        last.map_or(f64::NAN, |x| x.rss as f64 / MIB),
        args.rounds,
        rss / 1024.0,
        rss / f64::from(args.clients),
        anon / 1024.0,
        db / 1024.0,
        last.map_or(f64::NAN, |x| x.db_bytes as f64 / MIB),
        f64::from(args.rounds) / s.wall.as_secs_f64() * 3600.0,
        s.plants_hwm as f64 / MIB,
    );
    // One sample is noisy (it catches a round's transient buffers); the median of each
    // quarter of the run shows whether the level still rises.
    let quarters: Vec<String> = (0..4)
        .filter_map(|q| {
            let (lo, hi) = (args.rounds * q / 4, args.rounds * (q + 1) / 4);
            let mut rss: Vec<f64> = s
                .samples
                .iter()
                .filter(|x| x.round > lo && x.round <= hi)
                .map(|x| x.rss as f64 / MIB)
                .collect();
            rss.sort_by(f64::total_cmp);
            let max_threads = s
                .samples
                .iter()
                .filter(|x| x.round > lo && x.round <= hi)
                .map(|x| x.threads)
                .max()?;
            Some(format!(
                "rounds {}-{}: {:.1} MiB ({} samples, at most {max_threads} threads)",
                lo + 1,
                hi,
                rss[rss.len() / 2],
                rss.len()
            ))
        })
        .collect();
    println!(
        "MEMORY {} median RSS by quarter: {}",
        s.label,
        quarters.join(" | ")
    );
}

/// The least-squares slope of y over x; NaN with fewer than two distinct x.
fn least_squares_slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        f64::NAN
    } else {
        sxy / sxx
    }
}

/// Bytes of the files under `dir` (the sled database: its `db` file, `conf`, `blobs/`).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn spawn(dir: &Path, binary: &Path, config: &Path, wrap: Option<&str>) -> Result<Child> {
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let mut words: Vec<String> = wrap
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    words.push(binary.display().to_string());
    let mut cmd = Command::new(&words[0]);
    cmd.args(&words[1..])
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("COORDINATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn()
        .with_context(|| format!("cannot start {}", words.join(" ")))
}

/// The coordinator's pid: the child itself, or the process below it that runs `binary` when it
/// runs under a wrapper (found by its command name: the file name, cut like the kernel's to 15
/// bytes, so a binary copied as `coordinator-before` is found too).
async fn coordinator_pid(child: &mut Child, binary: &Path) -> Result<u32> {
    let name = command_name(binary);
    let started = Instant::now();
    loop {
        if let Some(pid) = find_named(child.id(), &name) {
            return Ok(pid);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator (or its wrapper) exited at start ({status})");
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "no process named {name} below pid {} after 60 s",
                child.id()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The name the kernel gives a process running `binary` (`/proc/PID/comm`): the file name,
/// at most 15 bytes.
fn command_name(binary: &Path) -> String {
    let file = binary
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = file.len().min(15);
    while !file.is_char_boundary(end) {
        end -= 1;
    }
    file[..end].to_string()
}

/// `root` or a descendant of it whose command name is `name`.
fn find_named(root: u32, name: &str) -> Option<u32> {
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
    if comm(root).is_some_and(|c| c.trim() == name) {
        return Some(root);
    }
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(parent) {
                if comm(pid).is_some_and(|c| c.trim() == name) {
                    return Some(pid);
                }
                frontier.push(pid);
            }
        }
    }
    None
}

/// SIGTERM to the coordinator (below any wrapper), then waits for the child (a profiler
/// writes its file after the coordinator exits), SIGKILL after 300 s.
fn stop(child: &mut Child, coordinator: Option<u32>) -> Result<()> {
    let pid = coordinator.unwrap_or(child.id());
    Command::new("kill").arg(pid.to_string()).status()?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            child.kill()?;
            child.wait()?;
            bail!("the coordinator did not stop within 300 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
