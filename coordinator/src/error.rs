//! [`CoreError`]: every reason the coordinator refuses a request or fails an operation, one
//! variant each, worded to say what to do. `rpc::status` maps each to its gRPC code.

use fedinspect_common::delta::{Codec, DeltaError};
use fedinspect_common::fedavg::FedAvgError;
use fedinspect_common::model::ModelError;
use fedinspect_common::signing::SigningError;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("protocol version {found} is not supported, this coordinator speaks version {supported}; upgrade the older side")]
    ProtocolVersion { found: u32, supported: u32 },
    #[error("the request is malformed: {0}")]
    Malformed(String),
    #[error(
        "{role} certificates may not call this service; connect with a {expected} certificate"
    )]
    WrongRole {
        role: &'static str,
        expected: &'static str,
    },
    #[error("no peer certificate identifies the caller ({0}); connect with the certificate fedinspect-certs issued")]
    Unauthenticated(String),
    #[error("plant '{plant}' was revoked ({reason}); ask the operator to enrol it again")]
    Revoked { plant: String, reason: String },
    #[error("plant '{plant}' presented another update-signing key than the one pinned at its first registration; a plant's key changes only when the operator releases it (`coordinator admin release-key {plant}`, after re-enrolling the plant)")]
    PlantKeyChanged { plant: String },
    #[error("plant '{0}' is not registered; call Register first")]
    NotRegistered(String),
    #[error("no plant '{0}' ever registered; list plants with `coordinator admin plants`")]
    UnknownPlant(String),
    #[error("no round is open; wait for the next train task")]
    NoRoundOpen,
    #[error("the update is for round {sent} but round {open} is open; train on the task of round {open}")]
    WrongRound { sent: u64, open: u64 },
    #[error("the update was trained from version {sent} but round {round} trains from version {expected}; download version {expected} and train again")]
    StaleBase {
        sent: u64,
        expected: u64,
        round: u64,
    },
    #[error("the update's base hash does not match version {version}; download version {version} again, it was altered or corrupted")]
    BaseHashMismatch { version: u64 },
    #[error("the update is encoded with {found} but round {round} asks for {expected}; encode the delta with {expected}")]
    WrongCodec {
        found: &'static str,
        expected: Codec,
        round: u64,
    },
    #[error("plant '{plant}' already sent update {existing} for round {round}; one update per plant and round is counted")]
    AlreadyContributed {
        plant: String,
        round: u64,
        existing: String,
    },
    #[error("the update's plant signature does not verify with the key plant '{plant}' registered ({reason}); sign the update manifest with the plant's registered key")]
    PlantSignature { plant: String, reason: String },
    #[error("update id {id} was used by another plant; choose 16 fresh random bytes per update")]
    UpdateIdTaken { id: String },
    #[error("the update claims {found} samples, over the limit of {limit} per plant; report the size of the training split")]
    TooManySamples { found: u64, limit: u64 },
    #[error(
        "the update claims 0 samples; an update must come from training on at least one sample"
    )]
    ZeroSamples,
    #[error("the payload of {found} bytes is over the limit of {limit} bytes; use a smaller codec (q8) or ask the operator to raise limits.max_update_bytes")]
    PayloadTooLarge { found: u64, limit: u64 },
    #[error("the header announces {declared} payload bytes but a delta of this model with {codec} has exactly {expected}; encode the delta of the round's base model")]
    PayloadLength {
        declared: u64,
        expected: u64,
        codec: Codec,
    },
    #[error("resuming an upload at byte {0} is not supported; this coordinator keeps no partial uploads, send the update again from byte 0")]
    ResumeUnsupported(u64),
    #[error("a chunk starts at byte {offset} but {expected} bytes were received; send the chunks in order without gaps")]
    ChunkOutOfOrder { offset: u64, expected: u64 },
    #[error("a chunk of {0} bytes is over the 1 MiB chunk limit; split the payload into chunks of at most 1 MiB")]
    ChunkTooLarge(usize),
    #[error("the stream carries more than the {declared} payload bytes its header announced; send exactly payload_bytes bytes")]
    PayloadOverrun { declared: u64 },
    #[error("the upload ended after {got} of {expected} payload bytes; the stream was cut off, send the update again")]
    Truncated { got: u64, expected: u64 },
    #[error("the payload's SHA-256 is {found}, the header announced {declared}; the data was corrupted in transit, send the update again")]
    PayloadDigest { declared: String, found: String },
    #[error("the delta was refused: {0}")]
    BadDelta(#[source] DeltaError),
    #[error("the delta's L2 norm {norm:.6} exceeds the bound {bound}; lower the learning rate or the local epochs, or clip the delta before sending")]
    NormExceeded { norm: f64, bound: f64 },
    #[error("round {round} closed before the update was stored; wait for the next train task")]
    RoundClosed { round: u64 },
    #[error(
        "plant '{plant}' is not among the plants sampled for round {round}; wait for a train task"
    )]
    NotSampled { plant: String, round: u64 },
    #[error("round {0} does not exist; list rounds with `coordinator admin rounds`")]
    UnknownRound(u64),
    #[error("model version {0} does not exist; list versions with `coordinator admin models`")]
    UnknownVersion(u64),
    #[error("no model version is stored yet; run `coordinator init-model --from <checkpoint.safetensors>` first")]
    NoModel,
    #[error("a model version already exists (latest {0}); init-model only initialises an empty coordinator")]
    AlreadyInitialised(u64),
    #[error("{0}")]
    AdminRefused(String),
    #[error("the model is unusable: {0}")]
    Model(#[from] ModelError),
    #[error("aggregation failed: {0}")]
    Aggregation(#[from] FedAvgError),
    #[error("signing failed: {0}")]
    Signing(#[from] SigningError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    /// A short stable name of the variant, for metric labels (`reason="stale_base"`).
    pub fn reason(&self) -> &'static str {
        use CoreError::*;
        match self {
            ProtocolVersion { .. } => "protocol_version",
            Malformed(_) => "malformed",
            WrongRole { .. } => "wrong_role",
            Unauthenticated(_) => "unauthenticated",
            Revoked { .. } => "revoked",
            PlantKeyChanged { .. } => "plant_key_changed",
            NotRegistered(_) => "not_registered",
            UnknownPlant(_) => "unknown_plant",
            NoRoundOpen => "no_round_open",
            WrongRound { .. } => "wrong_round",
            StaleBase { .. } => "stale_base",
            BaseHashMismatch { .. } => "base_hash_mismatch",
            WrongCodec { .. } => "wrong_codec",
            AlreadyContributed { .. } => "already_contributed",
            PlantSignature { .. } => "plant_signature",
            UpdateIdTaken { .. } => "update_id_taken",
            TooManySamples { .. } => "too_many_samples",
            ZeroSamples => "zero_samples",
            PayloadTooLarge { .. } => "payload_too_large",
            PayloadLength { .. } => "payload_length",
            ResumeUnsupported(_) => "resume_unsupported",
            ChunkOutOfOrder { .. } => "chunk_out_of_order",
            ChunkTooLarge(_) => "chunk_too_large",
            PayloadOverrun { .. } => "payload_overrun",
            Truncated { .. } => "truncated",
            PayloadDigest { .. } => "payload_digest",
            BadDelta(_) => "bad_delta",
            NormExceeded { .. } => "norm_exceeded",
            RoundClosed { .. } => "round_closed",
            NotSampled { .. } => "not_sampled",
            UnknownRound(_) => "unknown_round",
            UnknownVersion(_) => "unknown_version",
            NoModel => "no_model",
            AlreadyInitialised(_) => "already_initialised",
            AdminRefused(_) => "admin_refused",
            Model(_) => "model",
            Aggregation(_) => "aggregation",
            Signing(_) => "signing",
            Storage(_) => "storage",
            Internal(_) => "internal",
        }
    }

    /// A delta error from the decoder: a cut-off stream and a bad checksum are data loss,
    /// everything else a bad delta.
    pub fn from_delta(e: DeltaError) -> Self {
        match e {
            DeltaError::Truncated { got, expected } => CoreError::Truncated { got, expected },
            other => CoreError::BadDelta(other),
        }
    }
}
