//! The agent's domain types: what the coordinator asks (a [`TrainTask`]), what the plant says
//! about itself ([`Capabilities`]) and what it sends with an update ([`UpdateHeader`]), which
//! the rpc edge converts from and to protobuf; and what the agent reports ([`Event`]) and can
//! be made to fail ([`Faults`]) for tests.

use std::collections::BTreeMap;

use fedinspect_common::delta::Codec;
use fedinspect_common::lr_cycle::LrSpan;
use fedinspect_common::manifests::{UpdateManifest, UPDATE_KIND};
use fedinspect_common::ModelHash;

/// One round's work for this plant.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainTask {
    pub round: u64,
    pub base_version: u64,
    pub base_hash: ModelHash,
    /// The coordinator's signature over the base's model manifest.
    pub base_signature: Vec<u8>,
    pub plan: TrainPlan,
    pub deadline_unix_ms: i64,
}

/// How to train in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPlan {
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub fedprox_mu: f64,
    pub codec: Codec,
    /// 0 when the coordinator leaves it to the plant.
    pub batch_size: u32,
    /// The stretch of a learning-rate cosine shared by several rounds that this round covers;
    /// `None`: the round is a cosine of its own.
    pub lr_span: Option<LrSpan>,
}

impl TrainPlan {
    /// Whether the next round continues this round's learning-rate cycle, so that the AdamW
    /// moments this round ends with are worth keeping for it (twice the model's size).
    pub fn moments_continue(&self) -> bool {
        self.lr_span.is_some_and(|s| s.continued_by_next())
    }
}

/// Install a signed inference bundle (see `agent::bundle_task`).
#[derive(Clone, Debug, PartialEq)]
pub struct InstallBundleTask {
    pub bundle_id: String,
    pub model_version: u64,
    /// Hex SHA-256 of the bundle's manifest.json; a bundle with another manifest is refused.
    pub manifest_sha256: String,
    /// This plant installs it before the others.
    pub canary: bool,
}

/// What a plant reports about an install task.
#[derive(Clone, Debug, PartialEq)]
pub struct InstallOutcome {
    pub bundle_id: String,
    pub ok: bool,
    pub message: String,
    pub engine_built_locally: bool,
}

/// An instruction on the task stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Task {
    Train(TrainTask),
    InstallBundle(InstallBundleTask),
    /// A task kind this agent does not carry out yet (waits).
    Other(&'static str),
}

/// What the plant tells the coordinator when it registers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capabilities {
    /// `cpu` or `cuda:0`.
    pub device: String,
    pub gpu_name: String,
    pub compute_capability: String,
    /// As `trtexec` prints it, empty when `trtexec` is not on the PATH.
    pub tensorrt_version: String,
    /// Training images that show at least one defect of the class.
    pub samples_per_class: BTreeMap<String, u64>,
    pub num_samples: u64,
    pub client_version: String,
}

/// The coordinator's answer to a registration.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub plant_id: String,
    pub coordinator_id: String,
    pub coordinator_public_key: Vec<u8>,
}

/// Everything an upload announces before its payload.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateHeader {
    pub update_id: [u8; 16],
    pub round: u64,
    pub base_version: u64,
    pub base_hash: ModelHash,
    pub codec: Codec,
    pub num_samples: u64,
    pub payload_bytes: u64,
    pub payload_sha256: [u8; 32],
    pub plant_signature: Vec<u8>,
    pub metrics: BTreeMap<String, f64>,
}

/// What the coordinator holds of an update (`UploadStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadStatus {
    /// Payload bytes it holds durably: where a resumed upload starts.
    pub durable_bytes: u64,
    /// It accepted the update already; nothing needs sending.
    pub accepted: bool,
}

/// The coordinator's acknowledgement of an upload.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadAck {
    /// The update was accepted before; nothing was counted twice.
    pub duplicate: bool,
    pub delta_sha256: Vec<u8>,
}

impl UpdateHeader {
    /// The manifest the plant signs (and the coordinator checks) for this update.
    pub fn manifest(&self, plant_id: &str) -> UpdateManifest {
        UpdateManifest {
            kind: UPDATE_KIND.to_string(),
            plant_id: plant_id.to_string(),
            update_id: hex::encode(self.update_id),
            round: self.round,
            base_version: self.base_version,
            base_hash: self.base_hash.to_hex(),
            codec: codec_family(self.codec).to_string(),
            num_samples: self.num_samples,
            payload_sha256: hex::encode(self.payload_sha256),
        }
    }
}

/// `f32`, `f16` or `q8`: what the header's codec field names.
pub fn codec_family(codec: Codec) -> &'static str {
    match codec {
        Codec::F32 => "f32",
        Codec::F16 => "f16",
        Codec::Q8 { .. } => "q8",
    }
}

/// Failures to inject, for tests of the recovery paths; all off by default.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Treat the acknowledgement of the first upload as lost: the update stays pending, the
    /// connection is dropped, and the agent reconnects and sends it again with the same id.
    pub lose_first_ack: bool,
    /// End the first upload's stream after half of its payload, as a broken connection
    /// would: the coordinator keeps that half, and the retry resumes from it.
    pub cut_first_upload: bool,
}

/// What the agent did, for tests and monitoring (see [`super::Agent::events`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Registered {
        plant_id: String,
        coordinator_id: String,
    },
    BaseReady {
        round: u64,
        version: u64,
        from_cache: bool,
    },
    Trained {
        round: u64,
        steps: u64,
        seconds: f64,
    },
    Delivered {
        round: u64,
        update_id: [u8; 16],
        duplicate: bool,
    },
    Refused {
        round: u64,
        message: String,
    },
    TaskFailed {
        round: u64,
        message: String,
    },
    Disconnected {
        reason: String,
    },
    /// Registered again after `failed` connection attempts or sessions had failed.
    Reconnected {
        failed: u32,
    },
    /// A pending update is sent from byte `from`, the bytes before it being durable at the
    /// coordinator already.
    UploadResumed {
        round: u64,
        update_id: [u8; 16],
        from: u64,
    },
    /// An install task ended: installed (`ok`) or refused, with what was reported.
    BundleInstall(InstallOutcome),
}
