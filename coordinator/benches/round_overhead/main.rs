//! Round overhead of the coordinator without training, over real mutual TLS on loopback, on
//! the workload of `shared/bench/WORKLOAD.md`: K plants × P float32 parameters, f32 deltas up,
//! the f32 model down, R rounds per cell. Prints per cell the round wall time, the bytes on the
//! wire, peak RSS (coordinator process, plants process, both), CPU, the loopback TLS transfer
//! bound for the same bytes measured in the same run and the ratio to it, and checks every
//! round's model against `shared/bench/flower/results/canonical_checksums.json` bit for bit
//! (the run fails if any differs). Then runs one Flower cell (`shared/bench/flower`) for the
//! ratio to the peer baseline.
//!
//! `scripts/cargo bench -p fedinspect-coordinator --bench round_overhead -- [--cells 4x1M,...]
//! [--rounds 5] [--flower 16x10M|none] [--flower-rounds 2] [--keep] [--load 200x10M]`
//!
//! `--load KxP` runs the load cell instead of the grid ([`load`]): K plants uploading at
//! once in one round (`--cells none --flower none` are implied).
//!
//! `--rounds-memory KxPxR [--every 25] [--keep-blobs 2] [--coordinator label=PATH,...]
//! [--wrap "heaptrack -o FILE"]` runs the memory-over-rounds mode instead ([`memory`]): the
//! coordinator's resident memory and sled size every N rounds and its growth per round.
//!
//! The coordinator is the real `coordinator` binary in its own process; the plants are tokio
//! tasks of this process (one connection and certificate each), so "plants RSS" is this
//! process's peak.

mod cell;
mod flower;
mod load;
mod memory;
mod plant;
mod procfs;
mod tls_bound;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use fedinspect_common::fedavg::workload::{self, ModelSize};
use fedinspect_common::pki::{self, InitOptions, PkiLayout};

use cell::CellResult;

const MIB: f64 = 1024.0 * 1024.0;

struct Args {
    cells: Vec<(u32, ModelSize)>,
    rounds: u32,
    flower: Option<String>,
    flower_rounds: u32,
    keep: bool,
    load: Option<(u32, ModelSize)>,
    memory: Option<memory::MemoryArgs>,
    /// Builds of the coordinator to run each cell with, alternately (`--coordinator`).
    coordinators: Vec<(String, std::path::PathBuf)>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        cells: parse_cells("4x1M,16x1M,64x1M,4x10M,16x10M,64x10M")?,
        rounds: 5,
        flower: Some("16x10M".into()),
        flower_rounds: 2,
        keep: false,
        load: None,
        memory: None,
        coordinators: Vec::new(),
    };
    let mut every = 25;
    let mut keep_blobs = 2;
    let mut coordinators = None;
    let mut wrap = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--cells" => a.cells = parse_cells(&value()?)?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--flower" => {
                let v = value()?;
                a.flower = (v != "none").then_some(v);
            }
            "--flower-rounds" => a.flower_rounds = value()?.parse()?,
            "--keep" => a.keep = true,
            "--load" => a.load = Some(parse_cells(&value()?)?[0]),
            "--rounds-memory" => {
                let (clients, size, rounds) = memory::parse_spec(&value()?)?;
                a.memory = Some(memory::MemoryArgs {
                    clients,
                    size,
                    rounds,
                    every: 25,
                    keep_blobs: 2,
                    coordinators: Vec::new(),
                    wrap: None,
                });
            }
            "--every" => every = value()?.parse()?,
            "--keep-blobs" => keep_blobs = value()?.parse()?,
            "--coordinator" => coordinators = Some(memory::parse_coordinators(&value()?)?),
            "--wrap" => wrap = Some(value()?),
            "--bench" => {} // passed by `cargo bench`
            other => bail!(
                "unknown argument {other}; use --cells 4x1M,16x10M --rounds 5 --flower 16x10M|none --flower-rounds 2 --keep --load 200x10M, or --rounds-memory 64xtinyx300 --every 25 --keep-blobs 2 --coordinator label=PATH,... --wrap CMD"
            ),
        }
    }
    a.coordinators = coordinators.clone().unwrap_or_else(|| {
        vec![(
            "this-build".into(),
            env!("CARGO_BIN_EXE_coordinator").into(),
        )]
    });
    if let Some(m) = &mut a.memory {
        if every == 0 || keep_blobs == 0 {
            bail!("--every and --keep-blobs must be at least 1");
        }
        m.every = every;
        m.keep_blobs = keep_blobs;
        m.wrap = wrap;
        m.coordinators = coordinators.unwrap_or_else(|| {
            vec![(
                "this-build".into(),
                env!("CARGO_BIN_EXE_coordinator").into(),
            )]
        });
    }
    if !(1..=5).contains(&a.rounds) {
        bail!("--rounds must be 1 to 5: the canonical checksums cover rounds 1 to 5");
    }
    Ok(a)
}

fn parse_cells(list: &str) -> Result<Vec<(u32, ModelSize)>> {
    list.split(',')
        .map(|c| {
            let (k, p) = c
                .split_once('x')
                .ok_or_else(|| anyhow!("cell '{c}' is not KxP, e.g. 16x10M"))?;
            let size = ModelSize::from_label(p)
                .ok_or_else(|| anyhow!("size '{p}' is not one of tiny, 1M, 10M"))?;
            Ok((k.parse().with_context(|| format!("K in '{c}'"))?, size))
        })
        .collect()
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("round_overhead: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the grid; false if any model differed from the canonical checksums.
async fn run() -> Result<bool> {
    let args = parse_args()?;
    if let Some(m) = &args.memory {
        let work = tempfile::Builder::new().prefix("memory-").tempdir()?;
        memory::run(work.path(), m).await?;
        if args.keep {
            println!("work folder kept: {}", work.keep().display());
        }
        return Ok(true);
    }
    if let Some((clients, size)) = args.load {
        let work = tempfile::Builder::new().prefix("load-").tempdir()?;
        println!(
            "load: {clients} plants x {} f32, one round, mTLS on 127.0.0.1; {} cores; load at start {}",
            size.label(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            procfs::loadavg()
        );
        let ok = load::run(work.path(), clients, size).await?;
        println!("load at end {}", procfs::loadavg());
        if args.keep {
            println!("work folder kept: {}", work.keep().display());
        }
        return Ok(ok);
    }
    let checksums = workload::load_checksums(&workload::checksums_path()).with_context(|| {
        format!(
            "cannot read the canonical checksums {}",
            workload::checksums_path().display()
        )
    })?;
    plant::Encoder::self_check()?;
    let work = tempfile::Builder::new()
        .prefix("round_overhead-")
        .tempdir()?;
    println!(
        "round_overhead: {} rounds per cell, f32 both ways, mTLS on 127.0.0.1; {} cores; load at start {}",
        args.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        procfs::loadavg()
    );
    let bound_pki = pki::init(
        &work.path().join("tls-bound"),
        &InitOptions::with_plant_count(1),
    )?;
    let mut results = Vec::new();
    let mut all_ok = true;
    for &(clients, size) in &args.cells {
        let key = workload::cell_key(clients, size);
        let expected = checksums
            .get(&key)
            .ok_or_else(|| anyhow!("no canonical checksums for cell {key}"))?;
        for (label, binary) in &args.coordinators {
            eprintln!("== {key} ({label}): running (load {})", procfs::loadavg());
            let r = cell::run(work.path(), binary, clients, size, args.rounds, expected).await?;
            let bound = measure_bound(&bound_pki, r.fleet_bytes).await?;
            if args.coordinators.len() > 1 {
                println!("[{label}: {}]", binary.display());
            }
            print_cell(&r, bound);
            if !r.data_dir.starts_with(work.path()) {
                println!(
                    "   (this cell's data folder was on tmpfs: {})",
                    r.data_dir.display()
                );
            }
            for f in &r.checksum_failures {
                println!("   CHECKSUM MISMATCH {key} {f}");
                all_ok = false;
            }
            if !args.keep {
                let _ = std::fs::remove_dir_all(work.path().join(&key));
            }
            results.push((r, bound));
        }
    }
    println!("load at end {}", procfs::loadavg());
    if let Some(cell) = &args.flower {
        flower_cell(work.path(), cell, args.flower_rounds, &results);
    }
    if args.keep {
        println!("work folder kept: {}", work.keep().display());
    }
    if !all_ok {
        println!("FAILED: a published model differs from the canonical checksums");
    }
    Ok(all_ok)
}

/// The loopback TLS bound for `bytes` (best of 3), with the certificates of `pki`.
async fn measure_bound(pki: &PkiLayout, bytes: f64) -> Result<Duration> {
    tls_bound::measure(
        &pki.coordinator_files(),
        &pki.plant_files("plant-1"),
        bytes as u64,
        3,
    )
    .await
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

fn print_cell(r: &CellResult, bound: Duration) {
    let wall = median(&r.walls_s);
    let (lo, hi) = min_max(&r.walls_s);
    let b = bound.as_secs_f64();
    println!(
        "K={:<2} P={:<3} round {:.3} s ({:.3}-{:.3}) [{}] | agg {:.0} ms | fleet {:.0} MB, loopback {:.0} MB | TLS bound {:.3} s ({:.2} GB/s), round/bound {:.2} | RSS coordinator {:.0} MiB, plants {:.0} MiB, all {:.0} MiB | CPU s/round coordinator {:.2}, plants {:.2}, machine {:.2} | coordinator minor faults/round {:.0} | running mean exact {}/{} | checksums {}/{}",
        r.clients,
        r.size.label(),
        wall,
        lo,
        hi,
        r.walls_s.iter().map(|w| format!("{w:.3}")).collect::<Vec<_>>().join(" "),
        1000.0 * median(&r.aggs_s),
        r.fleet_bytes / 1e6,
        r.lo_bytes / 1e6,
        b,
        r.fleet_bytes / b / 1e9,
        wall / b,
        r.coordinator_peak_rss as f64 / MIB,
        r.plants_peak_rss as f64 / MIB,
        r.all_peak_rss as f64 / MIB,
        r.coordinator_cpu_s_per_round,
        r.plants_cpu_s_per_round,
        r.machine_cpu_s_per_round,
        r.coordinator_faults_per_round,
        r.preview_exact,
        r.walls_s.len(),
        r.checksums_ok,
        r.walls_s.len(),
    );
}

fn flower_cell(work: &std::path::Path, cell: &str, rounds: u32, ours: &[(CellResult, Duration)]) {
    println!(
        "== Flower {cell}, TLS, {rounds} rounds (same invocation; load {})",
        procfs::loadavg()
    );
    match flower::run(work, cell, rounds) {
        Ok(f) => {
            let fw = median(&f.walls_s);
            println!(
                "Flower K x P = {cell}: round {:.2} s (rounds: {}) | fleet {:.0} MB, loopback {:.0} MB | peak RSS all Flower processes {:.0} MiB",
                fw,
                f.walls_s.iter().map(|w| format!("{w:.2}")).collect::<Vec<_>>().join(" "),
                f.fleet_payload_bytes / 1e6,
                f.lo_bytes / 2.0 / 1e6,
                f.peak_rss_all_mib
            );
            let mine = ours
                .iter()
                .find(|(r, _)| workload::cell_key(r.clients, r.size) == cell);
            match mine {
                Some((r, _)) => println!(
                    "ratio Flower / fedinspect at {cell}: {:.1}x (round {:.2} s vs {:.3} s, both medians, this run)",
                    fw / median(&r.walls_s),
                    fw,
                    median(&r.walls_s)
                ),
                None => println!("(cell {cell} was not in --cells, no ratio)"),
            }
        }
        Err(e) => println!(
            "Flower {cell} did not complete: {e:#}; compare with shared/bench/flower/RESULTS.md (not this run)"
        ),
    }
}
