//! [`DeltaFile`]: an encoded delta on disk (an accepted update's blob, or an upload's temporary
//! file) read range by range as a [`DeltaSource`], so that aggregation streams each plant's
//! delta from its file tile by tile and never holds a decoded delta.
//!
//! The header is checked byte for byte against the one the round's base layout implies; a
//! range is located from the layout (payloads are fixed-size per codec), read with `pread`
//! and decoded with the rules of `fedinspect_common::delta` (f32 little-endian, IEEE binary16,
//! q8 blocks of one f32 scale then int8 codes, `v = (code · (scale/127)).max(−scale).min(scale)`).
//! `common::delta` keeps its chunk decoders private, so the value rules are repeated here;
//! `tests` pins them to `delta::decode_to_model` bit for bit for every codec.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fedinspect_common::delta::{self, Codec, Layout, FORMAT_VERSION, MAGIC};
use fedinspect_common::fedavg::DeltaSource;

use super::StorageError;

/// One tensor of the file: where its payload starts.
#[derive(Debug)]
struct TensorAt {
    name: String,
    shape: Vec<usize>,
    numel: usize,
    /// Byte offset of the tensor's payload in the file.
    start: u64,
}

/// An encoded delta file whose header matches a base layout, readable by range.
#[derive(Debug)]
pub struct DeltaFile {
    file: File,
    path: PathBuf,
    codec: Codec,
    /// In name order, as in the file.
    tensors: Vec<TensorAt>,
    /// Factor applied to every value read (norm clipping), in f32.
    scale: Option<f32>,
    /// Bytes of the range being decoded (f16 and q8).
    buf: RefCell<Vec<u8>>,
}

impl DeltaFile {
    /// Opens a complete delta file (an accepted update's blob): its length must be exactly
    /// what `layout` and `codec` give, and its header must be theirs.
    pub fn open(path: &Path, layout: &Layout, codec: Codec) -> Result<Self, StorageError> {
        let f = Self::open_prefix(path, layout, codec)?;
        let len = f.file.metadata().map_err(|e| blob_err(path, e))?.len();
        let expected = delta::encoded_len(layout, codec);
        if len != expected {
            return Err(blob_err(
                path,
                invalid(format!(
                    "the file holds {len} bytes, a {codec} delta of the base model has {expected}"
                )),
            ));
        }
        Ok(f)
    }

    /// Opens a file that may end early (an upload cut off part-way): only its header must be
    /// complete, and reading past its end fails.
    pub fn open_prefix(path: &Path, layout: &Layout, codec: Codec) -> Result<Self, StorageError> {
        let file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StorageError::MissingBlob(path.display().to_string()),
            _ => blob_err(path, e),
        })?;
        let expected = header_bytes(layout, codec);
        let mut found = vec![0u8; expected.len()];
        file.read_exact_at(&mut found, 0)
            .map_err(|e| blob_err(path, e))?;
        if found != expected {
            return Err(blob_err(
                path,
                invalid(format!(
                    "its header is not that of a {codec} delta of the round's base model"
                )),
            ));
        }
        let mut start = expected.len() as u64;
        let tensors = layout
            .iter()
            .map(|(name, shape)| {
                let numel = shape.iter().product();
                let t = TensorAt {
                    name: name.to_string(),
                    shape: shape.to_vec(),
                    numel,
                    start,
                };
                start += payload_len(codec, numel);
                t
            })
            .collect();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            codec,
            tensors,
            scale: None,
            buf: RefCell::new(Vec::new()),
        })
    }

    /// Multiplies every value read by `scale` (f32, as `aggregation::apply_scale` does).
    pub fn with_scale(mut self, scale: Option<f32>) -> Self {
        self.scale = scale;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tensor(&self, name: &str) -> io::Result<&TensorAt> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .map(|i| &self.tensors[i])
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, format!("no tensor '{name}'")))
    }

    fn read_values(&self, t: &TensorAt, offset: usize, out: &mut [f32]) -> io::Result<()> {
        match self.codec {
            Codec::F32 => self.read_f32(t, offset, out),
            Codec::F16 => {
                let mut buf = self.buf.borrow_mut();
                buf.resize(2 * out.len(), 0);
                self.file
                    .read_exact_at(&mut buf, t.start + 2 * offset as u64)?;
                for (v, b) in out.iter_mut().zip(buf.chunks_exact(2)) {
                    *v = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
                Ok(())
            }
            Codec::Q8 { block } => self.read_q8(t, block as usize, offset, out),
        }
    }

    /// Reads little-endian f32 straight into `out`.
    #[cfg(target_endian = "little")]
    fn read_f32(&self, t: &TensorAt, offset: usize, out: &mut [f32]) -> io::Result<()> {
        // SAFETY: `out` is `4 * out.len()` initialised, writable bytes (u8 has alignment 1),
        // and every bit pattern is a valid f32; on a little-endian CPU the file's bytes are
        // the values.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                out.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(out),
            )
        };
        self.file.read_exact_at(bytes, t.start + 4 * offset as u64)
    }

    #[cfg(not(target_endian = "little"))]
    fn read_f32(&self, t: &TensorAt, offset: usize, out: &mut [f32]) -> io::Result<()> {
        let mut buf = self.buf.borrow_mut();
        buf.resize(4 * out.len(), 0);
        self.file
            .read_exact_at(&mut buf, t.start + 4 * offset as u64)?;
        for (v, b) in out.iter_mut().zip(buf.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Decodes the q8 blocks that cover `offset..offset + out.len()`.
    fn read_q8(
        &self,
        t: &TensorAt,
        block: usize,
        offset: usize,
        out: &mut [f32],
    ) -> io::Result<()> {
        let first = offset / block;
        let end = offset + out.len();
        let last = end.div_ceil(block); // one past the last block
                                        // Every block before `last` is full except possibly the tensor's final one.
        let bytes_before = |b: usize| (b * (block + 4)) as u64;
        let values_in = |b: usize| block.min(t.numel - b * block);
        let len = bytes_before(last - 1) - bytes_before(first) + 4 + values_in(last - 1) as u64;
        let mut buf = self.buf.borrow_mut();
        buf.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        self.file
            .read_exact_at(&mut buf, t.start + bytes_before(first))?;
        let mut at = 0;
        for b in first..last {
            let n = values_in(b);
            let scale = f32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
            if !scale.is_finite() || scale.is_sign_negative() {
                return Err(invalid(format!(
                    "tensor '{}' block {b} has the q8 scale {scale}",
                    t.name
                )));
            }
            let step = scale / 127.0;
            let codes = &buf[at + 4..at + 4 + n];
            for (j, &c) in codes.iter().enumerate() {
                let i = b * block + j;
                if i < offset || i >= end {
                    continue;
                }
                if c == 0x80 {
                    return Err(invalid(format!(
                        "tensor '{}' has the q8 code -128 at index {i}",
                        t.name
                    )));
                }
                out[i - offset] = (f32::from(i8::from_le_bytes([c])) * step)
                    .max(-scale)
                    .min(scale);
            }
            at += 4 + n;
        }
        Ok(())
    }
}

impl DeltaSource for DeltaFile {
    fn tensors(&self) -> Vec<(&str, &[usize])> {
        self.tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect()
    }

    fn read(&self, name: &str, offset: usize, out: &mut [f32]) -> io::Result<()> {
        crate::failpoint::hit(crate::failpoint::AGGREGATE_READ_TILE);
        let t = self.tensor(name)?;
        if out.is_empty() {
            return Ok(());
        }
        if offset
            .checked_add(out.len())
            .is_none_or(|end| end > t.numel)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{} is outside tensor '{name}'", out.len()),
            ));
        }
        self.read_values(t, offset, out)
            .map_err(|e| io::Error::new(e.kind(), format!("{} ({e})", self.path.display())))?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "{}: tensor '{name}' holds a non-finite value at index {}; the file is corrupt",
                self.path.display(),
                offset + i
            )));
        }
        if let Some(s) = self.scale {
            for v in out.iter_mut() {
                *v *= s;
            }
        }
        Ok(())
    }
}

/// The exact header bytes (everything before the first payload) of a delta of `layout`
/// encoded with `codec`, as the wire format (`fedinspect_common::delta`, version 1) writes it.
pub fn header_bytes(layout: &Layout, codec: Codec) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    match codec {
        Codec::F32 => h.push(1),
        Codec::F16 => h.push(2),
        Codec::Q8 { block } => {
            h.push(3);
            h.extend_from_slice(&block.to_le_bytes());
        }
    }
    // A layout taken from a valid base model is within the format's limits, so these fit.
    h.extend_from_slice(&(layout.len() as u32).to_le_bytes());
    for (name, shape) in layout.iter() {
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.push(shape.len() as u8);
        for &d in shape {
            h.extend_from_slice(&(d as u64).to_le_bytes());
        }
    }
    h
}

/// Payload bytes of a tensor of `numel` values.
fn payload_len(codec: Codec, numel: usize) -> u64 {
    let n = numel as u64;
    match codec {
        Codec::F32 => 4 * n,
        Codec::F16 => 2 * n,
        Codec::Q8 { block } => n + 4 * n.div_ceil(u64::from(block)),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn blob_err(path: &Path, source: io::Error) -> StorageError {
    StorageError::Blob {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedinspect_common::{ModelState, Tensor};

    fn model(seed: u32) -> ModelState {
        let mut m = ModelState::new();
        for (name, shape) in [("a.weight", vec![7, 9]), ("b", vec![1000]), ("c", vec![3])] {
            let n: usize = shape.iter().product();
            let data = (0..n)
                .map(|i| {
                    let h = fedinspect_common::fedavg::workload::mix32(i as u32 ^ seed);
                    (h >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
                })
                .collect();
            m.insert(name, Tensor::new(shape, data).unwrap()).unwrap();
        }
        m
    }

    fn write(dir: &Path, delta: &ModelState, codec: Codec) -> PathBuf {
        let path = dir.join(format!("{codec}"));
        let mut bytes = Vec::new();
        delta::encode(delta, codec, &mut bytes).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        path
    }

    #[test]
    fn every_range_decodes_as_the_common_decoder_does() {
        let dir = tempfile::tempdir().unwrap();
        let d = model(7);
        let layout = Layout::of(&d);
        for codec in [Codec::F32, Codec::F16, Codec::q8(), Codec::Q8 { block: 7 }] {
            let path = write(dir.path(), &d, codec);
            let bytes = std::fs::read(&path).unwrap();
            let header = header_bytes(&layout, codec);
            assert_eq!(&bytes[..header.len()], header.as_slice(), "{codec}");
            let want = delta::decode_to_model(bytes.as_slice(), &layout, Some(codec)).unwrap();
            let f = DeltaFile::open(&path, &layout, codec).unwrap();
            for (name, t) in want.iter() {
                let n = t.numel();
                // Ranges that start and end inside, across and at q8 block edges.
                for (off, len) in [
                    (0, n),
                    (1, n - 1),
                    (n / 3, n / 3 + 1),
                    (n - 1, 1),
                    (n / 2, 0),
                ] {
                    let mut out = vec![0f32; len];
                    f.read(name, off, &mut out).unwrap();
                    let expect = &t.data()[off..off + len];
                    assert!(
                        out.iter()
                            .zip(expect)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{codec} {name} {off}+{len}"
                    );
                }
            }
            let scaled = DeltaFile::open(&path, &layout, codec)
                .unwrap()
                .with_scale(Some(0.37));
            let mut out = vec![0f32; 1000];
            scaled.read("b", 0, &mut out).unwrap();
            let mut want_b = want.get("b").unwrap().data().to_vec();
            want_b.iter_mut().for_each(|v| *v *= 0.37);
            assert_eq!(out, want_b, "{codec} scaled");
        }
    }

    #[test]
    fn a_file_of_another_layout_codec_or_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = model(1);
        let layout = Layout::of(&d);
        let path = write(dir.path(), &d, Codec::F16);
        let err = DeltaFile::open(&path, &layout, Codec::F32).unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");
        let mut other = d.clone();
        other
            .insert("z", Tensor::new(vec![1], vec![0.0]).unwrap())
            .unwrap();
        let err = DeltaFile::open(&path, &Layout::of(&other), Codec::F16).unwrap_err();
        assert!(err.to_string().contains("header"), "{err}");

        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 40);
        std::fs::write(&path, &bytes).unwrap();
        let err = DeltaFile::open(&path, &layout, Codec::F16).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
        // A prefix opens, reads what it holds and refuses to read past its end.
        let f = DeltaFile::open_prefix(&path, &layout, Codec::F16).unwrap();
        let mut out = vec![0f32; 10];
        f.read("a.weight", 0, &mut out).unwrap();
        let mut out = vec![0f32; 3];
        assert!(f.read("c", 0, &mut out).is_err());
        assert!(
            f.read("c", 2, &mut [0f32; 2]).is_err(),
            "outside the tensor"
        );
    }

    #[test]
    fn a_non_finite_value_on_disk_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = model(2);
        let layout = Layout::of(&d);
        let path = write(dir.path(), &d, Codec::F32);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = header_bytes(&layout, Codec::F32).len() + 4 * 5;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let f = DeltaFile::open(&path, &layout, Codec::F32).unwrap();
        let err = f.read("a.weight", 0, &mut [0f32; 10]).unwrap_err();
        assert!(err.to_string().contains("index 5"), "{err}");
    }
}
