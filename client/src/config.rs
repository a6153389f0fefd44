//! `plant.toml`: the raw, all-optional [`RawConfig`] read by serde, resolved into a validated
//! [`Config`] that reports every problem of the file at once. Resolving also loads what a bad
//! file would otherwise break later: the TLS material (checked as a plant's), the pinned
//! coordinator key, and the plant's signing key, generated into the state folder on first run.
//!
//! Relative paths are taken relative to the folder of the config file.

pub use fedinspect_common::config_problems::ConfigError;
use fedinspect_common::config_problems::{load_config, resolve, Problems, RawTls};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::signing::{SigningError, SigningKey, VerifyingKey};
use fedinspect_common::tls::{Role, TlsMaterial, TonicPem};
use serde::Deserialize;

use crate::data::{Channels, OnInvalid};

/// File name of the plant's signing key in the state folder.
pub const SIGNING_KEY_FILE: &str = "plant-signing.key";
/// File name of its public half, written next to it for the operator.
pub const PUBLIC_KEY_FILE: &str = "plant-signing.pub";

/// The file as written: every field optional, unknown fields refused.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub coordinator: RawCoordinator,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub data: RawData,
    #[serde(default)]
    pub model: RawModel,
    #[serde(default)]
    pub training: RawTraining,
    #[serde(default)]
    pub agent: RawAgent,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoordinator {
    pub address: Option<String>,
    pub server_name: Option<String>,
    pub public_key: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    pub deeppcb: Option<PathBuf>,
    pub groups: Option<Vec<String>>,
    pub coco: Option<PathBuf>,
    pub coco_images: Option<PathBuf>,
    pub channels: Option<String>,
    pub on_invalid: Option<String>,
    pub validation_fraction: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub input_size: Option<u32>,
    pub width: Option<f64>,
    pub depth: Option<f64>,
    pub attention: Option<bool>,
    pub fpn_width: Option<u32>,
    pub head_width: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTraining {
    pub device: Option<String>,
    pub threads: Option<u32>,
    pub batch_size: Option<usize>,
    pub crop_size: Option<u32>,
    pub warmup_steps: Option<u64>,
    pub seed: Option<u64>,
    pub mixed_precision: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_secs: Option<u64>,
    pub deadline_margin_secs: Option<u64>,
    pub connect_timeout_secs: Option<u64>,
    pub call_timeout_secs: Option<u64>,
    pub stream_idle_timeout_secs: Option<u64>,
}

/// A checked configuration with its keys and TLS material loaded.
#[derive(Clone, Debug)]
pub struct Config {
    pub coordinator: CoordinatorConfig,
    /// The plant id in the plant's certificate.
    pub plant_id: String,
    pub tls: TonicPem,
    pub signing_key: Arc<SigningKey>,
    pub state_dir: PathBuf,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub training: TrainingConfig,
    pub agent: AgentConfig,
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// `https://host:port`.
    pub address: String,
    /// Name the coordinator's certificate must carry; `None`: the host of `address`.
    pub server_name: Option<String>,
    /// The pinned key every model signature must verify with.
    pub public_key: VerifyingKey,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// A DeepPCB `PCBData` folder; `groups` empty means every group of `trainval.txt`.
    DeepPcb { root: PathBuf, groups: Vec<String> },
    /// A COCO detection JSON; images relative to `images` (default: the JSON's folder).
    Coco {
        json: PathBuf,
        images: Option<PathBuf>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct DataConfig {
    pub source: DataSource,
    pub channels: Channels,
    pub on_invalid: OnInvalid,
    /// Share of the items held out (by a hash of their id) to measure mAP before and after
    /// each round's training; 0 turns the measurement off.
    pub validation_fraction: f64,
}

/// The architecture knobs; channels and classes follow the data.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub input_size: u32,
    pub width: f64,
    pub depth: f64,
    pub attention: bool,
    pub fpn_width: u32,
    pub head_width: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainingConfig {
    pub device: DeviceChoice,
    /// LibTorch CPU threads; `None` leaves LibTorch's default (all cores).
    pub threads: Option<u32>,
    /// Overrides the round plan's batch size (e.g. for a small GPU); `None` follows the plan.
    pub batch_size: Option<usize>,
    pub crop_size: u32,
    /// Learning-rate warmup steps at the start of every round (AdamW's moments start afresh
    /// each round), at most a third of the round's steps.
    pub warmup_steps: u64,
    pub seed: u64,
    pub mixed_precision: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AgentConfig {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Training stops this long before a task's deadline, leaving time to upload.
    pub deadline_margin: Duration,
    /// Connecting to the coordinator, TCP and TLS handshake (`connect_timeout_secs`, 10).
    pub connect_timeout: Duration,
    /// A unary call's answer, and an upload's acknowledgement after its last byte
    /// (`call_timeout_secs`, 60).
    pub call_timeout: Duration,
    /// The gap between two chunks of a download (`stream_idle_timeout_secs`, 60).
    pub stream_idle_timeout: Duration,
}

impl Default for ModelConfig {
    fn default() -> Self {
        let a = ArchConfig::default();
        Self {
            input_size: a.input_size,
            width: a.width,
            depth: a.depth,
            attention: a.attention,
            fpn_width: a.fpn_width,
            head_width: a.head_width,
        }
    }
}

impl ModelConfig {
    /// The architecture for `channels` input channels and `classes` classes.
    pub fn arch(&self, channels: Channels, classes: usize) -> ArchConfig {
        ArchConfig {
            in_channels: channels.count() as u32,
            num_classes: u32::try_from(classes).unwrap_or(u32::MAX),
            input_size: self.input_size,
            width: self.width,
            depth: self.depth,
            attention: self.attention,
            fpn_width: self.fpn_width,
            head_width: self.head_width,
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_config(path, "a plant", Self::from_raw)
    }

    /// Validates `raw`, resolving relative paths against `base`; returns every problem found.
    /// Creates the state folder and, when everything else is valid, the signing key.
    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Self, Vec<String>> {
        let mut p = Problems::new(
            "plant.example.toml",
            "fix the path or get the file from the operator who enrolled this plant",
        );
        let coordinator = coordinator(raw.coordinator, base, &mut p);
        let tls = tls(raw.tls, base, &mut p);
        let state_dir = match raw.state.dir {
            None => p.missing(
                "state.dir",
                "a folder for the model cache and pending uploads",
            ),
            Some(d) => {
                let dir = resolve(base, &d);
                match std::fs::create_dir_all(&dir) {
                    Ok(()) => Some(dir),
                    Err(e) => {
                        p.push(format!("state.dir: cannot create {}: {e}", dir.display()));
                        None
                    }
                }
            }
        };
        let data = data(raw.data, base, &mut p);
        let model = model(raw.model, &mut p);
        let training = training(raw.training, &model, &mut p);
        let agent = agent(raw.agent, &mut p);
        let (Some(coordinator), Some((plant_id, tls)), Some(state_dir), Some(data)) =
            (coordinator, tls, state_dir, data)
        else {
            return Err(p.into_vec());
        };
        if !p.is_empty() {
            return Err(p.into_vec());
        }
        let signing_key = plant_signing_key(&state_dir).map_err(|e| vec![e.to_string()])?;
        Ok(Config {
            coordinator,
            plant_id,
            tls,
            signing_key: Arc::new(signing_key),
            state_dir,
            data,
            model,
            training,
            agent,
        })
    }
}

/// Loads `<state_dir>/plant-signing.key`, generating it (mode 0600) and its `.pub` when absent.
pub fn plant_signing_key(state_dir: &Path) -> Result<SigningKey, SigningError> {
    let path = state_dir.join(SIGNING_KEY_FILE);
    match SigningKey::load(&path) {
        Err(SigningError::Missing { .. }) => {
            let key = SigningKey::generate()?;
            key.save(&path)?;
            key.verifying_key().save(&state_dir.join(PUBLIC_KEY_FILE))?;
            tracing::info!(path = %path.display(), key_id = %key.verifying_key().key_id(), "generated the plant signing key");
            Ok(key)
        }
        other => other,
    }
}

fn coordinator(raw: RawCoordinator, base: &Path, p: &mut Problems) -> Option<CoordinatorConfig> {
    let address = match raw.address {
        None => p.missing(
            "coordinator.address",
            "the coordinator's URL, e.g. \"https://coordinator.example:50051\"",
        ),
        Some(a) => match a.parse::<tonic::transport::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => Some(a),
            _ => {
                p.push(format!(
                    "coordinator.address: '{a}' is not an https URL with a host, e.g. \"https://coordinator.example:50051\" (the federation only speaks mutual TLS)"
                ));
                None
            }
        },
    };
    let key_path = p.existing_file(base, "coordinator.public_key", raw.public_key);
    let public_key = key_path.and_then(|path| {
        VerifyingKey::load(&path)
            .map_err(|e| p.push(format!("coordinator.public_key: {e}")))
            .ok()
    });
    Some(CoordinatorConfig {
        address: address?,
        server_name: raw.server_name,
        public_key: public_key?,
    })
}

/// The plant id and checked PEMs; a certificate problem is reported with the TLS error.
fn tls(raw: RawTls, base: &Path, p: &mut Problems) -> Option<(String, TonicPem)> {
    let files = p.tls_files(base, raw)?;
    match TlsMaterial::load(&files, Role::Plant) {
        Ok(m) => Some((m.identity().id.clone(), m.tonic_pem().clone())),
        Err(e) => {
            p.push(format!("tls: {e}"));
            None
        }
    }
}

fn data(raw: RawData, base: &Path, p: &mut Problems) -> Option<DataConfig> {
    let source = match (raw.deeppcb, raw.coco) {
        (Some(root), None) => {
            let root = resolve(base, &root);
            if !root.join("trainval.txt").is_file() {
                p.push(format!(
                    "data.deeppcb: {} holds no trainval.txt; point it at the PCBData folder",
                    root.display()
                ));
            }
            if raw.coco_images.is_some() {
                p.push("data.coco_images: only applies with data.coco".into());
            }
            Some(DataSource::DeepPcb {
                root,
                groups: raw.groups.unwrap_or_default(),
            })
        }
        (None, Some(json)) => {
            let json = resolve(base, &json);
            if !json.is_file() {
                p.push(format!("data.coco: {} is not a file", json.display()));
            }
            if raw.groups.is_some() {
                p.push("data.groups: only applies with data.deeppcb".into());
            }
            Some(DataSource::Coco {
                json,
                images: raw.coco_images.map(|d| resolve(base, &d)),
            })
        }
        (Some(_), Some(_)) => {
            p.push("data: set either deeppcb or coco, not both".into());
            None
        }
        (None, None) => p.missing(
            "data.deeppcb or data.coco",
            "the DeepPCB PCBData folder or a COCO detection JSON",
        ),
    };
    let default_channels = match source {
        Some(DataSource::Coco { .. }) => Channels::Rgb,
        _ => Channels::GrayTemplate,
    };
    let channels = match raw.channels.as_deref() {
        None => default_channels,
        Some("gray") => Channels::Gray,
        Some("gray_template") => Channels::GrayTemplate,
        Some("rgb") => Channels::Rgb,
        Some(other) => {
            p.push(format!(
                "data.channels: '{other}' is not one of gray, gray_template, rgb"
            ));
            default_channels
        }
    };
    let on_invalid = match raw.on_invalid.as_deref() {
        None | Some("skip") => OnInvalid::Skip,
        Some("fail") => OnInvalid::Fail,
        Some(other) => {
            p.push(format!(
                "data.on_invalid: '{other}' is not one of skip, fail"
            ));
            OnInvalid::Skip
        }
    };
    let validation_fraction = raw.validation_fraction.unwrap_or(0.1);
    if !(0.0..0.5).contains(&validation_fraction) {
        p.push(format!(
            "data.validation_fraction: {validation_fraction} must be in [0, 0.5); 0 turns the local before/after mAP off"
        ));
    }
    Some(DataConfig {
        source: source?,
        channels,
        on_invalid,
        validation_fraction,
    })
}

fn model(raw: RawModel, p: &mut Problems) -> ModelConfig {
    let d = ModelConfig::default();
    let input_size = raw.input_size.unwrap_or(d.input_size);
    if input_size == 0 || input_size % 32 != 0 {
        p.push(format!(
            "model.input_size: {input_size} must be a positive multiple of 32, e.g. 320 or 640"
        ));
    }
    let width = raw.width.unwrap_or(d.width);
    let depth = raw.depth.unwrap_or(d.depth);
    for (name, v) in [("width", width), ("depth", depth)] {
        if !(v.is_finite() && v > 0.0) {
            p.push(format!("model.{name}: {v} must be a positive number"));
        }
    }
    ModelConfig {
        input_size,
        width,
        depth,
        attention: raw.attention.unwrap_or(d.attention),
        fpn_width: raw.fpn_width.unwrap_or(d.fpn_width),
        head_width: raw.head_width.unwrap_or(d.head_width),
    }
}

fn training(raw: RawTraining, model: &ModelConfig, p: &mut Problems) -> TrainingConfig {
    let device = match raw.device.as_deref() {
        None | Some("auto") => DeviceChoice::Auto,
        Some("cpu") => DeviceChoice::Cpu,
        Some("cuda") => DeviceChoice::Cuda,
        Some(other) => {
            p.push(format!(
                "training.device: '{other}' is not one of auto, cpu, cuda"
            ));
            DeviceChoice::Auto
        }
    };
    if raw.batch_size == Some(0) {
        p.push(
            "training.batch_size: must be at least 1 (leave it out to follow the round plan)"
                .into(),
        );
    }
    let crop_size = raw.crop_size.unwrap_or(model.input_size.min(320));
    if crop_size == 0 || crop_size % 32 != 0 || crop_size > model.input_size {
        p.push(format!(
            "training.crop_size: {crop_size} must be a positive multiple of 32 no larger than model.input_size {}",
            model.input_size
        ));
    }
    TrainingConfig {
        device,
        threads: raw.threads.filter(|&t| t > 0),
        batch_size: raw.batch_size,
        crop_size,
        warmup_steps: raw.warmup_steps.unwrap_or(20),
        seed: raw.seed.unwrap_or(0),
        mixed_precision: raw.mixed_precision.unwrap_or(true),
    }
}

fn agent(raw: RawAgent, p: &mut Problems) -> AgentConfig {
    let initial = raw.backoff_initial_ms.unwrap_or(500);
    let max = raw.backoff_max_secs.unwrap_or(60);
    if initial == 0 {
        p.push("agent.backoff_initial_ms: must be at least 1".into());
    }
    if max.saturating_mul(1000) < initial {
        p.push(format!(
            "agent.backoff_max_secs: {max} s is below backoff_initial_ms {initial} ms"
        ));
    }
    AgentConfig {
        backoff_initial: Duration::from_millis(initial),
        backoff_max: Duration::from_secs(max),
        deadline_margin: Duration::from_secs(raw.deadline_margin_secs.unwrap_or(30)),
        connect_timeout: wait_bound(raw.connect_timeout_secs, 10, "connect_timeout_secs", p),
        call_timeout: wait_bound(raw.call_timeout_secs, 60, "call_timeout_secs", p),
        stream_idle_timeout: wait_bound(
            raw.stream_idle_timeout_secs,
            60,
            "stream_idle_timeout_secs",
            p,
        ),
    }
}

/// One of `[agent]`'s bounds on a wait for the coordinator: at least 1 s.
fn wait_bound(raw: Option<u64>, default: u64, key: &str, p: &mut Problems) -> Duration {
    let secs = raw.unwrap_or(default);
    if secs == 0 {
        p.push(format!(
            "agent.{key}: must be at least 1 (seconds the agent waits on the coordinator)"
        ));
    }
    Duration::from_secs(secs.max(1))
}
