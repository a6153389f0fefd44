//! Helpers shared by the delta test modules: building models, encoding to and decoding from
//! memory, resealing tampered streams, trickling readers and writers, and the error bounds.

use std::io::{self, Read, Write};

use ring::digest;

use super::*;
use crate::model::Tensor;

pub(super) fn model(tensors: &[(&str, &[usize], Vec<f32>)]) -> ModelState {
    let mut m = ModelState::new();
    for (name, shape, data) in tensors {
        m.insert(*name, Tensor::new(shape.to_vec(), data.clone()).unwrap())
            .unwrap();
    }
    m
}

pub(super) fn encode_vec(delta: &ModelState, codec: Codec) -> Vec<u8> {
    let mut out = Vec::new();
    let n = encode(delta, codec, &mut out).unwrap();
    assert_eq!(n, out.len() as u64);
    out
}

pub(super) fn decode_vec(
    bytes: &[u8],
    base: &ModelState,
    expected: Option<Codec>,
) -> Result<ModelState, DeltaError> {
    decode_to_model(bytes, &Layout::of(base), expected)
}

/// Recomputes the trailing checksum after a test altered the bytes before it.
pub(super) fn reseal(bytes: &mut [u8]) {
    let body = bytes.len() - 32;
    let sum = digest::digest(&digest::SHA256, &bytes[..body]);
    bytes[body..].copy_from_slice(sum.as_ref());
}

/// Deterministic pseudo-random values (SplitMix64), roughly N(0, sigma²) via a sum of uniforms.
pub(super) fn noise(n: usize, sigma: f32, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut next = move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (next() + next() + next() + next() - 2.0) * 1.732 * sigma)
        .collect()
}

pub(super) fn bits(m: &ModelState) -> Vec<(String, Vec<u32>)> {
    m.iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.data().iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

/// `|v − v̂|` within the documented f16 bound.
pub(super) fn f16_within_bound(v: f32, d: f32) -> bool {
    let err = (f64::from(v) - f64::from(d)).abs();
    if v.abs() >= 2f32.powi(-14) {
        err <= f64::from(v.abs()) * 2f64.powi(-11)
    } else {
        err <= 2f64.powi(-25)
    }
}

/// Every value of `decoded` within the documented q8 bound of its block in `original`.
pub(super) fn assert_q8_within_bound(original: &ModelState, decoded: &ModelState, block: usize) {
    for ((name, t), (_, d)) in original.iter().zip(decoded.iter()) {
        for (b, (vs, ds)) in t
            .data()
            .chunks(block)
            .zip(d.data().chunks(block))
            .enumerate()
        {
            let a = vs.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
            let bound = a / 254.0 + a * 2f64.powi(-21) + 2f64.powi(-143);
            for (i, (&v, &dv)) in vs.iter().zip(ds).enumerate() {
                let err = (f64::from(v) - f64::from(dv)).abs();
                assert!(
                    err <= bound,
                    "{name} block {b} value {i}: {v} decoded {dv}, error {err} > {bound}"
                );
            }
        }
    }
}

/// A reader that returns 1 to 7 bytes per call.
pub(super) struct Trickle<'a> {
    pub(super) data: &'a [u8],
    pub(super) step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// A writer that accepts 1 to 7 bytes per call.
pub(super) struct TrickleWriter {
    pub(super) out: Vec<u8>,
    pub(super) step: usize,
}

impl Write for TrickleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(buf.len());
        self.out.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) const ALL_CODECS: [Codec; 4] = [
    Codec::F32,
    Codec::F16,
    Codec::Q8 { block: 256 },
    Codec::Q8 { block: 7 },
];
