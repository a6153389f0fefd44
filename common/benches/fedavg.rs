//! Benchmark of both FedAvg paths (streaming and canonical) on the WORKLOAD.md deltas, against
//! this machine's memory bandwidth measured in the same run, with a checksum check per cell.
//!
//! `cargo bench -p fedinspect-common --bench fedavg`; `FEDAVG_BENCH_QUICK=1` runs the 1M cells
//! only. Everything runs on one thread, so the bandwidth is what one core can read.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fedinspect_common::fedavg::workload::{self, CellChecksums, ModelSize};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate, StreamingFedAvg};
use fedinspect_common::ModelState;

const GIB: usize = 1 << 30;

fn main() {
    let quick = std::env::var("FEDAVG_BENCH_QUICK").is_ok_and(|v| v == "1");
    let bandwidth = read_bandwidth();
    println!("memory bandwidth (read-sum over 1 GiB, one core, best of 5): {bandwidth:.1} GB/s");
    let published = match workload::load_checksums(&workload::checksums_path()) {
        Ok(cells) => Some(cells),
        Err(e) => {
            let path = workload::checksums_path();
            println!("no checksum check: cannot read {}: {e}", path.display());
            None
        }
    };
    println!(
        "traffic = bytes read + written: streaming (20K+24)·P (acc f64 zeroed, K×(delta, acc \
         read+write), base, acc, output), canonical (4K+8)·P (deltas, base, output; the f64 \
         tile stays in L2)"
    );
    println!(
        "streaming reuses one accumulator round after round (reset); stream-new allocates a \
         fresh one, as a first round does, and pays its first-touch page faults"
    );
    println!();
    println!(
        "| {:>2} | {:>4} | {:<10} | {:>9} | {:>12} | {:>10} | {:>13} | {:>6} | {:<8} |",
        "K", "P", "path", "time ms", "delta GB/s", "traffic GB", "traffic GB/s", "% bw", "checksum"
    );
    println!("|---:|-----:|:-----------|----------:|-------------:|-----------:|--------------:|-------:|:---------|");
    let sizes: &[ModelSize] = if quick {
        &[ModelSize::M1]
    } else {
        &[ModelSize::M1, ModelSize::M10]
    };
    for &size in sizes {
        let base = workload::initial_global(size);
        for clients in [4u32, 16, 64] {
            let deltas: Vec<ModelState> = (0..clients)
                .map(|k| workload::client_delta(size, k, 1))
                .collect();
            let want = published
                .as_ref()
                .and_then(|cells| first_round(cells.get(&workload::cell_key(clients, size))));
            let cell = Cell {
                size,
                clients,
                base: &base,
                deltas: &deltas,
                want,
                bandwidth,
            };
            let mut reused = StreamingFedAvg::begin(&base);
            cell.report("streaming", |b, d| streaming(&mut reused, b, d));
            cell.report("stream-new", |b, d| {
                streaming(&mut StreamingFedAvg::begin(b), b, d)
            });
            cell.report("canonical", canonical);
        }
    }
}

fn first_round(cell: Option<&CellChecksums>) -> Option<String> {
    cell?
        .rounds
        .iter()
        .find(|r| r.round == 1)
        .map(|r| r.sha256.clone())
}

struct Cell<'a> {
    size: ModelSize,
    clients: u32,
    base: &'a ModelState,
    deltas: &'a [ModelState],
    want: Option<String>,
    bandwidth: f64,
}

impl Cell<'_> {
    fn report(&self, path: &str, mut run: impl FnMut(&ModelState, &[ModelState]) -> ModelState) {
        let p = self.size.num_params() as f64;
        let k = f64::from(self.clients);
        let traffic = match path {
            "canonical" => (4.0 * k + 8.0) * p,
            _ => (20.0 * k + 24.0) * p,
        };
        let reps = if self.size == ModelSize::M10 { 3 } else { 7 };
        let mut best = Duration::MAX;
        let mut result = None;
        for _ in 0..reps {
            let t = Instant::now();
            let out = run(self.base, self.deltas);
            best = best.min(t.elapsed());
            result = Some(out);
        }
        let result = result.expect("at least one repetition");
        let check = match (&self.want, workload::sha256_table_order(self.size, &result)) {
            (None, _) => "-",
            (Some(want), Some(got)) if *want == got => "OK",
            _ => "MISMATCH",
        };
        let s = best.as_secs_f64();
        let rate = traffic / s / 1e9;
        println!(
            "| {:>2} | {:>4} | {:<10} | {:>9.2} | {:>12.2} | {:>10.3} | {:>13.2} | {:>5.0}% | {:<8} |",
            self.clients,
            self.size.label(),
            path,
            s * 1e3,
            4.0 * k * p / s / 1e9,
            traffic / 1e9,
            rate,
            100.0 * rate / self.bandwidth,
            check
        );
    }
}

fn plant_id(k: usize) -> String {
    format!("plant-{k:03}")
}

/// One round on `acc`: reset (zeroes the sums, keeps the memory), add every delta, average.
fn streaming(acc: &mut StreamingFedAvg, base: &ModelState, deltas: &[ModelState]) -> ModelState {
    acc.reset(base);
    for (k, d) in deltas.iter().enumerate() {
        let n = workload::num_samples(u32::try_from(k).expect("K < 2^32"));
        acc.add(&plant_id(k), d, n)
            .expect("workload deltas are valid");
    }
    acc.average(base).expect("workload round is valid")
}

fn canonical(base: &ModelState, deltas: &[ModelState]) -> ModelState {
    let updates: Vec<PlantUpdate> = deltas
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let n = workload::num_samples(u32::try_from(k).expect("K < 2^32"));
            PlantUpdate::new(plant_id(k), n, d)
        })
        .collect();
    aggregate_canonical(base, &updates).expect("workload round is valid")
}

/// GB/s of a vectorised wrapping sum over a 1 GiB buffer, best of 5 passes.
fn read_bandwidth() -> f64 {
    let words = GIB / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let lanes = buf.chunks_exact(8).fold([0u64; 8], |mut acc, c| {
            for l in 0..8 {
                acc[l] = acc[l].wrapping_add(c[l]);
            }
            acc
        });
        black_box(lanes);
        best = best.min(t.elapsed());
    }
    GIB as f64 / best.as_secs_f64() / 1e9
}
