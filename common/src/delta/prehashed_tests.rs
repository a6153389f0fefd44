//! One SHA-256 pass per side: [`decode_prehashed`] with a reader that hashes what it yields,
//! as the coordinator's intake does, gives the same values and the same refusals as
//! [`decode`], which hashes itself; [`encode_with_sha256`] gives the stream's SHA-256 with
//! the bytes of [`encode`].

use std::io::{self, Read};

use ring::digest;

use super::test_util::*;
use super::*;

/// Yields `bytes` in `step`-byte reads, hashing as it goes and keeping the hash state at
/// `snapshot_at` bytes, like the intake's blob writer.
struct HashingReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    step: usize,
    hash: digest::Context,
    snapshot_at: u64,
    snapshot: Option<[u8; 32]>,
}

impl<'a> HashingReader<'a> {
    fn new(bytes: &'a [u8], step: usize, snapshot_at: u64) -> Self {
        Self {
            bytes,
            pos: 0,
            step,
            hash: digest::Context::new(&digest::SHA256),
            snapshot_at,
            snapshot: None,
        }
    }

    fn advance(&mut self, n: usize) {
        let before = self.pos as u64;
        let end = before + n as u64;
        if before < self.snapshot_at && self.snapshot_at <= end {
            let k = (self.snapshot_at - before) as usize;
            self.hash.update(&self.bytes[self.pos..self.pos + k]);
            let d = self.hash.clone().finish();
            self.snapshot = Some(d.as_ref().try_into().unwrap());
            self.hash.update(&self.bytes[self.pos + k..self.pos + n]);
        } else {
            self.hash.update(&self.bytes[self.pos..self.pos + n]);
        }
        self.pos += n;
    }
}

impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.step).min(self.bytes.len() - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.advance(n);
        Ok(n)
    }
}

impl PrehashedRead for HashingReader<'_> {
    fn sha256_of_first(&self, len: u64) -> Option<[u8; 32]> {
        self.snapshot.filter(|_| len == self.snapshot_at)
    }
}

fn sample() -> ModelState {
    model(&[
        ("conv.weight", &[4, 3, 3, 3], noise(108, 1e-3, 1)),
        ("fc.weight", &[10, 300], noise(3000, 1e-2, 2)),
        ("scalar", &[], vec![-3.0]),
    ])
}

fn body_len(bytes: &[u8]) -> u64 {
    (bytes.len() - CHECKSUM_LEN) as u64
}

fn prehashed(bytes: &[u8], step: usize, snapshot_at: u64) -> Result<ModelState, DeltaError> {
    let base = sample();
    let mut sink = Values(Vec::new());
    let reader = HashingReader::new(bytes, step, snapshot_at);
    decode_prehashed(reader, &Layout::of(&base), None, &mut sink)?;
    let mut out = base.clone();
    let mut values = sink.0.into_iter();
    for (_, t) in out.iter_mut() {
        for v in t.data_mut() {
            *v = values.next().unwrap();
        }
    }
    Ok(out)
}

struct Values(Vec<f32>);

impl DeltaSink for Values {
    fn values(&mut self, _name: &str, _offset: usize, values: &[f32]) {
        self.0.extend_from_slice(values);
    }
}

#[test]
fn gives_what_decode_gives_for_every_codec_and_read_size() {
    for codec in [Codec::F32, Codec::F16, Codec::Q8 { block: 7 }] {
        let bytes = encode_vec(&sample(), codec);
        let hashed_here = decode_vec(&bytes, &sample(), None).unwrap();
        for step in [1, 13, 4096, bytes.len()] {
            let got = prehashed(&bytes, step, body_len(&bytes)).unwrap();
            assert_eq!(bits(&got), bits(&hashed_here), "{codec} in reads of {step}");
        }
    }
}

#[test]
fn a_changed_body_or_checksum_is_a_checksum_mismatch() {
    let bytes = encode_vec(&sample(), Codec::F32);
    let body = body_len(&bytes) as usize;
    for at in [body - 1, body, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 1; // last value's low bit (still finite), or the checksum
        assert!(
            matches!(
                prehashed(&bad, 1000, body as u64),
                Err(DeltaError::ChecksumMismatch)
            ),
            "byte {at}"
        );
        assert!(matches!(
            decode_vec(&bad, &sample(), None),
            Err(DeltaError::ChecksumMismatch)
        ));
    }
}

#[test]
fn a_reader_without_the_body_hash_fails_instead_of_passing() {
    let bytes = encode_vec(&sample(), Codec::F16);
    let e = prehashed(&bytes, 1000, body_len(&bytes) - 1).unwrap_err();
    assert!(
        matches!(e, DeltaError::Io(ref io) if io.to_string().contains("kept no SHA-256")),
        "{e}"
    );
}

#[test]
fn truncation_and_trailing_bytes_are_refused_as_by_decode() {
    let bytes = encode_vec(&sample(), Codec::F32);
    let short = &bytes[..bytes.len() - 5];
    assert!(matches!(
        prehashed(short, 1000, body_len(&bytes)),
        Err(DeltaError::Truncated { .. })
    ));
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        prehashed(&long, 1000, body_len(&bytes)),
        Err(DeltaError::TrailingBytes { .. })
    ));
}

#[test]
fn encode_with_sha256_writes_what_encode_writes_and_its_digest() {
    for codec in [Codec::F32, Codec::F16, Codec::Q8 { block: 7 }] {
        let plain = encode_vec(&sample(), codec);
        let mut out = Vec::new();
        let (len, sha) = encode_with_sha256(&sample(), codec, &mut out).unwrap();
        assert_eq!(out, plain, "{codec}");
        assert_eq!(len, plain.len() as u64);
        assert_eq!(
            &sha[..],
            digest::digest(&digest::SHA256, &plain).as_ref(),
            "{codec}"
        );
    }
}
