//! The value codecs (f32, f16, blockwise q8): their names, and the chunk kernels that turn f32
//! values into payload bytes and back, shared by the encoder, the decoder and [`roundtrip`].

use std::fmt;
use std::str::FromStr;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::format::Layout;
use super::DeltaError;
use crate::model::ModelState;

/// The q8 block size used when none is configured.
pub const DEFAULT_Q8_BLOCK: u32 = 256;
/// The largest q8 block size the format accepts.
pub const MAX_Q8_BLOCK: u32 = 1 << 16;

/// Values per chunk for f32 and f16 (q8 rounds it to whole blocks).
const CHUNK_VALUES: usize = 1 << 16;
/// Values converted at a time through a stack buffer of f16.
const HALF_BATCH: usize = 1024;
/// Bits of `|x|` for the largest finite f32 and f16; `|x|` bits above them are out of range.
const F32_MAX_BITS: u32 = 0x7f7f_ffff;
const F16_MAX_BITS: u32 = 0x477f_e000; // 65504.0
const ABS_MASK: u32 = 0x7fff_ffff;
/// Adding 1.5·2^23 to `x` with `|x| < 2^22` rounds it to an integer (ties to even) that then
/// sits in the low mantissa bits, as two's complement: the low byte is the i8 code.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// How delta values travel on the wire; see the [module docs](super) for the error bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Little-endian IEEE f32: exact.
    F32,
    /// Little-endian IEEE binary16, round to nearest even; refuses `|v| > 65504`.
    F16,
    /// Blockwise absmax int8: per `block` values one f32 scale and one i8 code per value.
    Q8 { block: u32 },
}

impl Codec {
    /// q8 with the default block size.
    pub const fn q8() -> Self {
        Codec::Q8 {
            block: DEFAULT_Q8_BLOCK,
        }
    }

    /// Refuses a q8 block size outside `1..=MAX_Q8_BLOCK`.
    pub fn validate(self) -> Result<Self, DeltaError> {
        match self {
            Codec::Q8 { block } if !(1..=MAX_Q8_BLOCK).contains(&block) => {
                Err(DeltaError::BadBlockSize { block })
            }
            codec => Ok(codec),
        }
    }

    /// The codec byte of the wire format.
    pub(super) fn id(self) -> u8 {
        match self {
            Codec::F32 => 1,
            Codec::F16 => 2,
            Codec::Q8 { .. } => 3,
        }
    }

    /// Values handled per chunk: about 64 Ki, a whole number of q8 blocks.
    pub(super) fn chunk_values(self) -> usize {
        match self {
            Codec::Q8 { block } => {
                let block = block as usize;
                block * (CHUNK_VALUES / block).max(1)
            }
            Codec::F32 | Codec::F16 => CHUNK_VALUES,
        }
    }

    /// Payload bytes of `n` consecutive values of one tensor, starting at a block boundary.
    pub(super) fn payload_len(self, n: u64) -> u64 {
        match self {
            Codec::F32 => 4 * n,
            Codec::F16 => 2 * n,
            Codec::Q8 { block } => n + 4 * n.div_ceil(u64::from(block)),
        }
    }

    /// [`Codec::payload_len`] of one chunk.
    pub(super) fn chunk_len(self, n: usize) -> usize {
        self.payload_len(n as u64) as usize
    }

    fn block_len(self) -> usize {
        match self {
            Codec::Q8 { block } => block as usize,
            Codec::F32 | Codec::F16 => 1,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::F32 => f.write_str("f32"),
            Codec::F16 => f.write_str("f16"),
            Codec::Q8 { block } => write!(f, "q8:{block}"),
        }
    }
}

/// Parses `f32`, `f16`, `q8` (default block) or `q8:<block size>`, as config files write it.
impl FromStr for Codec {
    type Err = DeltaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DeltaError::UnknownCodecName(s.to_string());
        match s.trim() {
            "f32" => Ok(Codec::F32),
            "f16" => Ok(Codec::F16),
            "q8" => Ok(Codec::q8()),
            other => {
                let block = other.strip_prefix("q8:").ok_or_else(unknown)?;
                let block = block.parse::<u32>().map_err(|_| unknown())?;
                Codec::Q8 { block }.validate()
            }
        }
    }
}

/// What went wrong inside one chunk; indices count from the chunk's first value (block).
#[derive(Debug)]
pub(super) enum Fault {
    NonFinite(usize),
    F16Range(usize, f32),
    BadScale(usize, f32),
    Q8Code(usize),
}

impl Fault {
    /// The error for a chunk of tensor `name` that starts at value `offset`.
    pub(super) fn at(self, name: &str, offset: usize, codec: Codec) -> DeltaError {
        let name = name.to_string();
        match self {
            Fault::NonFinite(i) => DeltaError::NonFinite {
                name,
                index: offset + i,
            },
            Fault::F16Range(i, value) => DeltaError::F16OutOfRange {
                name,
                index: offset + i,
                value,
            },
            Fault::BadScale(b, scale) => DeltaError::BadScale {
                name,
                block: offset / codec.block_len() + b,
                scale,
            },
            Fault::Q8Code(i) => DeltaError::Q8CodeOutOfRange {
                name,
                index: offset + i,
            },
        }
    }
}

/// Encodes `src` into exactly `codec.chunk_len(src.len())` bytes of `dst`.
pub(super) fn encode_chunk(codec: Codec, src: &[f32], dst: &mut [u8]) -> Result<(), Fault> {
    match codec {
        Codec::F32 => {
            check_finite(src)?;
            for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        Codec::F16 => encode_f16(src, dst)?,
        Codec::Q8 { block } => encode_q8(src, dst, block as usize)?,
    }
    Ok(())
}

/// Decodes `codec.chunk_len(dst.len())` bytes of `src` into `dst`.
pub(super) fn decode_chunk(codec: Codec, src: &[u8], dst: &mut [f32]) -> Result<(), Fault> {
    match codec {
        Codec::F32 => {
            for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            check_finite(dst)
        }
        Codec::F16 => {
            let mut halves = [f16::ZERO; HALF_BATCH];
            for (d, s) in dst.chunks_mut(HALF_BATCH).zip(src.chunks(2 * HALF_BATCH)) {
                let halves = &mut halves[..d.len()];
                for (h, b) in halves.iter_mut().zip(s.chunks_exact(2)) {
                    *h = f16::from_le_bytes([b[0], b[1]]);
                }
                halves.convert_to_f32_slice(d);
            }
            check_finite(dst)
        }
        Codec::Q8 { block } => decode_q8(src, dst, block as usize),
    }
}

/// What the decoder will make of `delta` encoded with `codec`, bit for bit; refuses what
/// [`super::encode`] refuses. Use it to keep an error-feedback residual.
pub fn roundtrip(codec: Codec, delta: &ModelState) -> Result<ModelState, DeltaError> {
    let codec = codec.validate()?;
    Layout::of(delta).check_limits()?;
    if codec == Codec::F32 {
        // Exact: only the encoder's refusal of non-finite values is left to reproduce.
        for (name, t) in delta.iter() {
            if let Some(index) = first_non_finite(t.data()) {
                return Err(DeltaError::NonFinite {
                    name: name.to_string(),
                    index,
                });
            }
        }
        return Ok(delta.clone());
    }
    let chunk = codec.chunk_values();
    let mut bytes = vec![0u8; codec.chunk_len(chunk)];
    let mut out = delta.clone();
    for (name, t) in out.iter_mut() {
        for (i, values) in t.data_mut().chunks_mut(chunk).enumerate() {
            let bytes = &mut bytes[..codec.chunk_len(values.len())];
            encode_chunk(codec, values, bytes)
                .and_then(|()| decode_chunk(codec, bytes, values))
                .map_err(|fault| fault.at(name, i * chunk, codec))?;
        }
    }
    Ok(out)
}

/// The index of the first NaN or infinity in `values`.
pub(super) fn first_non_finite(values: &[f32]) -> Option<usize> {
    first_abs_above(values, F32_MAX_BITS)
}

fn check_finite(values: &[f32]) -> Result<(), Fault> {
    first_non_finite(values).map_or(Ok(()), |i| Err(Fault::NonFinite(i)))
}

/// The largest `|x|` as bits; for finite values the bit order is the numeric order, and a
/// result above [`F32_MAX_BITS`] means a NaN or infinity. An integer max vectorises.
fn max_abs_bits(values: &[f32]) -> u32 {
    values.iter().fold(0, |m, x| m.max(x.to_bits() & ABS_MASK))
}

fn first_abs_above(values: &[f32], limit_bits: u32) -> Option<usize> {
    if max_abs_bits(values) <= limit_bits {
        return None;
    }
    values
        .iter()
        .position(|x| x.to_bits() & ABS_MASK > limit_bits)
}

fn encode_f16(src: &[f32], dst: &mut [u8]) -> Result<(), Fault> {
    if let Some(i) = first_abs_above(src, F16_MAX_BITS) {
        return Err(if src[i].is_finite() {
            Fault::F16Range(i, src[i])
        } else {
            Fault::NonFinite(i)
        });
    }
    let mut halves = [f16::ZERO; HALF_BATCH];
    for (s, d) in src.chunks(HALF_BATCH).zip(dst.chunks_mut(2 * HALF_BATCH)) {
        let halves = &mut halves[..s.len()];
        halves.convert_from_f32_slice(s);
        for (b, h) in d.chunks_exact_mut(2).zip(halves.iter()) {
            b.copy_from_slice(&h.to_le_bytes());
        }
    }
    Ok(())
}

fn encode_q8(src: &[f32], dst: &mut [u8], block: usize) -> Result<(), Fault> {
    for (b, (s, d)) in src.chunks(block).zip(dst.chunks_mut(block + 4)).enumerate() {
        let absmax = max_abs_bits(s);
        if absmax > F32_MAX_BITS {
            let i = s.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(Fault::NonFinite(b * block + i));
        }
        let scale = f32::from_bits(absmax);
        let (scale_bytes, codes) = d.split_at_mut(4);
        scale_bytes.copy_from_slice(&scale.to_le_bytes());
        quantize(s, scale, codes);
    }
    Ok(())
}

/// `codes[i] = round(src[i] / scale · 127)` as i8 bytes, with `scale = max |src|`.
fn quantize(src: &[f32], scale: f32, codes: &mut [u8]) {
    let code = |x: f32| (x.clamp(-127.0, 127.0) + ROUND_MAGIC).to_bits() as u8;
    let inv = 127.0 / scale;
    if scale == 0.0 {
        codes.fill(0);
    } else if inv.is_finite() {
        for (c, &v) in codes.iter_mut().zip(src) {
            *c = code(v * inv);
        }
    } else {
        // A subnormal scale: 127/scale overflows, so divide per value.
        for (c, &v) in codes.iter_mut().zip(src) {
            *c = code(v / scale * 127.0);
        }
    }
}

fn decode_q8(src: &[u8], dst: &mut [f32], block: usize) -> Result<(), Fault> {
    for (b, (s, d)) in src.chunks(block + 4).zip(dst.chunks_mut(block)).enumerate() {
        let (scale_bytes, codes) = s.split_at(4);
        let scale = f32::from_le_bytes([
            scale_bytes[0],
            scale_bytes[1],
            scale_bytes[2],
            scale_bytes[3],
        ]);
        if !scale.is_finite() || scale.is_sign_negative() {
            return Err(Fault::BadScale(b, scale));
        }
        if codes.iter().fold(false, |bad, &c| bad | (c == 0x80)) {
            let i = codes.iter().position(|&c| c == 0x80).unwrap_or(0);
            return Err(Fault::Q8Code(b * block + i));
        }
        let step = scale / 127.0;
        for (v, &c) in d.iter_mut().zip(codes) {
            // The clamp only bites for scales near f32::MAX, where 127·step can round past it.
            *v = (f32::from(i8::from_le_bytes([c])) * step)
                .max(-scale)
                .min(scale);
        }
    }
    Ok(())
}
