//! The delta wire format's constants and hard limits, the tensor layout (names and shapes) a
//! stream carries, and a stream's exact length.

use super::codec::Codec;
use super::DeltaError;
use crate::model::ModelState;

/// The first 8 bytes of every delta stream.
pub const MAGIC: [u8; 8] = *b"FIDELTA\0";
/// The wire format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// At most this many tensors per delta.
pub const MAX_TENSORS: usize = 1 << 16;
/// At most this many bytes per tensor name.
pub const MAX_NAME_LEN: usize = 1024;
/// At most this many dimensions per tensor.
pub const MAX_RANK: usize = 8;
/// At most this many values in all tensors together (16 GiB as f32).
pub const MAX_TOTAL_VALUES: u64 = 1 << 32;
/// Bytes of the trailing SHA-256.
pub const CHECKSUM_LEN: usize = 32;

/// The names and shapes of a model's tensors in canonical order: what a delta stream must
/// match. Build it from the base model with [`Layout::of`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<LayoutTensor>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LayoutTensor {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) numel: usize,
}

impl Layout {
    /// The layout of `model`.
    pub fn of(model: &ModelState) -> Self {
        let tensors = model
            .iter()
            .map(|(name, t)| LayoutTensor {
                name: name.to_string(),
                shape: t.shape().to_vec(),
                numel: t.numel(),
            })
            .collect();
        Self { tensors }
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of values.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|t| t.numel).sum()
    }

    /// (name, shape) in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
    }

    pub(super) fn tensors(&self) -> &[LayoutTensor] {
        &self.tensors
    }

    /// Refuses a layout the format cannot carry.
    pub(super) fn check_limits(&self) -> Result<(), DeltaError> {
        check_limit("tensors", self.tensors.len() as u64, MAX_TENSORS as u64)?;
        for t in &self.tensors {
            check_limit(
                "bytes in a tensor name",
                t.name.len() as u64,
                MAX_NAME_LEN as u64,
            )?;
            check_limit(
                "dimensions in a tensor",
                t.shape.len() as u64,
                MAX_RANK as u64,
            )?;
        }
        check_limit("values", self.num_params() as u64, MAX_TOTAL_VALUES)
    }
}

impl From<&ModelState> for Layout {
    fn from(model: &ModelState) -> Self {
        Self::of(model)
    }
}

pub(super) fn check_limit(what: &'static str, found: u64, limit: u64) -> Result<(), DeltaError> {
    if found > limit {
        return Err(DeltaError::LimitExceeded { what, found, limit });
    }
    Ok(())
}

/// The exact length in bytes of a delta with this layout encoded with `codec`.
pub fn encoded_len(layout: &Layout, codec: Codec) -> u64 {
    let tensors: u64 = layout
        .tensors
        .iter()
        .map(|t| tensor_header_len(t.name.len(), t.shape.len()) + codec.payload_len(t.numel as u64))
        .sum();
    prefix_len(codec) + tensors + CHECKSUM_LEN as u64
}

/// Magic, version, codec, q8 block and tensor count.
pub(super) fn prefix_len(codec: Codec) -> u64 {
    let block = match codec {
        Codec::Q8 { .. } => 4,
        Codec::F32 | Codec::F16 => 0,
    };
    8 + 2 + 1 + block + 4
}

/// Name length, name, rank and dims of one tensor.
fn tensor_header_len(name_len: usize, rank: usize) -> u64 {
    2 + name_len as u64 + 1 + 8 * rank as u64
}
