//! The streaming delta decoder: checks a stream's header against the base layout, hands the
//! decoded values to a [`DeltaSink`] chunk by chunk, then verifies the trailing SHA-256.
//! [`decode_prehashed`] takes the body's SHA-256 from a reader that hashed the bytes already
//! (the coordinator hashes every upload for its blob address), so each byte is hashed once.

use std::io::{BufReader, ErrorKind, Read};

use ring::digest;

use super::codec::{decode_chunk, Codec};
use super::format::{
    check_limit, encoded_len, Layout, LayoutTensor, CHECKSUM_LEN, FORMAT_VERSION, MAGIC,
    MAX_NAME_LEN, MAX_RANK, MAX_TENSORS, MAX_TOTAL_VALUES,
};
use super::DeltaError;
use crate::model::{ModelState, Tensor};

/// Receives a delta's values while [`decode`] reads them, e.g. to accumulate FedAvg without
/// ever holding the decoded delta.
///
/// **The values arrive before the stream's checksum has been verified.** When [`decode`]
/// returns an error, everything this sink received from it is untrustworthy and must be
/// discarded (e.g. accumulate into a per-client buffer, or keep the sum recoverable).
pub trait DeltaSink {
    /// Tensor `name` starts; called once per tensor, in canonical order, before its values.
    fn tensor_begin(&mut self, name: &str, shape: &[usize]) {
        let _ = (name, shape);
    }

    /// The values of tensor `name` from flat index `offset` on. Chunks arrive in order, hold
    /// at most 64 Ki values each, and together cover the tensor exactly once.
    fn values(&mut self, name: &str, offset: usize, values: &[f32]);
}

/// Decodes a delta stream for a model with layout `base`, feeding `sink` as values arrive,
/// and returns the codec it was encoded with. With `expected` set, any other codec (q8 block
/// size included) is refused before a value is read.
///
/// Every check is made: header fields, limits, layout against `base`, values (finite, valid
/// q8 scales and codes), length, and the checksum last; then `reader` is read to its end,
/// which must come right after the checksum. On `Err` the sink has seen data that must be
/// discarded (see [`DeltaSink`]). Memory use is about 600 KiB whatever the model size.
pub fn decode<R: Read, S: DeltaSink + ?Sized>(
    reader: R,
    base: &Layout,
    expected: Option<Codec>,
    sink: &mut S,
) -> Result<Codec, DeltaError> {
    decode_with(Source::new(reader, true), base, expected, sink, |_, _| None)
}

/// A reader that hashes what it yields as it goes, so that [`decode_prehashed`] need not hash
/// the stream a second time.
pub trait PrehashedRead: Read {
    /// SHA-256 of the first `len` bytes this reader has yielded, or `None` if it did not
    /// keep the hash state at exactly that length.
    fn sha256_of_first(&self, len: u64) -> Option<[u8; 32]>;
}

impl<T: PrehashedRead + ?Sized> PrehashedRead for &mut T {
    fn sha256_of_first(&self, len: u64) -> Option<[u8; 32]> {
        (**self).sha256_of_first(len)
    }
}

/// [`decode`] without hashing: the trailing checksum is compared with
/// `reader.sha256_of_first(body length)`, asked once the checksum has been read. Every other
/// check is the same. A reader that has no digest for that length fails the decode with
/// [`DeltaError::Io`].
pub fn decode_prehashed<R: PrehashedRead, S: DeltaSink + ?Sized>(
    reader: R,
    base: &Layout,
    expected: Option<Codec>,
    sink: &mut S,
) -> Result<Codec, DeltaError> {
    decode_with(
        Source::new(reader, false),
        base,
        expected,
        sink,
        |r, len| r.sha256_of_first(len),
    )
}

/// The decoder proper; `body_digest` gives the body's SHA-256 when `src` does not hash.
fn decode_with<R: Read, S: DeltaSink + ?Sized>(
    mut src: Source<R>,
    base: &Layout,
    expected: Option<Codec>,
    sink: &mut S,
    body_digest: impl FnOnce(&R, u64) -> Option<[u8; 32]>,
) -> Result<Codec, DeltaError> {
    let codec = read_codec(&mut src, expected)?;
    src.expected = encoded_len(base, codec);
    let count = u32::from_le_bytes(src.array()?);
    check_limit("tensors", count.into(), MAX_TENSORS as u64)?;
    if count as usize != base.len() {
        return Err(DeltaError::TensorCountMismatch {
            expected: base.len(),
            found: count.into(),
        });
    }
    let mut name = Vec::new();
    let mut total = 0u64;
    for (index, t) in base.tensors().iter().enumerate() {
        read_tensor_header(&mut src, index, t, &mut name, &mut total)?;
    }
    let chunk = codec.chunk_values();
    let mut bytes = vec![0u8; codec.chunk_len(chunk)];
    let mut values = vec![0f32; chunk];
    for t in base.tensors() {
        sink.tensor_begin(&t.name, &t.shape);
        let mut offset = 0;
        while offset < t.numel {
            let n = chunk.min(t.numel - offset);
            let bytes = &mut bytes[..codec.chunk_len(n)];
            src.read(bytes)?;
            let values = &mut values[..n];
            decode_chunk(codec, bytes, values).map_err(|fault| fault.at(&t.name, offset, codec))?;
            sink.values(&t.name, offset, values);
            offset += n;
        }
    }
    src.finish(body_digest)?;
    Ok(codec)
}

/// Decodes a whole delta into a model with `base`'s layout (see [`decode`]).
pub fn decode_to_model<R: Read>(
    reader: R,
    base: &Layout,
    expected: Option<Codec>,
) -> Result<ModelState, DeltaError> {
    let mut sink = Collect::default();
    decode(reader, base, expected, &mut sink)?;
    let tensors = sink.tensors.into_iter().map(|(name, shape, data)| {
        // The decoder delivered exactly `base`'s layout, which came from a valid model.
        let tensor = Tensor::new(shape, data).expect("decoded tensor matches its shape");
        (name, tensor)
    });
    Ok(ModelState::from_tensors(tensors).expect("layout names are unique and non-empty"))
}

#[derive(Default)]
struct Collect {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl DeltaSink for Collect {
    fn tensor_begin(&mut self, name: &str, shape: &[usize]) {
        let numel = shape.iter().product();
        self.tensors
            .push((name.to_string(), shape.to_vec(), Vec::with_capacity(numel)));
    }

    fn values(&mut self, _name: &str, _offset: usize, values: &[f32]) {
        if let Some((_, _, data)) = self.tensors.last_mut() {
            data.extend_from_slice(values);
        }
    }
}

/// Magic, version and codec (with its q8 block size), checked in that order.
fn read_codec<R: Read>(src: &mut Source<R>, expected: Option<Codec>) -> Result<Codec, DeltaError> {
    if src.array::<8>()? != MAGIC {
        return Err(DeltaError::BadMagic);
    }
    let version = u16::from_le_bytes(src.array()?);
    if version != FORMAT_VERSION {
        return Err(DeltaError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let codec = match src.array::<1>()?[0] {
        1 => Codec::F32,
        2 => Codec::F16,
        3 => Codec::Q8 {
            block: u32::from_le_bytes(src.array()?),
        },
        id => return Err(DeltaError::UnknownCodec(id)),
    };
    let codec = codec.validate()?;
    match expected {
        Some(expected) if expected != codec => Err(DeltaError::CodecMismatch {
            expected,
            found: codec,
        }),
        _ => Ok(codec),
    }
}

/// Reads tensor `index`'s name and shape and checks them against `expected`.
fn read_tensor_header<R: Read>(
    src: &mut Source<R>,
    index: usize,
    expected: &LayoutTensor,
    name: &mut Vec<u8>,
    total: &mut u64,
) -> Result<(), DeltaError> {
    let len = u16::from_le_bytes(src.array()?);
    check_limit("bytes in a tensor name", len.into(), MAX_NAME_LEN as u64)?;
    name.resize(len.into(), 0);
    src.read(name)?;
    if name.as_slice() != expected.name.as_bytes() {
        return Err(DeltaError::TensorNameMismatch {
            index,
            expected: expected.name.clone(),
            found: String::from_utf8_lossy(name).into_owned(),
        });
    }
    let rank = src.array::<1>()?[0];
    check_limit("dimensions in a tensor", rank.into(), MAX_RANK as u64)?;
    let mut shape = Vec::with_capacity(rank.into());
    let mut numel = 1u64;
    for _ in 0..rank {
        let dim = u64::from_le_bytes(src.array()?);
        check_limit("values along one dimension", dim, MAX_TOTAL_VALUES)?;
        numel = numel.saturating_mul(dim);
        shape.push(usize::try_from(dim).unwrap_or(usize::MAX));
    }
    *total = total.saturating_add(numel);
    check_limit("values", *total, MAX_TOTAL_VALUES)?;
    if shape != expected.shape {
        return Err(DeltaError::ShapeMismatch {
            name: expected.name.clone(),
            expected: expected.shape.clone(),
            found: shape,
        });
    }
    Ok(())
}

/// Reads exact byte counts, hashing them (unless the reader does) and reporting a short
/// stream as truncated.
struct Source<R: Read> {
    inner: BufReader<R>,
    /// `None` when the reader hashes (see [`PrehashedRead`]).
    hash: Option<digest::Context>,
    /// Bytes consumed so far.
    pos: u64,
    /// The stream's full length once the codec is known, else 0.
    expected: u64,
}

impl<R: Read> Source<R> {
    fn new(inner: R, hash: bool) -> Self {
        Self {
            inner: BufReader::with_capacity(1 << 13, inner),
            hash: hash.then(|| digest::Context::new(&digest::SHA256)),
            pos: 0,
            expected: 0,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), DeltaError> {
        self.read_unhashed(buf)?;
        if let Some(hash) = self.hash.as_mut() {
            hash.update(buf);
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DeltaError> {
        let mut buf = [0u8; N];
        self.read(&mut buf)?;
        Ok(buf)
    }

    fn read_unhashed(&mut self, buf: &mut [u8]) -> Result<(), DeltaError> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(DeltaError::Truncated {
                        got: self.pos + done as u64,
                        expected: self.expected.max(self.pos + buf.len() as u64),
                    })
                }
                Ok(n) => done += n.min(buf.len() - done),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Checks the trailing checksum against the body's SHA-256 (computed here, or else given
    /// by `body_digest` for the body's length), then that nothing follows it.
    fn finish(
        mut self,
        body_digest: impl FnOnce(&R, u64) -> Option<[u8; 32]>,
    ) -> Result<(), DeltaError> {
        let body_len = self.pos;
        let mut stored = [0u8; CHECKSUM_LEN];
        self.read_unhashed(&mut stored)?;
        let matches = match self.hash.take() {
            Some(hash) => hash.finish().as_ref() == stored,
            None => match body_digest(self.inner.get_ref(), body_len) {
                Some(digest) => digest == stored,
                None => {
                    return Err(DeltaError::Io(std::io::Error::other(format!(
                        "the reader kept no SHA-256 of the first {body_len} bytes; decode the stream with `delta::decode`, which hashes it"
                    ))))
                }
            },
        };
        if !matches {
            return Err(DeltaError::ChecksumMismatch);
        }
        let mut probe = [0u8; 1];
        loop {
            match self.inner.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(DeltaError::TrailingBytes { after: self.pos }),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
