//! The test harness: a fresh PKI and data folder per test, a real coordinator on
//! 127.0.0.1:0, and plants as tonic clients with plant certificates sending synthetic deltas
//! of a small model (3 tensors, 556 values).

#![allow(dead_code)] // each test binary uses part of the harness

pub mod fault_proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::delta::{self, Codec, Layout};
use fedinspect_common::fedavg::{aggregate_canonical, PlantUpdate};
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::tls::{self, Role, TlsFiles};
use fedinspect_common::{ModelState, Tensor};
use fedinspect_coordinator::config::{Limits, RoundPolicy};
use fedinspect_coordinator::rpc::admin_client::{self, AdminCommand};
use fedinspect_coordinator::{Config, Coordinator, Running};
use fedinspect_proto::v1 as pb;
use fedinspect_proto::v1::federation_client::FederationClient;
use fedinspect_proto::PROTOCOL_VERSION;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(10);

/// A PKI and data folder for one test.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub pki: PkiLayout,
    pub checkpoint: PathBuf,
}

impl Site {
    pub fn new(plants: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::init(
            &dir.path().join("pki"),
            &InitOptions::with_plant_count(plants),
        )
        .unwrap();
        let checkpoint = dir.path().join("initial.safetensors");
        base_model()
            .save_safetensors(&checkpoint, &BTreeMap::new())
            .unwrap();
        Self {
            dir,
            pki,
            checkpoint,
        }
    }

    pub fn config(&self, data: &str, round: RoundPolicy, limits: Limits) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: self.dir.path().join(data),
            tls: self.pki.coordinator_files(),
            signing_key: self.pki.coordinator_signing_key(),
            initial_model: Some(self.checkpoint.clone()),
            round,
            limits,
            bundles: None,
            metrics_listen: None,
            storage: Default::default(),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::load(&self.pki.coordinator_verifying_key()).unwrap()
    }
}

pub fn policy(min: u32, target: u32, deadline_secs: u64, codec: Codec) -> RoundPolicy {
    RoundPolicy {
        min_participants: min,
        target_participants: target,
        deadline: Duration::from_secs(deadline_secs),
        codec,
        ..RoundPolicy::default()
    }
}

pub async fn start(config: &Config) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Coordinator::build(config).unwrap().spawn(listener).unwrap()
}

pub fn url(running: &Running) -> String {
    format!("https://127.0.0.1:{}", running.local_addr().port())
}

/// The initial model: three tensors with deterministic values.
pub fn base_model() -> ModelState {
    let mut m = ModelState::new();
    for (name, shape, seed) in [
        ("backbone.conv.weight", vec![16, 12], 1u64),
        ("backbone.conv.bias", vec![64], 2),
        ("head.weight", vec![10, 30], 3),
    ] {
        let n = shape.iter().product();
        m.insert(name, Tensor::new(shape, noise(n, 0.5, seed)).unwrap())
            .unwrap();
    }
    m
}

/// A plant's synthetic delta: noise of size `scale` on every base value.
pub fn synthetic_delta(seed: u64, scale: f32) -> ModelState {
    let base = base_model();
    let mut d = base.zeros_like();
    for (i, (_, t)) in d.iter_mut().enumerate() {
        let n = t.numel();
        t.data_mut()
            .copy_from_slice(&noise(n, scale, seed * 31 + i as u64));
    }
    d
}

/// A synthetic delta whose values are multiples of 2^-20 (integers below 2^14 times that):
/// with small sample counts every FedAvg sum is exact, so the running mean must equal the
/// canonical model bit for bit.
pub fn exact_delta(seed: u64) -> ModelState {
    let mut d = synthetic_delta(seed, 0.01);
    for (_, t) in d.iter_mut() {
        for v in t.data_mut() {
            *v = (*v * 1_048_576.0).round() / 1_048_576.0;
        }
    }
    d
}

pub fn encode(delta: &ModelState, codec: Codec) -> Vec<u8> {
    let mut out = Vec::new();
    delta::encode(delta, codec, &mut out).unwrap();
    out
}

/// What the coordinator must publish: canonical FedAvg of the decoded payloads.
pub fn expected_fedavg(base: &ModelState, uploads: &[(&str, u64, &[u8], Codec)]) -> ModelState {
    let layout = Layout::of(base);
    let deltas: Vec<ModelState> = uploads
        .iter()
        .map(|(_, _, bytes, codec)| delta::decode_to_model(*bytes, &layout, Some(*codec)).unwrap())
        .collect();
    let updates: Vec<PlantUpdate<'_>> = uploads
        .iter()
        .zip(&deltas)
        .map(|((plant, n, _, _), d)| PlantUpdate::new(*plant, *n, d))
        .collect();
    aggregate_canonical(base, &updates).unwrap()
}

/// Deterministic values in about ±scale (SplitMix64).
pub fn noise(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// A channel with the TLS files given (checked or not).
pub async fn channel(
    url: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .domain_name("localhost");
    Channel::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A plant: a federation client with the plant's certificate.
pub struct Plant {
    pub id: String,
    pub client: FederationClient<Channel>,
    pub tasks: Option<Streaming<pb::Task>>,
}

impl Plant {
    pub async fn connect(site: &Site, url: &str, id: &str) -> Self {
        let files = site.pki.plant_files(id);
        tls::tonic_pem(&files, Role::Plant).unwrap();
        let ch = channel(url, &files.ca_cert, &files.cert, &files.key)
            .await
            .unwrap();
        Self {
            id: id.to_string(),
            client: FederationClient::new(ch),
            tasks: None,
        }
    }

    pub async fn register(&mut self, num_samples: u64) -> Result<pb::RegisterResponse, Status> {
        let req = pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            capabilities: Some(pb::Capabilities {
                device: "cpu".into(),
                num_samples,
                client_version: "test".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client.register(req).await.map(|r| r.into_inner())
    }

    /// Registers and opens the task stream.
    pub async fn join(&mut self, num_samples: u64) -> pb::RegisterResponse {
        let reg = self.register(num_samples).await.unwrap();
        let stream = self
            .client
            .tasks(pb::TasksRequest {
                protocol_version: PROTOCOL_VERSION,
            })
            .await
            .unwrap()
            .into_inner();
        self.tasks = Some(stream);
        reg
    }

    pub async fn next_train(&mut self) -> pb::TrainTask {
        let stream = self.tasks.as_mut().expect("join first");
        let task = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("a task within the wait")
            .unwrap()
            .expect("the task stream is open");
        match task.kind {
            Some(pb::task::Kind::Train(t)) => t,
            other => panic!("expected a train task, got {other:?}"),
        }
    }

    /// Downloads a version, checking chunk offsets, sizes and the final SHA-256.
    pub async fn download(&mut self, version: u64) -> Vec<u8> {
        let mut stream = self
            .client
            .download_model(pb::DownloadModelRequest {
                protocol_version: PROTOCOL_VERSION,
                version,
                offset: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut bytes = Vec::new();
        let mut digest = Vec::new();
        while let Some(c) = stream.message().await.unwrap() {
            assert_eq!(c.offset, bytes.len() as u64);
            assert!(c.data.len() <= fedinspect_proto::CHUNK_BYTES);
            bytes.extend_from_slice(&c.data);
            assert!(c.total_bytes >= bytes.len() as u64);
            digest = c.sha256;
        }
        assert_eq!(
            digest,
            sha256(&bytes),
            "final chunk carries the file's SHA-256"
        );
        bytes
    }

    /// Uploads `payload` (or only its first `send` bytes) with `header`, in 1000-byte chunks.
    pub async fn upload(
        &mut self,
        header: pb::UpdateHeader,
        payload: &[u8],
        send: usize,
    ) -> Result<pb::UploadUpdateResponse, Status> {
        let mut parts = vec![pb::UploadUpdateRequest {
            part: Some(pb::upload_update_request::Part::Header(header)),
        }];
        let total = payload.len() as u64;
        for (i, chunk) in payload[..send].chunks(1000).enumerate() {
            parts.push(pb::UploadUpdateRequest {
                part: Some(pb::upload_update_request::Part::Chunk(pb::Chunk {
                    offset: (i * 1000) as u64,
                    data: chunk.to_vec(),
                    total_bytes: total,
                    sha256: Vec::new(),
                })),
            });
        }
        self.client
            .upload_update(tokio_stream::iter(parts))
            .await
            .map(|r| r.into_inner())
    }
}

/// The header of an update trained on `task`'s base.
pub fn header(
    task: &pb::TrainTask,
    payload: &[u8],
    codec: pb::Codec,
    samples: u64,
    id: u8,
) -> pb::UpdateHeader {
    pb::UpdateHeader {
        protocol_version: PROTOCOL_VERSION,
        update_id: vec![id; 16],
        round: task.round,
        base_version: task.base_version,
        base_hash: task.base_hash.clone(),
        codec: codec.into(),
        num_samples: samples,
        payload_bytes: payload.len() as u64,
        payload_sha256: sha256(payload),
        plant_signature: vec![id; 64],
        metrics: [("train_loss".to_string(), f64::from(id))]
            .into_iter()
            .collect(),
        resume_offset: 0,
    }
}

/// Runs an admin command with the site's admin certificate.
pub async fn admin(
    site: &Site,
    url: &str,
    cmd: AdminCommand,
) -> Result<serde_json::Value, admin_client::AdminClientError> {
    admin_client::run(url, &site.pki.admin_files(), cmd).await
}

/// Waits until the coordinator's latest version is `version`.
pub async fn wait_for_version(site: &Site, url: &str, version: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = admin(site, url, AdminCommand::Status).await.unwrap();
        if s["latest_version"] == version {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "version {version} not published: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn files_of(site: &Site, id: &str) -> TlsFiles {
    site.pki.plant_files(id)
}

/// The `coordinator` binary serving `config` as its own process (so that a test can SIGKILL
/// it), with its output in `<data_dir>.log`.
pub struct Process {
    pub child: std::process::Child,
    pub url: String,
}

impl Process {
    /// Writes `config` as a coordinator.toml next to its data folder and starts `serve`; waits
    /// until it accepts TLS connections.
    pub async fn start(site: &Site, config: &Config) -> Self {
        Self::start_with(site, config, &[], "").await
    }

    /// SIGKILL: no drain, no flush, nothing finishes.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 for a coordinator process that is restarted on the same address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Process {
    /// As [`Process::start`], with `env` set for the child (e.g. the `failpoint` variable)
    /// and `round_extra` appended to the `[round]` table (e.g. `keep_update_blobs_rounds = 2`).
    pub async fn start_with(
        site: &Site,
        config: &Config,
        env: &[(&str, &str)],
        round_extra: &str,
    ) -> Self {
        let toml = config.data_dir.with_extension("toml");
        let q = |p: &Path| format!("\"{}\"", p.display());
        let r = &config.round;
        let codec = match r.codec {
            Codec::Q8 { block } => format!("codec = \"q8\"\nq8_block = {block}\n"),
            c => format!("codec = \"{c}\"\n"),
        };
        let text = format!(
            "listen = \"{}\"\ndata_dir = {}\nsigning_key = {}\ninitial_model = {}\n\
             [tls]\nca = {}\ncert = {}\nkey = {}\n\
             [round]\nmin_participants = {}\ntarget_participants = {}\ndeadline_secs = {}\n{codec}{round_extra}\n",
            config.listen,
            q(&config.data_dir),
            q(&config.signing_key),
            q(config.initial_model.as_ref().unwrap()),
            q(&config.tls.ca_cert),
            q(&config.tls.cert),
            q(&config.tls.key),
            r.min_participants,
            r.target_participants,
            r.deadline.as_secs(),
        );
        std::fs::write(&toml, text).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.data_dir.with_extension("log"))
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["serve", "--config"])
            .arg(&toml)
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("https://127.0.0.1:{}", config.listen.port());
        let files = site.pki.admin_files();
        let deadline = tokio::time::Instant::now() + WAIT;
        while channel(&url, &files.ca_cert, &files.cert, &files.key)
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the coordinator binary did not listen; see {}",
                config.data_dir.with_extension("log").display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, url }
    }

    /// Waits up to `wait` for the process to end on its own; its status, or `None`.
    pub async fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
