//! Model state: the ordered set of named f32 tensors that the federation moves around.
//!
//! Tensors are kept in name order (a `BTreeMap` keyed by the VarStore path), which is also the
//! canonical order for hashing and for every wire format, so two parties holding the same
//! weights always agree on one [`ModelHash`]. On disk a model is a safetensors file that opens
//! as is in Python's `safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::Path;

use ring::digest;

use crate::fsutil;

/// Magic prefix of the canonical byte layout hashed by [`ModelState::content_hash`].
const HASH_DOMAIN: &[u8] = b"fedinspect-model-v1\0";

/// One dense f32 tensor in row-major order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Builds a tensor, checking that `data` holds exactly the product of `shape` values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ModelError> {
        let expected = numel(&shape)?;
        if expected != data.len() {
            return Err(ModelError::ShapeMismatch {
                name: String::new(),
                shape,
                values: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Result<Self, ModelError> {
        let n = numel(&shape)?;
        Ok(Self {
            shape,
            data: vec![0.0; n],
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

fn numel(shape: &[usize]) -> Result<usize, ModelError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| ModelError::ShapeOverflow {
            shape: shape.to_vec(),
        })
}

/// SHA-256 content hash of a model in its canonical byte layout.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelHash(pub [u8; 32]);

impl ModelHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Result<Self, ModelError> {
        let bytes = hex::decode(s).map_err(|_| ModelError::BadHash(s.to_string()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ModelError::BadHash(s.to_string()))?;
        Ok(Self(arr))
    }

    /// The first 12 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Debug for ModelHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelHash({})", self.to_hex())
    }
}

impl fmt::Display for ModelHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Everything that can be wrong with a model or a model file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor '{name}' has shape {shape:?} but {values} values; the producer wrote an inconsistent tensor")]
    ShapeMismatch {
        name: String,
        shape: Vec<usize>,
        values: usize,
    },
    #[error("tensor shape {shape:?} is too large to address on this machine")]
    ShapeOverflow { shape: Vec<usize> },
    #[error("tensor name '{0}' appears twice; tensor names must be unique")]
    DuplicateName(String),
    #[error("tensor name must not be empty")]
    EmptyName,
    #[error("tensor '{name}' holds {dtype}, but fedinspect models are float32; convert the checkpoint with `safetensors` in Python (tensor.float())")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tensor '{name}' holds a non-finite value (NaN or infinity) at index {index}; the model is corrupt or training diverged")]
    NonFinite { name: String, index: usize },
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write model file {path}: {source}; whatever was at that path is unchanged (the write goes to a temporary file renamed into place): free disk space or fix the folder's permissions and run again")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file ({reason}); it may be truncated or not a model file, fetch it again")]
    NotSafetensors { path: String, reason: String },
    #[error("'{0}' is not a 64-digit hex SHA-256 model hash")]
    BadHash(String),
}

/// An ordered set of named f32 tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelState {
    tensors: BTreeMap<String, Tensor>,
}

impl ModelState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; names must be unique and non-empty.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<(), ModelError> {
        let name = name.into();
        if name.is_empty() {
            return Err(ModelError::EmptyName);
        }
        if self.tensors.contains_key(&name) {
            return Err(ModelError::DuplicateName(name));
        }
        self.tensors.insert(name, tensor);
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.tensors.get_mut(name)
    }

    /// Tensors in canonical (name) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.tensors.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(Tensor::numel).sum()
    }

    /// A model with the same names and shapes, all zeros.
    pub fn zeros_like(&self) -> Self {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    Tensor {
                        shape: t.shape.clone(),
                        data: vec![0.0; t.data.len()],
                    },
                )
            })
            .collect();
        Self { tensors }
    }

    /// Checks that every value is finite.
    pub fn check_finite(&self) -> Result<(), ModelError> {
        for (name, t) in &self.tensors {
            if let Some(index) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(ModelError::NonFinite {
                    name: name.clone(),
                    index,
                });
            }
        }
        Ok(())
    }

    /// SHA-256 over the canonical layout: a domain tag, then per tensor in name order the
    /// name length (u32 LE), name bytes, rank (u32 LE), dims (u64 LE each) and the values as
    /// little-endian f32. Stable across platforms and across safetensors round trips.
    pub fn content_hash(&self) -> ModelHash {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(HASH_DOMAIN);
        for (name, t) in &self.tensors {
            ctx.update(&(name.len() as u32).to_le_bytes());
            ctx.update(name.as_bytes());
            ctx.update(&(t.shape.len() as u32).to_le_bytes());
            for &d in &t.shape {
                ctx.update(&(d as u64).to_le_bytes());
            }
            ctx.update(&f32_le_bytes(&t.data));
        }
        let out = ctx.finish();
        let mut arr = [0u8; 32];
        arr.copy_from_slice(out.as_ref());
        ModelHash(arr)
    }

    /// Serialises to safetensors bytes with string metadata (stored in `__metadata__`).
    pub fn to_safetensors_bytes(
        &self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, ModelError> {
        let views = self.views();
        let meta: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta = if meta.is_empty() { None } else { Some(meta) };
        safetensors::tensor::serialize(views, meta).map_err(|e| ModelError::NotSafetensors {
            path: "<memory>".into(),
            reason: e.to_string(),
        })
    }

    /// Writes a safetensors file atomically (temp file, fsync, rename).
    pub fn save_safetensors(
        &self,
        path: &Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), ModelError> {
        let bytes = self.to_safetensors_bytes(metadata)?;
        fsutil::write_atomic(path, |w| w.write_all(&bytes)).map_err(|source| ModelError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a safetensors file; every tensor must be float32 and finite.
    pub fn load_safetensors(path: &Path) -> Result<(Self, BTreeMap<String, String>), ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes).map_err(|e| match e {
            ModelError::NotSafetensors { reason, .. } => ModelError::NotSafetensors {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses safetensors bytes; every tensor must be float32 and finite.
    pub fn from_safetensors_bytes(
        bytes: &[u8],
    ) -> Result<(Self, BTreeMap<String, String>), ModelError> {
        let not_st = |reason: String| ModelError::NotSafetensors {
            path: "<memory>".into(),
            reason,
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| not_st(e.to_string()))?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| not_st(e.to_string()))?;
        let mut model = ModelState::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(ModelError::UnsupportedDtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let raw = view.data();
            let data: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let tensor = Tensor::new(view.shape().to_vec(), data).map_err(|_| {
                ModelError::ShapeMismatch {
                    name: name.clone(),
                    shape: view.shape().to_vec(),
                    values: raw.len() / 4,
                }
            })?;
            model.insert(name, tensor)?;
        }
        model.check_finite()?;
        Ok((model, metadata))
    }

    fn views(&self) -> Vec<(String, F32View<'_>)> {
        self.tensors
            .iter()
            .map(|(k, t)| (k.clone(), F32View(t)))
            .collect()
    }
}

impl ModelState {
    /// Builds a model from (name, tensor) pairs, refusing duplicate or empty names.
    pub fn from_tensors<I>(iter: I) -> Result<Self, ModelError>
    where
        I: IntoIterator<Item = (String, Tensor)>,
    {
        let mut m = ModelState::new();
        for (k, t) in iter {
            m.insert(k, t)?;
        }
        Ok(m)
    }
}

/// The values of a f32 slice as little-endian bytes, without a copy on little-endian targets.
pub fn f32_le_bytes(data: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8; alignment of u8 is 1.
        let bytes = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data))
        };
        std::borrow::Cow::Borrowed(bytes)
    }
    #[cfg(not(target_endian = "little"))]
    {
        std::borrow::Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

struct F32View<'a>(&'a Tensor);

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        f32_le_bytes(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModelState {
        let mut m = ModelState::new();
        m.insert(
            "b.bias",
            Tensor::new(vec![3], vec![0.5, -1.0, 2.0]).unwrap(),
        )
        .unwrap();
        m.insert(
            "a.weight",
            Tensor::new(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        )
        .unwrap();
        m
    }

    #[test]
    fn hash_is_stable_and_pinned() {
        // Pinned: a change of the canonical layout changes every stored model hash, so it
        // must be deliberate (bump HASH_DOMAIN) and this value updated with it.
        let h = sample().content_hash();
        assert_eq!(h, sample().content_hash());
        assert_eq!(
            h.to_hex(),
            "750c2d8682edd41c9f4e9d433b0b8a91ed1c7393e98304d084bf4e915bd00f1c", // also computed with Python hashlib
            "canonical model hash layout changed"
        );
    }

    #[test]
    fn hash_depends_on_names_shapes_and_values() {
        let base = sample().content_hash();
        let mut m = sample();
        m.get_mut("a.weight").unwrap().data_mut()[0] = 1.5;
        assert_ne!(m.content_hash(), base);
        let mut m = ModelState::new();
        m.insert(
            "b.bias",
            Tensor::new(vec![3], vec![0.5, -1.0, 2.0]).unwrap(),
        )
        .unwrap();
        m.insert(
            "a.weight",
            Tensor::new(vec![4], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        )
        .unwrap();
        assert_ne!(m.content_hash(), base, "reshaping must change the hash");
    }

    #[test]
    fn safetensors_round_trip_keeps_values_metadata_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let mut meta = BTreeMap::new();
        meta.insert("round".to_string(), "3".to_string());
        let m = sample();
        m.save_safetensors(&p, &meta).unwrap();
        let (back, meta_back) = ModelState::load_safetensors(&p).unwrap();
        assert_eq!(back, m);
        assert_eq!(meta_back, meta);
        assert_eq!(back.content_hash(), m.content_hash());
    }

    #[test]
    fn rejects_truncated_file() {
        let bytes = sample().to_safetensors_bytes(&BTreeMap::new()).unwrap();
        let err = ModelState::from_safetensors_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(matches!(err, ModelError::NotSafetensors { .. }), "{err}");
    }

    #[test]
    fn rejects_non_f32_tensor() {
        let data = vec![0u8; 8];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![1], &data).unwrap();
        let bytes = safetensors::tensor::serialize(vec![("x", view)], None).unwrap();
        let err = ModelState::from_safetensors_bytes(&bytes).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err}");
    }

    #[test]
    fn rejects_nan() {
        let mut m = sample();
        m.get_mut("b.bias").unwrap().data_mut()[1] = f32::NAN;
        let bytes = m.to_safetensors_bytes(&BTreeMap::new()).unwrap();
        let err = ModelState::from_safetensors_bytes(&bytes).unwrap_err();
        assert!(
            matches!(err, ModelError::NonFinite { ref name, index: 1 } if name == "b.bias"),
            "{err}"
        );
    }

    #[test]
    fn rejects_duplicate_and_bad_shapes() {
        let mut m = sample();
        let err = m
            .insert("a.weight", Tensor::zeros(vec![1]).unwrap())
            .unwrap_err();
        assert!(matches!(err, ModelError::DuplicateName(_)));
        assert!(matches!(
            Tensor::new(vec![2, 3], vec![0.0; 5]),
            Err(ModelError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            Tensor::zeros(vec![usize::MAX, 2]),
            Err(ModelError::ShapeOverflow { .. })
        ));
    }
}
