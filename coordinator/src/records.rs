//! The coordinator's domain records: plants, rounds, accepted updates, model versions and
//! audit entries, as the storage module keeps them and the rpc modules show them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use fedinspect_common::delta::Codec;
use fedinspect_common::lr_cycle::LrSpan;
use fedinspect_common::ModelHash;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A SHA-256 digest of bytes (a blob, a delta payload).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// The 16 random bytes a plant chooses for one update; a retry reuses them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpdateId(pub [u8; 16]);

/// What a plant said about itself when it registered.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub device: String,
    pub gpu_name: String,
    pub compute_capability: String,
    pub tensorrt_version: String,
    pub samples_per_class: BTreeMap<String, u64>,
    pub num_samples: u64,
    pub client_version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlantRecord {
    pub plant_id: String,
    pub capabilities: Capabilities,
    pub registered_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub revoked: Option<Revocation>,
    /// Ed25519 key the plant signs updates with (32 bytes), empty when it registered none.
    #[serde(default, with = "hex_bytes")]
    pub plant_public_key: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub reason: String,
    pub by: String,
    pub at_unix_ms: i64,
}

/// The life of a round: open, collecting, then aggregating and published, or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundState {
    Open,
    Collecting,
    Aggregating,
    Published,
    Failed,
}

/// What each plant of a round is asked to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainPlan {
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub fedprox_mu: f64,
    pub batch_size: u32,
    #[serde(with = "codec_text")]
    pub codec: Codec,
    /// The stretch of the learning-rate cosine the round covers (`round.lr_cycle_rounds`);
    /// `None`: a cosine of its own (and every record written before the setting existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_span: Option<LrSpan>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub state: RoundState,
    pub base_version: u64,
    pub base_hash: ModelHashText,
    pub plan: TrainPlan,
    pub opened_unix_ms: i64,
    pub deadline_unix_ms: i64,
    pub closed_unix_ms: Option<i64>,
    pub published_version: Option<u64>,
    /// Accepted updates at close.
    pub participants: u32,
    pub failure: Option<String>,
    /// Encoded payload bytes of the accepted updates (set at close).
    #[serde(default)]
    pub bytes_received: u64,
    /// Bytes of the base model streamed to plants while the round was open, counted since
    /// this coordinator process opened or resumed it (set at close).
    #[serde(default)]
    pub bytes_sent: u64,
    /// The plants sampled for the round (`round.sample_fraction`), in id order; empty when
    /// every plant takes part. Kept so that a resumed round tasks the same plants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sampled: Vec<String>,
}

/// One accepted update: its payload lives in the blob store under `delta_sha256`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub update_id: UpdateId,
    pub round: u64,
    pub plant_id: String,
    pub base_version: u64,
    #[serde(with = "codec_text")]
    pub codec: Codec,
    pub num_samples: u64,
    pub payload_bytes: u64,
    pub delta_sha256: Digest,
    #[serde(with = "hex_bytes")]
    pub plant_signature: Vec<u8>,
    pub metrics: BTreeMap<String, f64>,
    /// L2 norm of the decoded delta (f64 sum of squares in stream order).
    pub l2_norm: f64,
    /// Factor the delta is multiplied by at aggregation when it was clipped to the norm bound.
    pub clip_scale: Option<f32>,
    pub received_unix_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelStatus {
    Candidate,
    Promoted,
    RolledBack,
}

/// A plant's part in a model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    pub plant_id: String,
    pub num_samples: u64,
    pub delta_sha256: Digest,
    #[serde(with = "hex_bytes")]
    pub plant_signature: Vec<u8>,
}

/// A model version. Everything but `status` is fixed once stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub version: u64,
    /// The base it was aggregated from; 0 for an initial model.
    pub parent: u64,
    /// The round that produced it; 0 for an initial model.
    pub round: u64,
    pub content_hash: ModelHashText,
    /// SHA-256 of the safetensors file, its blob address.
    pub blob_sha256: Digest,
    pub size_bytes: u64,
    /// Coordinator's Ed25519 signature over the model manifest (see `manifest`).
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    pub strategy: String,
    pub contributors: Vec<Contribution>,
    pub metrics: BTreeMap<String, f64>,
    pub created_unix_ms: i64,
    pub status: ModelStatus,
}

/// A refusal or an admin action, kept for operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_unix_ms: i64,
    /// `plant:<id>`, `admin:<name>` or `coordinator`.
    pub actor: String,
    pub action: String,
    pub detail: String,
    /// What kind of event it is (entries written before kinds existed read as `other`).
    #[serde(default)]
    pub kind: AuditKind,
    /// The plant the event concerns: the refused plant, the revoked plant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plant: Option<String>,
}

/// The kinds of audited events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A request refused (wrong role, revoked plant, bad update, refused admin action, ...).
    Refusal,
    Revocation,
    Promotion,
    Rollback,
    /// A model version exported by an admin.
    Export,
    #[default]
    Other,
}

/// Which audit entries a listing returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditFilter {
    pub kind: Option<AuditKind>,
    pub plant: Option<String>,
}

/// A [`ModelHash`] stored as its hex text.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ModelHashText(pub ModelHash);

pub fn now_unix_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl RoundState {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundState::Open => "open",
            RoundState::Collecting => "collecting",
            RoundState::Aggregating => "aggregating",
            RoundState::Published => "published",
            RoundState::Failed => "failed",
        }
    }

    /// Whether the round still accepts updates.
    pub fn is_accepting(self) -> bool {
        matches!(self, RoundState::Open | RoundState::Collecting)
    }
}

impl AuditKind {
    pub const ALL: [AuditKind; 6] = [
        AuditKind::Refusal,
        AuditKind::Revocation,
        AuditKind::Promotion,
        AuditKind::Rollback,
        AuditKind::Export,
        AuditKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Refusal => "refusal",
            AuditKind::Revocation => "revocation",
            AuditKind::Promotion => "promotion",
            AuditKind::Rollback => "rollback",
            AuditKind::Export => "export",
            AuditKind::Other => "other",
        }
    }

    /// The kind named `name` (as [`AuditKind::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl AuditFilter {
    pub fn matches(&self, e: &AuditEntry) -> bool {
        self.kind.is_none_or(|k| k == e.kind)
            && self
                .plant
                .as_deref()
                .is_none_or(|p| e.plant.as_deref() == Some(p))
    }
}

impl ModelStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelStatus::Candidate => "candidate",
            ModelStatus::Promoted => "promoted",
            ModelStatus::RolledBack => "rolled_back",
        }
    }
}

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl UpdateId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for UpdateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpdateId({})", self.to_hex())
    }
}

impl fmt::Display for UpdateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelHashText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

fn hex_array<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    let text = String::deserialize(d)?;
    let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
    bytes
        .try_into()
        .map_err(|_| serde::de::Error::custom(format!("expected {N} hex bytes")))
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        hex_array(d).map(Self)
    }
}

impl Serialize for UpdateId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for UpdateId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        hex_array(d).map(Self)
    }
}

impl Serialize for ModelHashText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_hex())
    }
}

impl<'de> Deserialize<'de> for ModelHashText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        hex_array(d).map(|a| Self(ModelHash(a)))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod codec_text {
    use fedinspect_common::delta::Codec;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(codec: &Codec, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&codec.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Codec, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}
