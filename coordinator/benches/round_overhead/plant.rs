//! A benchmark plant: an in-process tonic client with its own plant certificate and HTTP/2
//! connection that, per round, takes its train task, downloads the base model (hashing it as
//! it streams, then dropping it: the workload's deltas do not depend on it), writes its
//! WORKLOAD delta f32-encoded into a buffer it reuses from round to round ([`Encoder`], the
//! same bytes and stream SHA-256 as `delta::encode_with_sha256`, checked at start; each byte
//! hashed once), signs the update manifest and uploads it in 1 MiB chunks. No training.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::workload::{self, GeneratedDelta, ModelSize};
use fedinspect_common::fedavg::DeltaSource;
use fedinspect_common::manifests::{UpdateManifest, UPDATE_KIND};
use fedinspect_common::signing::SigningKey;
use fedinspect_common::tls::TlsFiles;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::federation_client::FederationClient;
use fedinspect_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use tokio::sync::Semaphore;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// One plant of a cell: workload client `index` (0-based) is `plant-<index + 1>`.
pub struct Plant {
    pub index: u32,
    pub files: TlsFiles,
    /// The coordinator's blob folder: once the next round started (so the last one was
    /// published and its update blobs are never read again), the plant removes its previous
    /// payload's blob, so that a cell needs disk for one round of uploads, not R.
    pub prune: std::path::PathBuf,
}

/// Writes a workload delta as `delta::encode(_, Codec::F32, _)` would, without building the
/// decoded delta: header, little-endian values in name order, SHA-256 of all before it.
pub struct Encoder {
    size: ModelSize,
    layout: Layout,
    header: Vec<u8>,
}

impl Encoder {
    pub fn new(size: ModelSize) -> Self {
        let layout = Layout::of(&workload::initial_global(size));
        let header = fedinspect_coordinator::storage::header_bytes(&layout, Codec::F32);
        Self {
            size,
            layout,
            header,
        }
    }

    /// Client `index`'s delta of round `round` into `out` (its capacity is reused); returns
    /// the SHA-256 of the whole stream, from the pass that gives the trailing checksum (as
    /// `delta::encode_with_sha256` does), so each byte is hashed once.
    pub fn encode_into(&self, index: u32, round: u32, out: &mut Vec<u8>) -> Result<[u8; 32]> {
        let source = GeneratedDelta::new(self.size, index, round);
        out.clear();
        out.extend_from_slice(&self.header);
        let mut values = vec![0f32; 1 << 14];
        for (name, shape) in self.layout.iter() {
            let numel: usize = shape.iter().product();
            let mut offset = 0;
            while offset < numel {
                let n = values.len().min(numel - offset);
                source.read(name, offset, &mut values[..n])?;
                out.extend(values[..n].iter().flat_map(|v| v.to_le_bytes()));
                offset += n;
            }
        }
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        hash.update(out);
        let sum = hash.clone().finish();
        out.extend_from_slice(sum.as_ref());
        hash.update(sum.as_ref());
        Ok(hash.finish().as_ref().try_into()?)
    }

    /// Fails unless this encoder writes exactly what `delta::encode` writes.
    pub fn self_check() -> Result<()> {
        let size = ModelSize::Tiny;
        let enc = Self::new(size);
        for (index, round) in [(0, 1), (5, 3)] {
            let mut mine = Vec::new();
            let my_sha = enc.encode_into(index, round, &mut mine)?;
            let mut theirs = Vec::new();
            let delta = workload::client_delta(size, index, round);
            let (_, their_sha) = delta::encode_with_sha256(&delta, Codec::F32, &mut theirs)?;
            if mine != theirs || my_sha != their_sha {
                bail!("the bench's f32 encoder differs from delta::encode (client {index}, round {round})");
            }
        }
        Ok(())
    }
}

/// A mutual-TLS channel to the coordinator at `url` with the certificate in `files`.
pub async fn channel(url: &str, files: &TlsFiles) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&files.ca_cert)?))
        .identity(Identity::from_pem(
            std::fs::read(&files.cert)?,
            std::fs::read(&files.key)?,
        ))
        .domain_name("localhost");
    Ok(Channel::from_shared(url.to_string())?
        .tls_config(tls)?
        .connect()
        .await?)
}

impl Plant {
    pub fn id(&self) -> String {
        format!("plant-{}", self.index + 1)
    }

    /// Registers, then serves `rounds` train tasks. `generate` bounds how many plants build
    /// their payload at once (CPU-bound work on a 2-core machine; it also bounds the memory
    /// of the transient decoded delta).
    pub async fn run(
        self,
        url: String,
        encoder: Arc<Encoder>,
        rounds: u32,
        generate: Arc<Semaphore>,
    ) -> Result<()> {
        let id = self.id();
        let ch = channel(&url, &self.files)
            .await
            .with_context(|| format!("{id}: connect"))?;
        let mut client = FederationClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let key = SigningKey::generate()?;
        let n = workload::num_samples(self.index);
        client
            .register(pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                capabilities: Some(pb::Capabilities {
                    device: "cpu".into(),
                    num_samples: n,
                    client_version: "round_overhead bench".into(),
                    ..Default::default()
                }),
                plant_public_key: key.verifying_key().as_bytes().to_vec(),
            })
            .await
            .with_context(|| format!("{id}: register"))?;
        let mut tasks = client
            .tasks(pb::TasksRequest {
                protocol_version: PROTOCOL_VERSION,
            })
            .await?
            .into_inner();
        let mut previous: Option<String> = None;
        let mut buffer = Vec::new();
        for _ in 0..rounds {
            let task = loop {
                let t = tasks
                    .message()
                    .await?
                    .ok_or_else(|| anyhow!("{id}: the task stream ended"))?;
                if let Some(pb::task::Kind::Train(t)) = t.kind {
                    break t;
                }
            };
            if let Some(hex) = previous.take() {
                let path = self.prune.join(&hex[..2]).join(&hex);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
                }
            }
            download(&mut client, task.base_version)
                .await
                .with_context(|| format!("{id}: download of version {}", task.base_version))?;
            let round = u32::try_from(task.round)?;
            let index = self.index;
            let permit = generate.acquire().await?;
            let enc = encoder.clone();
            let mut payload = std::mem::take(&mut buffer);
            let payload = tokio::task::spawn_blocking(move || {
                enc.encode_into(index, round, &mut payload)
                    .map(|sha| (payload, sha))
            })
            .await??;
            drop(permit);
            let (payload, sha) = payload;
            let header = header(&id, &key, &task, n, &payload, sha)?;
            previous = Some(hex::encode(&header.payload_sha256));
            let payload = Arc::new(payload);
            upload(&mut client, header, payload.clone())
                .await
                .with_context(|| format!("{id}: upload of round {round}"))?;
            // Reuse the buffer's pages next round once tonic let go of them.
            buffer = Arc::try_unwrap(payload).unwrap_or_default();
        }
        Ok(())
    }
}

fn header(
    plant: &str,
    key: &SigningKey,
    task: &pb::TrainTask,
    num_samples: u64,
    payload: &[u8],
    sha: [u8; 32],
) -> Result<pb::UpdateHeader> {
    header_for_len(plant, key, task, num_samples, payload.len() as u64, sha)
}

/// The signed header of a `payload_bytes`-long f32 payload whose stream SHA-256 is `sha`.
pub(crate) fn header_for_len(
    plant: &str,
    key: &SigningKey,
    task: &pb::TrainTask,
    num_samples: u64,
    payload_bytes: u64,
    sha: [u8; 32],
) -> Result<pb::UpdateHeader> {
    let mut update_id = [0u8; 16];
    update_id[..8].copy_from_slice(&task.round.to_le_bytes());
    update_id[8..].copy_from_slice(
        &ring::digest::digest(&ring::digest::SHA256, plant.as_bytes()).as_ref()[..8],
    );
    let manifest = UpdateManifest {
        kind: UPDATE_KIND.to_string(),
        plant_id: plant.to_string(),
        update_id: hex::encode(update_id),
        round: task.round,
        base_version: task.base_version,
        base_hash: hex::encode(&task.base_hash),
        codec: "f32".into(),
        num_samples,
        payload_sha256: hex::encode(sha),
    };
    Ok(pb::UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        update_id: update_id.to_vec(),
        round: task.round,
        base_version: task.base_version,
        base_hash: task.base_hash.clone(),
        codec: pb::Codec::F32.into(),
        num_samples,
        payload_bytes,
        payload_sha256: sha.to_vec(),
        plant_signature: manifest.sign(key)?,
        metrics: Default::default(),
        resume_offset: 0,
    })
}

/// Streams version `version`, checking offsets and the final SHA-256; keeps no copy.
pub(crate) async fn download(client: &mut FederationClient<Channel>, version: u64) -> Result<u64> {
    let mut stream = client
        .download_model(pb::DownloadModelRequest {
            protocol_version: PROTOCOL_VERSION,
            version,
            offset: 0,
        })
        .await?
        .into_inner();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut got, mut digest) = (0u64, Vec::new());
    while let Some(c) = stream.message().await? {
        if c.offset != got {
            bail!("chunk at {} after {got} bytes", c.offset);
        }
        hash.update(&c.data);
        got += c.data.len() as u64;
        digest = c.sha256;
    }
    if hash.finish().as_ref() != digest.as_slice() {
        bail!("the model's SHA-256 does not match its last chunk");
    }
    Ok(got)
}

/// Uploads `payload` after `header`, building each 1 MiB chunk message only when tonic asks
/// for it.
async fn upload(
    client: &mut FederationClient<Channel>,
    header: pb::UpdateHeader,
    payload: Arc<Vec<u8>>,
) -> Result<()> {
    let total = payload.len();
    let first = pb::UploadUpdateRequest {
        part: Some(pb::upload_update_request::Part::Header(header)),
    };
    let chunks = (0..total.div_ceil(CHUNK_BYTES)).map(move |i| {
        let (a, b) = (i * CHUNK_BYTES, ((i + 1) * CHUNK_BYTES).min(total));
        pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
                offset: a as u64,
                data: payload[a..b].to_vec(),
                total_bytes: total as u64,
                sha256: Vec::new(),
            })),
        }
    });
    let stream = tokio_stream::iter(std::iter::once(first).chain(chunks));
    let ack = client.upload_update(stream).await?.into_inner();
    if ack.duplicate {
        bail!("the coordinator saw this update before");
    }
    Ok(())
}
