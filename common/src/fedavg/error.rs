//! The one error type of aggregation: every reason a round's average is refused.

/// Why an aggregation was refused. Plant and tensor are named wherever one is to blame.
#[derive(Debug, thiserror::Error)]
pub enum FedAvgError {
    #[error(
        "no plant updates to aggregate; close the round only after at least one plant reported"
    )]
    NoPlants,
    #[error("every plant reported 0 samples, so the weights sum to zero; skip the round or wait for a plant that trained on data")]
    ZeroTotalWeight,
    #[error("sample counts overflow u64 when adding plant '{plant}' ({num_samples} samples); refuse that plant's sample count as implausible")]
    WeightOverflow { plant: String, num_samples: u64 },
    #[error("plant '{0}' sent two updates in one round; keep one update per plant")]
    DuplicatePlant(String),
    #[error("plant '{plant}' sent no tensor '{tensor}'; an update must hold every tensor of the global model, check the plant's model version")]
    MissingTensor { plant: String, tensor: String },
    #[error("plant '{plant}' sent tensor '{tensor}', which the global model does not have; check the plant's model version")]
    UnexpectedTensor { plant: String, tensor: String },
    #[error("plant '{plant}' listed tensor '{tensor}' twice; its update is corrupt, ask it to send again")]
    DuplicateTensor { plant: String, tensor: String },
    #[error("plant '{plant}' sent tensor '{tensor}' with shape {got:?}, the global model has {expected:?}; check the plant's model version")]
    ShapeMismatch {
        plant: String,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("plant '{plant}' sent a non-finite value (NaN or infinity) in tensor '{tensor}' at index {index}; its training diverged, drop its update")]
    NonFinite {
        plant: String,
        tensor: String,
        index: usize,
    },
    #[error("the global model holds a non-finite value in tensor '{tensor}' at index {index}; restore the last good model version")]
    NonFiniteBase { tensor: String, index: usize },
    #[error("the average overflows float32 in tensor '{tensor}' at index {index}; some plant sent huge deltas, find and drop it")]
    Overflow { tensor: String, index: usize },
    #[error("plant '{plant}' sent values {offset}..{end} of tensor '{tensor}', which has {numel} values; its decoder delivered a corrupt range, discard the plant")]
    OutOfRange {
        plant: String,
        tensor: String,
        offset: usize,
        end: usize,
        numel: usize,
    },
    #[error("plant '{plant}' sent tensor '{tensor}' from offset {offset}, but {expected} values had arrived; deliver each tensor's values in order with no gap or repeat, or discard the plant")]
    OutOfOrder {
        plant: String,
        tensor: String,
        offset: usize,
        expected: usize,
    },
    #[error("plant '{plant}' was committed with tensor '{tensor}' incomplete ({received} of {numel} values); discard the plant instead")]
    Incomplete {
        plant: String,
        tensor: String,
        received: usize,
        numel: usize,
    },
    #[error("plant '{0}' has no open upload; call begin_plant first")]
    NotOpen(String),
    #[error("plant '{0}' is still open; commit or discard it before finishing the round")]
    StillOpen(String),
    #[error("cannot read tensor '{tensor}' of plant '{plant}': {source}; check the stored upload")]
    Read {
        plant: String,
        tensor: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the streaming accumulator could not undo plant '{plant}' and is unusable; aggregate the round with fedavg::aggregate_canonical from the stored uploads")]
    Poisoned { plant: String },
    #[error("the base model given to finish differs from the one given to begin at tensor '{tensor}'; finish with the same base model")]
    BaseChanged { tensor: String },
    #[error("the version the base was aggregated from lacks tensor '{tensor}' or has another shape, so server momentum has no previous step; roll back to a version whose parent has the same architecture, or set server_momentum = 0")]
    PreviousMismatch { tensor: String },
}
