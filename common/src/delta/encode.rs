//! The streaming delta encoder: header, payload chunk by chunk and trailing SHA-256, written
//! to any `std::io::Write`.

use std::io::{BufWriter, Write};

use ring::digest;

use super::codec::{encode_chunk, first_non_finite, Codec};
use super::format::{Layout, FORMAT_VERSION, MAGIC};
use super::DeltaError;
use crate::model::{f32_le_bytes, ModelState};

/// Writes `delta` encoded with `codec` to `out` and returns the number of bytes written
/// (always [`super::encoded_len`]). Memory use is one chunk of about 256 KiB whatever the
/// model size. Refuses non-finite values, f16-range overflow, a bad q8 block size and models
/// beyond the format limits; `out` may then hold a partial stream, which decoders refuse.
pub fn encode<W: Write>(delta: &ModelState, codec: Codec, out: W) -> Result<u64, DeltaError> {
    encode_with_sha256(delta, codec, out).map(|(len, _)| len)
}

/// [`encode`], also returning the SHA-256 of the whole stream (checksum included: an upload
/// header's `payload_sha256`) from the same pass: the hash state that gives the trailing
/// checksum goes on over the checksum, so no byte is hashed twice.
pub fn encode_with_sha256<W: Write>(
    delta: &ModelState,
    codec: Codec,
    out: W,
) -> Result<(u64, [u8; 32]), DeltaError> {
    let codec = codec.validate()?;
    let layout = Layout::of(delta);
    layout.check_limits()?;
    let mut out = HashingWriter::new(out);
    write_header(&mut out, &layout, codec)?;
    let chunk = codec.chunk_values();
    let mut bytes = vec![0u8; codec.chunk_len(chunk)];
    for (name, t) in delta.iter() {
        for (i, values) in t.data().chunks(chunk).enumerate() {
            if codec == Codec::F32 {
                // Raw little-endian f32 is the payload: write it without a copy.
                if let Some(index) = first_non_finite(values) {
                    return Err(DeltaError::NonFinite {
                        name: name.to_string(),
                        index: i * chunk + index,
                    });
                }
                out.write(&f32_le_bytes(values))?;
            } else {
                let bytes = &mut bytes[..codec.chunk_len(values.len())];
                encode_chunk(codec, values, bytes)
                    .map_err(|fault| fault.at(name, i * chunk, codec))?;
                out.write(bytes)?;
            }
        }
    }
    out.finish()
}

fn write_header<W: Write>(
    out: &mut HashingWriter<W>,
    layout: &Layout,
    codec: Codec,
) -> Result<(), DeltaError> {
    out.write(&MAGIC)?;
    out.write(&FORMAT_VERSION.to_le_bytes())?;
    out.write(&[codec.id()])?;
    if let Codec::Q8 { block } = codec {
        out.write(&block.to_le_bytes())?;
    }
    // The limits checked by the caller keep every count below within its field's width.
    out.write(&(layout.len() as u32).to_le_bytes())?;
    for t in layout.tensors() {
        out.write(&(t.name.len() as u16).to_le_bytes())?;
        out.write(t.name.as_bytes())?;
        out.write(&[t.shape.len() as u8])?;
        for &d in &t.shape {
            out.write(&(d as u64).to_le_bytes())?;
        }
    }
    Ok(())
}

/// Buffers small writes, passes large ones through, and hashes everything it writes.
struct HashingWriter<W: Write> {
    inner: BufWriter<W>,
    hash: digest::Context,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner: BufWriter::with_capacity(1 << 16, inner),
            hash: digest::Context::new(&digest::SHA256),
            written: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), DeltaError> {
        self.hash.update(bytes);
        self.inner.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Appends the checksum and flushes; returns the stream length and its SHA-256.
    fn finish(self) -> Result<(u64, [u8; 32]), DeltaError> {
        let Self {
            mut inner,
            mut hash,
            written,
        } = self;
        let checksum = hash.clone().finish();
        inner.write_all(checksum.as_ref())?;
        inner.flush()?;
        hash.update(checksum.as_ref());
        let stream = hash.finish();
        let stream: [u8; 32] = stream.as_ref().try_into().expect("SHA-256 has 32 bytes");
        Ok((written + checksum.as_ref().len() as u64, stream))
    }
}
