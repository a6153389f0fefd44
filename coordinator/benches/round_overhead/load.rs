//! The load cell (issue 8, "Load"): K plants (200 by default) upload P-parameter f32 deltas to
//! one coordinator at the same time, in one round. Each plant generates its payload twice
//! (once to learn its SHA-256 for the header, once while streaming it), so the plants' memory
//! does not grow with K × P and what is measured is the coordinator's. Prints how many
//! uploads were accepted and refused (by gRPC status), the upload throughput, the round's
//! wall time, the coordinator's and the plants' peak RSS, and whether the published model is
//! bit for bit the canonical FedAvg of exactly the accepted updates, recomputed here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedinspect_common::delta::{Codec, Layout};
use fedinspect_common::fedavg::workload::{self, GeneratedDelta, ModelSize};
use fedinspect_common::fedavg::{aggregate_canonical, DeltaSource, PlantUpdate};
use fedinspect_common::pki::{self, InitOptions};
use fedinspect_common::signing::SigningKey;
use fedinspect_common::tls::TlsFiles;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::federation_client::FederationClient;
use fedinspect_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::Semaphore;

use crate::cell;
use crate::plant;
use crate::procfs::{self, RssSampler};

/// How long the load round may take before it is abandoned.
const LOAD_TIMEOUT: Duration = Duration::from_secs(1800);

/// What happened to one plant's upload.
enum Outcome {
    Accepted { started: Instant, acked: Instant },
    Refused(tonic::Code, String),
}

/// Runs the load cell in a fresh folder under `work`; false if the published model is not
/// the canonical FedAvg of the accepted updates or an upload failed in an unclean way.
pub async fn run(work: &std::path::Path, clients: u32, size: ModelSize) -> Result<bool> {
    let dir = work.join(format!("load-{}", workload::cell_key(clients, size)));
    std::fs::create_dir_all(&dir)?;
    let payload = 4 * size.num_params() as u64 + 4096;
    let data = cell::data_dir(
        &dir,
        u64::from(clients) * payload + 3 * payload + (512 << 20),
    )?;
    eprintln!(
        "== load {clients}x{}: PKI for {clients} plants",
        size.label()
    );
    let layout = pki::init(
        &dir.join("pki"),
        &InitOptions::with_plant_count(clients as usize),
    )?;
    let initial = dir.join("initial.safetensors");
    workload::initial_global(size).save_safetensors(&initial, &BTreeMap::new())?;
    let port = cell::free_port()?;
    let config = cell::write_config(&dir, &data, &layout, &initial, port, clients, 1)?;
    let mut coordinator = cell::spawn_coordinator(&dir, &config)?;
    let pid = coordinator.id();
    let url = format!("https://127.0.0.1:{port}");
    let shape = Arc::new(Shape::new(size));
    let measured = async {
        let mut admin = cell::wait_for_admin(&url, &layout, &mut coordinator).await?;
        procfs::reset_own_peak()?;
        let sampler = RssSampler::start(vec![pid, std::process::id()]);
        let started = Instant::now();
        let generate = Arc::new(Semaphore::new(2));
        let mut plants = tokio::task::JoinSet::new();
        for index in 0..clients {
            let files = layout.plant_files(&format!("plant-{}", index + 1));
            let (url, shape, generate) = (url.clone(), shape.clone(), generate.clone());
            plants.spawn(
                async move { (index, upload_once(url, files, index, shape, generate).await) },
            );
        }
        let mut outcomes = BTreeMap::new();
        while let Some(done) = plants.join_next().await {
            let (index, outcome) = done?;
            outcomes.insert(
                index,
                outcome.with_context(|| format!("plant-{}", index + 1))?,
            );
        }
        wait_for_version(&mut admin, 2).await?;
        let wall = started.elapsed();
        let coordinator_hwm = procfs::status_bytes(pid, "VmHWM:")?;
        let plants_hwm = procfs::status_bytes(std::process::id(), "VmHWM:")?;
        let (all_peak, _) = sampler.finish();
        Ok::<_, anyhow::Error>((outcomes, wall, coordinator_hwm, plants_hwm, all_peak))
    };
    let measured = tokio::time::timeout(LOAD_TIMEOUT, measured)
        .await
        .map_err(|_| anyhow!("the load cell did not finish within {LOAD_TIMEOUT:?}"));
    cell::stop(&mut coordinator)?;
    let (outcomes, wall, coordinator_hwm, plants_hwm, all_peak) = measured?
        .with_context(|| format!("coordinator log: {}", dir.join("coordinator.log").display()))?;
    let records = cell::read_records(&data, 1)?;
    let published = &records[0];

    let accepted: Vec<u32> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Accepted { .. }))
        .map(|(i, _)| *i)
        .collect();
    let mut refused: BTreeMap<String, u32> = BTreeMap::new();
    for o in outcomes.values() {
        if let Outcome::Refused(code, message) = o {
            *refused.entry(format!("{code:?}: {message}")).or_default() += 1;
        }
    }
    let (first, last) = outcomes.values().fold((None, None), |(f, l), o| match o {
        Outcome::Accepted { started, acked } => (
            Some(f.map_or(*started, |f: Instant| f.min(*started))),
            Some(l.map_or(*acked, |l: Instant| l.max(*acked))),
        ),
        Outcome::Refused(..) => (f, l),
    });
    let upload_s = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => f64::NAN,
    };
    let accepted_bytes = accepted.len() as f64 * shape.payload_len as f64;
    eprintln!(
        "   recomputing the canonical FedAvg of the {} accepted updates",
        accepted.len()
    );
    let sources: Vec<(u32, GeneratedDelta)> = accepted
        .iter()
        .map(|&i| (i, GeneratedDelta::new(size, i, 1)))
        .collect();
    let updates: Vec<PlantUpdate<'_>> = sources
        .iter()
        .map(|(i, d)| {
            PlantUpdate::new(
                format!("plant-{}", i + 1),
                workload::num_samples(*i),
                d as &dyn DeltaSource,
            )
        })
        .collect();
    let expected = aggregate_canonical(&workload::initial_global(size), &updates)?;
    let model_ok = published.model == expected;
    const MIB: f64 = 1024.0 * 1024.0;
    println!(
        "LOAD K={clients} P={}: accepted {}/{clients}, refused {} {:?} | uploads {:.1} s for {:.0} MB accepted: {:.0} MB/s ({:.2} updates/s) | round wall {:.1} s (coordinator's record {:.1} s, aggregation {:.1} s) | RSS coordinator {:.0} MiB, plants {:.0} MiB, all {:.0} MiB | published model = canonical FedAvg of the accepted updates: {}",
        size.label(),
        accepted.len(),
        outcomes.len() - accepted.len(),
        refused,
        upload_s,
        accepted_bytes / 1e6,
        accepted_bytes / 1e6 / upload_s,
        accepted.len() as f64 / upload_s,
        wall.as_secs_f64(),
        published.wall_s,
        published.agg_s,
        coordinator_hwm as f64 / MIB,
        plants_hwm as f64 / MIB,
        all_peak as f64 / MIB,
        if model_ok { "yes, bit for bit" } else { "NO" },
    );
    if data.starts_with("/dev/shm") {
        let _ = std::fs::remove_dir_all(&data);
    }
    Ok(model_ok && accepted.len() + refused.values().sum::<u32>() as usize == outcomes.len())
}

/// The f32 payload layout of the workload model: header bytes, tensors, total length.
struct Shape {
    size: ModelSize,
    layout: Layout,
    header: Vec<u8>,
    payload_len: u64,
}

impl Shape {
    fn new(size: ModelSize) -> Self {
        let layout = Layout::of(&workload::initial_global(size));
        let header = fedinspect_coordinator::storage::header_bytes(&layout, Codec::F32);
        let numel: usize = layout
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let payload_len = header.len() as u64 + 4 * numel as u64 + 32;
        Self {
            size,
            layout,
            header,
            payload_len,
        }
    }
}

/// A workload delta's f32 payload (as `delta::encode` writes it: header, values in name
/// order, SHA-256 of all before) in `CHUNK_BYTES` pieces, generated as they are asked for.
struct PayloadChunks {
    shape: Arc<Shape>,
    source: GeneratedDelta,
    tensors: Vec<(String, usize)>,
    /// Next tensor, and the next value within it.
    at: (usize, usize),
    header_done: bool,
    trailer_done: bool,
    /// Over everything before the trailer, and over everything.
    body: ring::digest::Context,
    whole: ring::digest::Context,
    buffer: Vec<u8>,
}

impl PayloadChunks {
    fn new(shape: Arc<Shape>, index: u32, round: u32) -> Self {
        let tensors = shape
            .layout
            .iter()
            .map(|(n, s)| (n.to_string(), s.iter().product()))
            .collect();
        let source = GeneratedDelta::new(shape.size, index, round);
        Self {
            shape,
            source,
            tensors,
            at: (0, 0),
            header_done: false,
            trailer_done: false,
            body: ring::digest::Context::new(&ring::digest::SHA256),
            whole: ring::digest::Context::new(&ring::digest::SHA256),
            buffer: Vec::with_capacity(2 * CHUNK_BYTES),
        }
    }

    /// Appends the next piece of the stream to the buffer; false once all was appended.
    fn refill(&mut self) -> Result<bool> {
        let start = self.buffer.len();
        if !self.header_done {
            self.buffer.extend_from_slice(&self.shape.header);
            self.header_done = true;
        } else if let Some((name, numel)) = self.tensors.get(self.at.0) {
            let n = (1usize << 16).min(numel - self.at.1);
            let mut values = vec![0f32; n];
            self.source.read(name, self.at.1, &mut values)?;
            self.buffer
                .extend(values.iter().flat_map(|v| v.to_le_bytes()));
            self.at.1 += n;
            if self.at.1 == *numel {
                self.at = (self.at.0 + 1, 0);
            }
        } else if !self.trailer_done {
            let sum = self.body.clone().finish();
            self.whole.update(&self.buffer[start..]);
            self.buffer.extend_from_slice(sum.as_ref());
            self.whole.update(sum.as_ref());
            self.trailer_done = true;
            return Ok(true);
        } else {
            return Ok(false);
        }
        self.body.update(&self.buffer[start..]);
        self.whole.update(&self.buffer[start..]);
        Ok(true)
    }

    /// The next chunk of at most `CHUNK_BYTES`; `None` at the end.
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        while self.buffer.len() < CHUNK_BYTES && self.refill()? {}
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let rest = self.buffer.split_off(self.buffer.len().min(CHUNK_BYTES));
        Ok(Some(std::mem::replace(&mut self.buffer, rest)))
    }

    /// SHA-256 of the whole stream, once it was read to the end.
    fn sha256(self) -> [u8; 32] {
        self.whole.finish().as_ref().try_into().expect("32 bytes")
    }
}

/// One plant: connect, register, take the train task, download the base, upload the delta.
async fn upload_once(
    url: String,
    files: TlsFiles,
    index: u32,
    shape: Arc<Shape>,
    generate: Arc<Semaphore>,
) -> Result<Outcome> {
    let id = format!("plant-{}", index + 1);
    let ch = plant::channel(&url, &files).await.context("connect")?;
    let mut client = FederationClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let key = SigningKey::generate()?;
    let n = workload::num_samples(index);
    let reg = client
        .register(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            capabilities: Some(pb::Capabilities {
                device: "cpu".into(),
                num_samples: n,
                client_version: "round_overhead load".into(),
                ..Default::default()
            }),
            plant_public_key: key.verifying_key().as_bytes().to_vec(),
        })
        .await;
    if let Err(s) = reg {
        return Ok(Outcome::Refused(
            s.code(),
            format!("register: {}", s.message()),
        ));
    }
    let mut tasks = client
        .tasks(pb::TasksRequest {
            protocol_version: PROTOCOL_VERSION,
        })
        .await?
        .into_inner();
    let task = loop {
        let t = tasks
            .message()
            .await?
            .ok_or_else(|| anyhow!("the task stream ended"))?;
        if let Some(pb::task::Kind::Train(t)) = t.kind {
            break t;
        }
    };
    plant::download(&mut client, task.base_version).await?;
    let round = u32::try_from(task.round)?;
    // First pass: the SHA-256 the header declares (CPU-bound, two plants at a time).
    let permit = generate.acquire().await?;
    let first = shape.clone();
    let sha = tokio::task::spawn_blocking(move || -> Result<[u8; 32]> {
        let mut chunks = PayloadChunks::new(first, index, round);
        while chunks.next_chunk()?.is_some() {}
        Ok(chunks.sha256())
    })
    .await??;
    drop(permit);
    let len = shape.payload_len;
    let header = plant::header_for_len(&id, &key, &task, n, len, sha)?;
    let first = pb::UploadUpdateRequest {
        part: Some(pb::upload_update_request::Part::Header(header)),
    };
    // Second pass: generated as tonic asks for each chunk.
    let mut chunks = PayloadChunks::new(shape, index, round);
    let mut offset = 0u64;
    let body = std::iter::from_fn(move || {
        let data = chunks
            .next_chunk()
            .expect("the workload generator cannot fail")?;
        let c = pb::Chunk {
            offset,
            total_bytes: len,
            data,
            sha256: Vec::new(),
        };
        offset += c.data.len() as u64;
        Some(pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Chunk(c)),
        })
    });
    let started = Instant::now();
    let stream = tokio_stream::iter(std::iter::once(first).chain(body));
    match client.upload_update(stream).await {
        Ok(ack) if ack.get_ref().duplicate => bail!("the coordinator saw this update before"),
        Ok(_) => Ok(Outcome::Accepted {
            started,
            acked: Instant::now(),
        }),
        Err(s) => Ok(Outcome::Refused(s.code(), s.message().to_string())),
    }
}

/// Waits until version `version` is published.
async fn wait_for_version(
    admin: &mut fedinspect_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    version: u64,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let s = admin.status(pb::StatusRequest {}).await?.into_inner();
        if s.latest_version >= version {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("version {version} was not published 600 s after the last upload: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
