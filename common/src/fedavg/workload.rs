//! The benchmark workload of `bench/WORKLOAD.md` (test and bench support): model sizes, the
//! integer hash, the initial global model, the plants' deltas and sample counts, the
//! table-order checksum and the published canonical checksums.
//!
//! The flat index `i` of the workload runs over the tensors in *table* order (conv1.weight,
//! conv1.bias, conv2.weight, ...), which is not the name order of [`ModelState`]; every
//! function here maps between the two by name.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use ring::digest;
use serde::Deserialize;

use super::source::DeltaSource;
use crate::model::{f32_le_bytes, ModelState, Tensor};

/// Weyl constant of the delta generator.
const WEYL: u32 = 0x9E37_79B1;

/// A model size of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelSize {
    /// P = 10,898, for smoke tests.
    Tiny,
    /// P = 1,002,698.
    M1,
    /// P = 10,116,810.
    M10,
}

impl ModelSize {
    pub const ALL: [ModelSize; 3] = [ModelSize::Tiny, ModelSize::M1, ModelSize::M10];

    /// The label used in WORKLOAD.md and the checksum file: `tiny`, `1M`, `10M`.
    pub fn label(self) -> &'static str {
        match self {
            ModelSize::Tiny => "tiny",
            ModelSize::M1 => "1M",
            ModelSize::M10 => "10M",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.label() == label)
    }

    /// The 20 tensors as (name, shape), in table order.
    pub fn tensors(self) -> Vec<(String, Vec<usize>)> {
        let (c, h) = match self {
            ModelSize::Tiny => (4, 16),
            ModelSize::M1 => (24, 640),
            ModelSize::M10 => (80, 1920),
        };
        let mut out = vec![
            ("conv1.weight".to_string(), vec![c, 3, 3, 3]),
            ("conv1.bias".to_string(), vec![c]),
        ];
        let mut cin = c;
        for (j, cout) in [(2, 2 * c), (3, 4 * c), (4, 4 * c), (5, 8 * c)] {
            out.push((format!("conv{j}.weight"), vec![cout, cin, 3, 3]));
            out.push((format!("bn{j}.weight"), vec![cout]));
            out.push((format!("bn{j}.bias"), vec![cout]));
            cin = cout;
        }
        out.extend([
            ("fc1.weight".to_string(), vec![h, cin * 4]),
            ("fc1.bias".to_string(), vec![h]),
            ("fc2.weight".to_string(), vec![h / 2, h]),
            ("fc2.bias".to_string(), vec![h / 2]),
            ("fc3.weight".to_string(), vec![10, h / 2]),
            ("fc3.bias".to_string(), vec![10]),
        ]);
        out
    }

    /// P, the number of values of the model.
    pub fn num_params(self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// The "lowbias32" integer hash, on u32 with wrap-around.
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^= x >> 16;
    x
}

/// `seed(k, r) = mix32((r << 16) + k)`.
pub fn seed(client: u32, round: u32) -> u32 {
    mix32((round << 16).wrapping_add(client))
}

/// `n_k = 100 (k + 1)`.
pub fn num_samples(client: u32) -> u64 {
    100 * (u64::from(client) + 1)
}

/// `N = 50 K (K + 1)`, the sum of `n_k` over `clients` plants.
pub fn total_samples(clients: u32) -> u64 {
    (0..clients).map(num_samples).sum()
}

/// `G0[i] = f32(int32(mix32(i) >> 12) - 524288) * 2^-21`, exact in f32.
pub fn initial_global(size: ModelSize) -> ModelState {
    build(size, |flat, out| {
        for (j, v) in out.iter_mut().enumerate() {
            // The workload defines i as uint32; every size has fewer than 2^32 values.
            let i = (flat + j) as u32;
            *v = ((mix32(i) >> 12) as i32 - 524_288) as f32 * (1.0 / 2_097_152.0);
        }
    })
}

/// Fills `out` with `delta[i] = f32(D[i]) * 2^-24` for the flat indices `flat..`, where
/// `D[i] = int32(((i * 0x9E3779B1 + seed(k, r)) mod 2^32) >> 21) - 1024`.
pub fn delta_values(client: u32, round: u32, flat: usize, out: &mut [f32]) {
    let s = seed(client, round);
    for (j, v) in out.iter_mut().enumerate() {
        let h = ((flat + j) as u32).wrapping_mul(WEYL).wrapping_add(s);
        *v = ((h >> 21) as i32 - 1024) as f32 * (1.0 / 16_777_216.0);
    }
}

/// The delta of plant `client` in round `round`, in memory.
pub fn client_delta(size: ModelSize, client: u32, round: u32) -> ModelState {
    build(size, |flat, out| delta_values(client, round, flat, out))
}

/// A plant's delta computed on demand, range by range: a [`DeltaSource`] that holds no values,
/// for exercising the read path and for runs too large to hold every delta.
#[derive(Clone, Debug)]
pub struct GeneratedDelta {
    client: u32,
    round: u32,
    /// (name, shape, flat offset in table order), in table order.
    tensors: Vec<(String, Vec<usize>, usize)>,
}

impl GeneratedDelta {
    pub fn new(size: ModelSize, client: u32, round: u32) -> Self {
        let mut flat = 0;
        let tensors = size
            .tensors()
            .into_iter()
            .map(|(name, shape)| {
                let at = flat;
                flat += shape.iter().product::<usize>();
                (name, shape, at)
            })
            .collect();
        Self {
            client,
            round,
            tensors,
        }
    }
}

impl DeltaSource for GeneratedDelta {
    fn tensors(&self) -> Vec<(&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(n, s, _)| (n.as_str(), s.as_slice()))
            .collect()
    }

    fn read(&self, name: &str, offset: usize, out: &mut [f32]) -> io::Result<()> {
        let (_, shape, flat) =
            self.tensors
                .iter()
                .find(|(n, _, _)| n == name)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("no tensor '{name}'"))
                })?;
        if offset + out.len() > shape.iter().product::<usize>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{} is outside tensor '{name}'", out.len()),
            ));
        }
        delta_values(self.client, self.round, flat + offset, out);
        Ok(())
    }
}

/// SHA-256 (hex) of the little-endian f32 values of `model` in table order, the workload's
/// `sha256`. `None` if `model` lacks a tensor of `size`.
pub fn sha256_table_order(size: ModelSize, model: &ModelState) -> Option<String> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for (name, _) in size.tensors() {
        ctx.update(&f32_le_bytes(model.get(&name)?.data()));
    }
    Some(hex::encode(ctx.finish().as_ref()))
}

/// The workload's `sum64`: f64 sum of the values in table order, strictly left to right.
pub fn sum64_table_order(size: ModelSize, model: &ModelState) -> Option<f64> {
    let mut s = 0.0f64;
    for (name, _) in size.tensors() {
        for &v in model.get(&name)?.data() {
            s += f64::from(v);
        }
    }
    Some(s)
}

/// Published checksums of one `(K, P)` cell, as in `canonical_checksums.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct CellChecksums {
    #[serde(rename = "K")]
    pub clients: u32,
    /// Size label, `1M` or `10M` (or `tiny`).
    #[serde(rename = "p")]
    pub size: String,
    #[serde(rename = "P")]
    pub num_params: usize,
    pub rounds: Vec<RoundChecksum>,
}

/// Checksums of `G_r` after round `round` (1-based).
#[derive(Clone, Debug, Deserialize)]
pub struct RoundChecksum {
    pub round: u32,
    pub sha256: String,
    pub sum64: f64,
    pub sumabs64: f64,
}

/// Key of a cell in the checksum file, e.g. `4x1M`.
pub fn cell_key(clients: u32, size: ModelSize) -> String {
    format!("{clients}x{}", size.label())
}

/// Where the published checksums lie: `shared/bench/flower/results/canonical_checksums.json`
/// next to the repository, found from this crate's manifest directory.
pub fn checksums_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/bench/flower/results/canonical_checksums.json")
}

/// Reads the published checksums, keyed by [`cell_key`].
pub fn load_checksums(path: &Path) -> io::Result<BTreeMap<String, CellChecksums>> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A model of `size` whose tensors are filled by `fill(flat offset in table order, values)`.
fn build(size: ModelSize, mut fill: impl FnMut(usize, &mut [f32])) -> ModelState {
    let mut flat = 0;
    let pairs = size.tensors().into_iter().map(|(name, shape)| {
        let mut data = vec![0f32; shape.iter().product()];
        fill(flat, &mut data);
        flat += data.len();
        let t = Tensor::new(shape, data).expect("values sized from the shape");
        (name, t)
    });
    ModelState::from_tensors(pairs).expect("workload tensor names are unique")
}
