//! Weight deltas (local − base, per tensor) and their streamed, checksummed wire codecs.
//!
//! A plant client trains from the global model `base` and sends `delta = local − base`
//! ([`compute_delta`]); whoever holds `base` gets `local` back with [`apply_delta`]. Names and
//! shapes must match exactly; every kind of mismatch is its own [`DeltaError`].
//!
//! # Codecs and their worst-case error
//!
//! For an input value `v` and its decoded value `v̂`, per element:
//!
//! | codec | bytes per value | worst case |
//! |---|---|---|
//! | [`Codec::F32`] | 4 | exact, bit for bit (including `-0.0` and subnormals) |
//! | [`Codec::F16`] | 2 | `\|v − v̂\| ≤ 2^-11·\|v\|` for `\|v\| ≥ 2^-14`, `\|v − v̂\| ≤ 2^-25` below; `\|v\| > 65504` is refused |
//! | [`Codec::Q8`] | 1 + 4/block | `\|v − v̂\| ≤ a/254 + a·2^-21 + 2^-143`, `a` = largest `\|v\|` in `v`'s block |
//!
//! * `f16` is IEEE binary16 rounded to nearest, ties to even (the `half` crate). A value that
//!   does not fit (`|v| > 65504`) is refused with [`DeltaError::F16OutOfRange`] rather than
//!   saturated: send that delta with `f32`.
//! * `q8` cuts each tensor into blocks of `block` values (default [`DEFAULT_Q8_BLOCK`], the
//!   last block of a tensor may be shorter). Per block it stores the scale `a` (the block's
//!   absolute maximum) as f32 and per value the int8 code `q = round(v/a·127)` (ties to even,
//!   clamped to ±127); it decodes `v̂ = q·(a/127)`, clamped to `±a`. Rounding costs at most
//!   half a step, `a/254`; the `a·2^-21` term covers f32 rounding of the scale arithmetic and
//!   `2^-143` only matters when `a` is subnormal (< 2^-126). An all-zero block decodes to zeros.
//!
//! Encoders refuse NaN and infinity ([`DeltaError::NonFinite`]); decoders refuse them too.
//!
//! # Error feedback
//!
//! [`roundtrip`] returns exactly what the coordinator will decode (bit for bit the same as
//! [`decode_to_model`] of [`encode`]'s bytes), so a client keeps the residual
//! `compute_delta(&sent_delta, &roundtrip(codec, &sent_delta)?)` and adds it to the next round's
//! delta.
//!
//! # Wire format, version 1
//!
//! All integers little-endian. The header repeats the layout (names and shapes) so that the
//! decoder can check it against the base model before it reads any value.
//!
//! | field | bytes | content |
//! |---|---|---|
//! | magic | 8 | `FIDELTA\0` ([`MAGIC`]) |
//! | version | 2 | u16, [`FORMAT_VERSION`] |
//! | codec | 1 | u8: 1 = f32, 2 = f16, 3 = q8 |
//! | q8 block | 4 | u32, values per scale, in `1..=`[`MAX_Q8_BLOCK`]; present only for q8 |
//! | tensor count | 4 | u32, at most [`MAX_TENSORS`] |
//! | per tensor, in canonical (name) order: | | |
//! | · name length | 2 | u16, `1..=`[`MAX_NAME_LEN`] |
//! | · name | n | UTF-8 |
//! | · rank | 1 | u8, at most [`MAX_RANK`] (0 is a scalar) |
//! | · dims | 8·rank | u64 each; all tensors together hold at most [`MAX_TOTAL_VALUES`] values |
//! | payload, per tensor in the same order | | f32: 4 bytes per value; f16: 2 bytes per value; q8: per block the scale (f32) then one i8 code per value |
//! | checksum | 32 | SHA-256 of every byte before it |
//!
//! Nothing follows the checksum. [`encoded_len`] gives a stream's exact length from the layout,
//! so a server can refuse oversized uploads before reading them. The decoder never allocates
//! from a length in the header: names are read into a buffer bounded by [`MAX_NAME_LEN`] and
//! values into fixed chunks, while the sizes it trusts come from the caller's base layout.
//!
//! # Streaming
//!
//! [`encode`] writes to any [`std::io::Write`] chunk by chunk (f32 values go out without a
//! copy); [`decode`] reads any [`std::io::Read`] in chunks of at most 64 Ki values and hands
//! each chunk to a [`DeltaSink`], so the coordinator can accumulate FedAvg while bytes arrive
//! and never holds the decoded delta. The sink sees values *before* the trailing checksum has
//! been verified: when [`decode`] returns an error the sink's data must be thrown away.

mod codec;
mod decode;
mod encode;
#[cfg(test)]
mod error_tests;
mod format;
#[cfg(test)]
mod prehashed_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

pub use codec::{roundtrip, Codec, DEFAULT_Q8_BLOCK, MAX_Q8_BLOCK};
pub use decode::{decode, decode_prehashed, decode_to_model, DeltaSink, PrehashedRead};
pub use encode::{encode, encode_with_sha256};
pub use format::{
    encoded_len, Layout, CHECKSUM_LEN, FORMAT_VERSION, MAGIC, MAX_NAME_LEN, MAX_RANK, MAX_TENSORS,
    MAX_TOTAL_VALUES,
};

use crate::model::ModelState;

// Sizes move between usize, u32 and u64 with `as` in this module; that is lossless only
// because usize is 32 or 64 bits wide, which this assertion pins.
const _: () = assert!(usize::BITS >= 32 && usize::BITS <= 64);

/// Everything that can go wrong computing, applying, encoding or decoding a delta.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("tensor '{name}' of the base model is missing from the update; both must come from the same model architecture, resync the client with the current global model")]
    MissingTensor { name: String },
    #[error("tensor '{name}' is not in the base model; both must come from the same model architecture, resync the client with the current global model")]
    UnexpectedTensor { name: String },
    #[error("tensor '{name}' has shape {found:?} but the base model has {expected:?}; both must come from the same model architecture, resync the client with the current global model")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("the delta holds {found} tensors but the base model has {expected}; the client trained another architecture, resync it with the current global model")]
    TensorCountMismatch { expected: usize, found: u64 },
    #[error("tensor {index} of the delta is '{found}' but the base model has '{expected}' there; the client trained another architecture, resync it with the current global model")]
    TensorNameMismatch {
        index: usize,
        expected: String,
        found: String,
    },
    #[error("tensor '{name}' holds a non-finite value (NaN or infinity) at index {index}; training diverged or the data is corrupt, do not use this update")]
    NonFinite { name: String, index: usize },
    #[error("tensor '{name}' holds {value} at index {index}, outside the f16 range of ±65504; send this delta with the f32 codec")]
    F16OutOfRange {
        name: String,
        index: usize,
        value: f32,
    },
    #[error("q8 block size {block} is outside 1..={max}; configure a block size in that range (the default is 256)", max = MAX_Q8_BLOCK)]
    BadBlockSize { block: u32 },
    #[error("'{0}' is not a delta codec; use f32, f16, q8 or q8:<block size>")]
    UnknownCodecName(String),
    #[error("the delta has {found} {what}, over the format limit of {limit}; it was not written by a fedinspect client, or the model is too large for this format")]
    LimitExceeded {
        what: &'static str,
        found: u64,
        limit: u64,
    },
    #[error("this is not a fedinspect delta stream (bad magic bytes); check that the sender is a fedinspect client")]
    BadMagic,
    #[error("delta format version {found} is not supported, this build reads version {supported}; upgrade the older of client and coordinator")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("delta codec id {0} is unknown; upgrade the coordinator or configure the client with f32, f16 or q8")]
    UnknownCodec(u8),
    #[error("the delta is encoded with {found} but this round expects {expected}; configure the client with codec {expected}")]
    CodecMismatch { expected: Codec, found: Codec },
    #[error("the delta stream ended after {got} bytes, {expected} were expected; the upload was cut off, send it again")]
    Truncated { got: u64, expected: u64 },
    #[error("the delta stream goes on after its checksum at byte {after}; send exactly one encoded delta per stream")]
    TrailingBytes { after: u64 },
    #[error("tensor '{name}' block {block} has q8 scale {scale}, which must be finite and non-negative; the sender's encoder is broken or the data was altered, re-encode the delta")]
    BadScale {
        name: String,
        block: usize,
        scale: f32,
    },
    #[error("tensor '{name}' has the q8 code -128 at index {index}, which encoders never write; the sender's encoder is broken or the data was altered, re-encode the delta")]
    Q8CodeOutOfRange { name: String, index: usize },
    #[error("the delta checksum does not match its contents; the data was corrupted in transit, send it again")]
    ChecksumMismatch,
    #[error("cannot read or write the delta stream ({0}); check the connection or the disk and try again")]
    Io(#[from] std::io::Error),
}

/// `local − base`, tensor by tensor; names and shapes must match exactly and every result
/// must be finite.
pub fn compute_delta(local: &ModelState, base: &ModelState) -> Result<ModelState, DeltaError> {
    combine(base, local, |l, b| l - b)
}

/// `base + delta`, tensor by tensor; names and shapes must match exactly and every result
/// must be finite.
pub fn apply_delta(base: &ModelState, delta: &ModelState) -> Result<ModelState, DeltaError> {
    combine(base, delta, |d, b| d + b)
}

/// Checks that `other` has exactly `base`'s names and shapes, then returns
/// `op(other[i], base[i])` for every value.
fn combine(
    base: &ModelState,
    other: &ModelState,
    op: impl Fn(f32, f32) -> f32,
) -> Result<ModelState, DeltaError> {
    check_same_layout(base, other)?;
    let mut out = other.clone();
    for (name, t) in out.iter_mut() {
        let b = base.get(name).ok_or_else(|| DeltaError::UnexpectedTensor {
            name: name.to_string(),
        })?;
        for (x, &y) in t.data_mut().iter_mut().zip(b.data()) {
            *x = op(*x, y);
        }
        if let Some(index) = codec::first_non_finite(t.data()) {
            return Err(DeltaError::NonFinite {
                name: name.to_string(),
                index,
            });
        }
    }
    Ok(out)
}

fn check_same_layout(base: &ModelState, other: &ModelState) -> Result<(), DeltaError> {
    for (name, b) in base.iter() {
        let Some(t) = other.get(name) else {
            return Err(DeltaError::MissingTensor {
                name: name.to_string(),
            });
        };
        if t.shape() != b.shape() {
            return Err(DeltaError::ShapeMismatch {
                name: name.to_string(),
                expected: b.shape().to_vec(),
                found: t.shape().to_vec(),
            });
        }
    }
    match other.names().find(|n| base.get(n).is_none()) {
        Some(name) => Err(DeltaError::UnexpectedTensor {
            name: name.to_string(),
        }),
        None => Ok(()),
    }
}
