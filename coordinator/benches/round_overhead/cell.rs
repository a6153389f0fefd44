//! One cell of the grid (K plants, model size P, R rounds): a fresh PKI and data folder, the
//! real `coordinator` binary serving on 127.0.0.1 as its own process, K in-process plants
//! (tokio tasks in this process, each with its own certificate and connection), and the
//! figures: per-round wall time from the round records, bytes, peak RSS, CPU. Afterwards
//! every published model is checked against the canonical checksums.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedinspect_common::fedavg::workload::{self, CellChecksums, ModelSize};
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::ModelState;
use fedinspect_coordinator::records::{ModelRecord, RoundRecord, RoundState};
use fedinspect_coordinator::storage::{BlobStore, Store};
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::admin_client::AdminClient;
use tokio::sync::Semaphore;

use crate::plant::{self, Encoder, Plant};
use crate::procfs::{self, RssSampler};

/// How long a cell may take before it is abandoned.
const CELL_TIMEOUT: Duration = Duration::from_secs(900);

/// What one cell measured.
pub struct CellResult {
    pub clients: u32,
    pub size: ModelSize,
    /// Per round: open → model stored (s), from the coordinator's records.
    pub walls_s: Vec<f64>,
    /// Per round: last accepted update → model stored (s).
    pub aggs_s: Vec<f64>,
    /// Mean per round: model bytes streamed to plants + accepted payload bytes.
    pub fleet_bytes: f64,
    /// Mean per round: loopback (rx + tx) / 2, every process on the host.
    pub lo_bytes: f64,
    pub coordinator_peak_rss: u64,
    pub plants_peak_rss: u64,
    /// Peak of coordinator + plants RSS, sampled every 100 ms.
    pub all_peak_rss: u64,
    pub coordinator_cpu_s_per_round: f64,
    /// Minor page faults of the coordinator per round (pages mapped and zeroed on first touch).
    pub coordinator_faults_per_round: f64,
    /// utime + stime of this process (the plants) per round.
    pub plants_cpu_s_per_round: f64,
    pub machine_cpu_s_per_round: f64,
    /// Rounds whose running mean the coordinator found equal to the published model.
    pub preview_exact: usize,
    pub checksums_ok: usize,
    pub checksum_failures: Vec<String>,
    /// Where the coordinator's data folder was (a tmpfs when the disk was too full).
    pub data_dir: PathBuf,
}

/// Runs one cell in a fresh folder under `work`, with the coordinator binary `binary`.
pub async fn run(
    work: &Path,
    binary: &Path,
    clients: u32,
    size: ModelSize,
    rounds: u32,
    expected: &CellChecksums,
) -> Result<CellResult> {
    let dir = work.join(workload::cell_key(clients, size));
    std::fs::create_dir_all(&dir)?;
    // One round of uploads, every model version, and room for the sled log.
    let payload = 4 * size.num_params() as u64 + 4096;
    let need = u64::from(clients) * payload + (u64::from(rounds) + 2) * payload + (512 << 20);
    let data = data_dir(&dir, need)?;
    let layout = pki::init(
        &dir.join("pki"),
        &InitOptions::with_plant_count(clients as usize),
    )?;
    let initial = dir.join("initial.safetensors");
    workload::initial_global(size).save_safetensors(&initial, &BTreeMap::new())?;
    let port = free_port()?;
    let config = write_config(&dir, &data, &layout, &initial, port, clients, rounds)?;
    let mut coordinator = spawn_coordinator_binary(binary, &dir, &config)?;
    let pid = coordinator.id();
    let url = format!("https://127.0.0.1:{port}");
    let measured = async {
        let mut admin = wait_for_admin(&url, &layout, &mut coordinator).await?;
        tokio::time::timeout(
            CELL_TIMEOUT,
            drive(&url, &data, &layout, &mut admin, pid, clients, size, rounds),
        )
        .await
        .map_err(|_| anyhow!("the cell did not finish within {CELL_TIMEOUT:?}"))?
    }
    .await;
    stop(&mut coordinator)?;
    let m = measured
        .with_context(|| format!("coordinator log: {}", dir.join("coordinator.log").display()))?;
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    let preview_exact = log
        .matches("running mean equals the published model bit for bit")
        .count();
    let records = read_records(&data, rounds)?;
    if data.starts_with(TMPFS) {
        let _ = std::fs::remove_dir_all(&data);
    }
    let (checksums_ok, checksum_failures) = check(&records, expected, size);
    Ok(CellResult {
        clients,
        size,
        walls_s: records.iter().map(|r| r.wall_s).collect(),
        aggs_s: records.iter().map(|r| r.agg_s).collect(),
        fleet_bytes: records.iter().map(|r| r.fleet_bytes as f64).sum::<f64>() / f64::from(rounds),
        lo_bytes: m.lo_bytes as f64 / 2.0 / f64::from(rounds),
        coordinator_peak_rss: m.coordinator_hwm,
        plants_peak_rss: m.plants_hwm,
        all_peak_rss: m.all_peak,
        coordinator_cpu_s_per_round: m.coordinator_cpu_s / f64::from(rounds),
        coordinator_faults_per_round: m.coordinator_faults as f64 / f64::from(rounds),
        plants_cpu_s_per_round: m.plants_cpu_s / f64::from(rounds),
        machine_cpu_s_per_round: m.machine_cpu_s / f64::from(rounds),
        preview_exact,
        checksums_ok,
        checksum_failures,
        data_dir: data,
    })
}

/// RAM-backed fallback for the data folder when the disk cannot hold a round.
const TMPFS: &str = "/dev/shm";

/// The coordinator's data folder: under the cell's folder when its disk has `need` bytes
/// free, else on tmpfs (the report says so: fsync there costs nothing).
pub(crate) fn data_dir(cell: &Path, need: u64) -> Result<PathBuf> {
    let free = free_bytes(cell)?;
    if free >= need {
        return Ok(cell.join("data"));
    }
    let name = cell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let shm = Path::new(TMPFS).join(format!("round_overhead-{}-{name}", std::process::id()));
    eprintln!(
        "   the disk of {} has {} MB free, the cell needs {} MB: data folder on tmpfs {}",
        cell.display(),
        free >> 20,
        need >> 20,
        shm.display()
    );
    Ok(shm)
}

/// Free bytes of the file system holding `path` (`df`).
fn free_bytes(path: &Path) -> Result<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow!("cannot read free space from df: {text}"))
}

/// Counters taken around the rounds.
struct Measured {
    lo_bytes: u64,
    coordinator_hwm: u64,
    plants_hwm: u64,
    all_peak: u64,
    coordinator_cpu_s: f64,
    coordinator_faults: u64,
    plants_cpu_s: f64,
    machine_cpu_s: f64,
}

/// Starts the plants, waits for the last version, and takes the counters around that.
#[allow(clippy::too_many_arguments)]
async fn drive(
    url: &str,
    data: &Path,
    layout: &PkiLayout,
    admin: &mut AdminClient<tonic::transport::Channel>,
    pid: u32,
    clients: u32,
    size: ModelSize,
    rounds: u32,
) -> Result<Measured> {
    procfs::reset_own_peak()?;
    let sampler = RssSampler::start(vec![pid, std::process::id()]);
    let me = std::process::id();
    let faults0 = procfs::process_minor_faults(pid)?;
    let (lo0, cpu0, own0, busy0) = (
        procfs::loopback_bytes()?,
        procfs::process_cpu_s(pid)?,
        procfs::process_cpu_s(me)?,
        procfs::machine_busy_s()?,
    );
    let generate = Arc::new(Semaphore::new(2));
    let encoder = Arc::new(Encoder::new(size));
    let mut plants = tokio::task::JoinSet::new();
    for index in 0..clients {
        let plant = Plant {
            index,
            files: layout.plant_files(&format!("plant-{}", index + 1)),
            prune: data.join("blobs"),
        };
        plants.spawn(plant.run(url.to_string(), encoder.clone(), rounds, generate.clone()));
    }
    while let Some(done) = plants.join_next().await {
        done??;
    }
    let last = u64::from(rounds) + 1;
    let started = Instant::now();
    loop {
        let s = admin.status(pb::StatusRequest {}).await?.into_inner();
        if s.latest_version >= last {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("version {last} was not published 120 s after the last upload: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = Measured {
        lo_bytes: procfs::loopback_bytes()? - lo0,
        coordinator_cpu_s: procfs::process_cpu_s(pid)? - cpu0,
        coordinator_faults: procfs::process_minor_faults(pid)? - faults0,
        plants_cpu_s: procfs::process_cpu_s(me)? - own0,
        machine_cpu_s: procfs::machine_busy_s()? - busy0,
        coordinator_hwm: procfs::status_bytes(pid, "VmHWM:")?,
        plants_hwm: procfs::status_bytes(std::process::id(), "VmHWM:")?,
        all_peak: 0,
    };
    let (all_peak, _) = sampler.finish();
    Ok(Measured { all_peak, ..m })
}

/// A round as its records tell it.
pub(crate) struct RoundFigures {
    pub round: u64,
    pub wall_s: f64,
    pub agg_s: f64,
    pub fleet_bytes: u64,
    pub model: ModelState,
}

/// Reads the rounds and their models from the stopped coordinator's data folder.
pub(crate) fn read_records(data: &Path, rounds: u32) -> Result<Vec<RoundFigures>> {
    let store = Store::open(&data.join("db"))?;
    let blobs = BlobStore::open(&data.join("blobs"))?;
    let mut out = Vec::new();
    for round in 1..=u64::from(rounds) {
        let r: RoundRecord = store
            .round(round)?
            .ok_or_else(|| anyhow!("no round {round}"))?;
        if r.state != RoundState::Published {
            bail!("round {round} ended {:?}: {:?}", r.state, r.failure);
        }
        let version = r
            .published_version
            .ok_or_else(|| anyhow!("round {round} has no version"))?;
        let m: ModelRecord = store
            .model(version)?
            .ok_or_else(|| anyhow!("no version {version}"))?;
        let last_update = store
            .updates_of_round(round)?
            .iter()
            .map(|u| u.received_unix_ms)
            .max()
            .unwrap_or(r.opened_unix_ms);
        let (model, _) = ModelState::from_safetensors_bytes(&blobs.read(&m.blob_sha256)?)?;
        if model.content_hash() != m.content_hash.0 {
            bail!("version {version} does not match its content hash");
        }
        out.push(RoundFigures {
            round,
            wall_s: (m.created_unix_ms - r.opened_unix_ms) as f64 / 1000.0,
            agg_s: (m.created_unix_ms - last_update) as f64 / 1000.0,
            fleet_bytes: r.bytes_sent + r.bytes_received,
            model,
        });
    }
    Ok(out)
}

/// Compares every round's model with the published canonical SHA-256 and sum64.
fn check(
    records: &[RoundFigures],
    expected: &CellChecksums,
    size: ModelSize,
) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut failures = Vec::new();
    for r in records {
        let Some(want) = expected
            .rounds
            .iter()
            .find(|c| u64::from(c.round) == r.round)
        else {
            failures.push(format!("round {}: no published checksum", r.round));
            continue;
        };
        // The SHA-256 is the bit-exact check; sum64 is only shown (the JSON holds it in
        // shortest decimal form, which a float parser need not read back to the same bits).
        let sha = workload::sha256_table_order(size, &r.model).unwrap_or_default();
        if sha == want.sha256 {
            ok += 1;
        } else {
            let sum = workload::sum64_table_order(size, &r.model).unwrap_or(f64::NAN);
            failures.push(format!(
                "round {}: sha256 {sha} sum64 {sum:e}, canonical sha256 {} sum64 {:e}",
                r.round, want.sha256, want.sum64
            ));
        }
    }
    (ok, failures)
}

pub(crate) fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub(crate) fn write_config(
    dir: &Path,
    data: &Path,
    layout: &PkiLayout,
    initial: &Path,
    port: u16,
    clients: u32,
    rounds: u32,
) -> Result<PathBuf> {
    let files = layout.coordinator_files();
    let text = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{data}"
signing_key = "{key}"
initial_model = "{initial}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{tls_key}"

[round]
min_participants = {clients}
target_participants = {clients}
deadline_secs = 900
codec = "f32"
max_rounds = {rounds}

[limits]
max_update_bytes = 1073741824
max_samples_per_plant = 1000000
"#,
        data = data.display(),
        key = layout.coordinator_signing_key().display(),
        initial = initial.display(),
        ca = files.ca_cert.display(),
        cert = files.cert.display(),
        tls_key = files.key.display(),
    );
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

pub(crate) fn spawn_coordinator(dir: &Path, config: &Path) -> Result<Child> {
    spawn_coordinator_binary(Path::new(env!("CARGO_BIN_EXE_coordinator")), dir, config)
}

/// [`spawn_coordinator`] with another build of the coordinator (`--coordinator label=PATH`).
pub(crate) fn spawn_coordinator_binary(binary: &Path, dir: &Path, config: &Path) -> Result<Child> {
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    Command::new(binary)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("COORDINATOR_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the coordinator binary")
}

/// Connects an admin client once the coordinator listens (it stores version 1 first).
pub(crate) async fn wait_for_admin(
    url: &str,
    layout: &PkiLayout,
    coordinator: &mut Child,
) -> Result<AdminClient<tonic::transport::Channel>> {
    let started = Instant::now();
    loop {
        if let Some(status) = coordinator.try_wait()? {
            bail!("the coordinator exited at start ({status})");
        }
        if let Ok(ch) = plant::channel(url, &layout.admin_files()).await {
            return Ok(AdminClient::new(ch));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the coordinator did not listen within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM (graceful drain), then SIGKILL after 30 s.
pub(crate) fn stop(child: &mut Child) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    Command::new("kill").arg(child.id().to_string()).status()?;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill()?;
            child.wait()?;
            bail!("the coordinator did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
