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
    #[error("update {id} cannot resume at byte {sent}: the coordinator holds {durable} durable bytes of it; ask UploadStatus and resume at byte {durable}, or send from byte 0")]
    ResumeOffset { id: String, sent: u64, durable: u64 },
    #[error("update {id} was begun with another header (differs in: {fields}); a resumed upload sends the same header with only resume_offset changed, a new update needs a new update id")]
    ResumeHeaderChanged { id: String, fields: String },
    #[error("update {id} is being received on another stream right now; wait a moment, ask UploadStatus and resume")]
    UploadInProgress { id: String },
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
    /// Built by `From<StorageError>` for a storage error that is none of the two below.
    #[error(transparent)]
    Storage(StorageError),
    #[error("the coordinator's disk is full ({0}); nothing of this request was kept, retry later with the same update id; operators: free space under data_dir (docs/operations.md, \"Disk full\")")]
    DiskFull(StorageError),
    #[error("the coordinator's data directory is read-only ({0}); retry later; operators: remount data_dir read-write and restart the coordinator (docs/operations.md, \"Disk full\")")]
    DataReadOnly(StorageError),
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
            ResumeOffset { .. } => "resume_offset",
            ResumeHeaderChanged { .. } => "resume_header_changed",
            UploadInProgress { .. } => "upload_in_progress",
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
            DiskFull(_) => "disk_full",
            DataReadOnly(_) => "data_read_only",
            Internal(_) => "internal",
        }
    }

    /// Whether this is the disk refusing writes: the request may be retried once an operator
    /// fixed it.
    pub fn is_disk_problem(&self) -> bool {
        matches!(self, CoreError::DiskFull(_) | CoreError::DataReadOnly(_))
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

/// A full or read-only disk gets its own variant (and gRPC code); other storage errors stay
/// `Storage`.
impl From<StorageError> for CoreError {
    fn from(e: StorageError) -> Self {
        use crate::storage::DiskProblem;
        match e.disk_problem() {
            Some(DiskProblem::Full) => CoreError::DiskFull(e),
            Some(DiskProblem::ReadOnly) => CoreError::DataReadOnly(e),
            None => CoreError::Storage(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_or_read_only_disk_is_named_as_such() {
        let blob = |code| StorageError::Blob {
            path: "/data/blobs/incoming/x.part".into(),
            source: std::io::Error::from_raw_os_error(code),
        };
        let full = CoreError::from(blob(libc::ENOSPC));
        assert!(matches!(full, CoreError::DiskFull(_)), "{full}");
        assert!(full.to_string().contains("disk is full"), "{full}");
        assert!(
            full.to_string().contains("/data/blobs/incoming/x.part"),
            "{full}"
        );
        let ro = CoreError::from(blob(libc::EROFS));
        assert!(matches!(ro, CoreError::DataReadOnly(_)), "{ro}");
        assert!(ro.to_string().contains("read-only"), "{ro}");
        let other = CoreError::from(blob(libc::EACCES));
        assert!(matches!(other, CoreError::Storage(_)), "{other}");
    }
}
