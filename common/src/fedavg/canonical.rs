//! The canonical FedAvg: the deterministic, tiled computation whose result is the published
//! model of a round.

use super::error::FedAvgError;
use super::kernels::{self, MAX_FUSED};
use super::layout::{Entry, Layout};
use super::source::PlantUpdate;
use crate::model::{ModelState, Tensor};

/// Values per accumulator tile: 32 Ki f64 (256 KiB) stay in L2 while every delta streams
/// through once. The tile size never changes the result, only the speed.
pub const TILE: usize = 32 * 1024;

/// Averages `updates` onto `base`, canonically.
///
/// Per element `i` of every tensor, with the plants of positive weight in ascending byte order
/// of their ids:
///
/// ```text
/// acc = 0.0_f64
/// for k in plants: acc = acc + (n_k as f64) * (delta_k[i] as f64)   // product rounded, then sum
/// new[i] = ((base[i] as f64) + acc / (N as f64)) as f32             // N = sum of all n_k
/// ```
///
/// The order of `updates` does not matter, nor the tile size, nor whether a delta is in memory
/// or read from a file: a recomputation after a crash gives the same bits. Updates are
/// validated first (see [`FedAvgError`]); a plant with `num_samples == 0` is checked for its
/// layout but its values are never read.
pub fn aggregate_canonical(
    base: &ModelState,
    updates: &[PlantUpdate<'_>],
) -> Result<ModelState, FedAvgError> {
    let part = aggregate_canonical_part(base, updates, 0, 1)?;
    Ok(ModelState::from_tensors(part).expect("layout names come from a valid ModelState"))
}

/// Part `part` of `parts` of [`aggregate_canonical`]: the same values, for only the tensors
/// of that part, so that one aggregation can run on several threads (each with its own
/// [`DeltaSource`](super::DeltaSource)s) and be put together with [`ModelState::from_tensors`].
/// The tensors are dealt out by size (largest first, each to the part with the fewest values
/// so far, ties by name), a split that depends on the base layout only. Every part validates
/// the whole round, so each refuses a bad one the same way.
pub fn aggregate_canonical_part(
    base: &ModelState,
    updates: &[PlantUpdate<'_>],
    part: usize,
    parts: usize,
) -> Result<Vec<(String, Tensor)>, FedAvgError> {
    assert!(part < parts, "part {part} of {parts}");
    let plan = Plan::new(base, updates)?;
    let mine: Vec<&Entry> = split(plan.layout.entries(), parts)
        .into_iter()
        .nth(part)
        .unwrap_or_default();
    let tile = TILE.min(mine.iter().map(|e| e.numel).max().unwrap_or(0));
    let (mut acc, mut out_buf) = (vec![0f64; tile], vec![0f32; tile]);
    let mut scratch: Vec<Vec<f32>> = Vec::new();
    let mut outs = Vec::with_capacity(mine.len());
    for e in mine {
        let values = plan.average_tensor(base, e, &mut acc, &mut out_buf, &mut scratch)?;
        let t = Tensor::new(e.shape.clone(), values)
            .expect("fedavg writes exactly numel values per tensor of the layout");
        outs.push((e.name.clone(), t));
    }
    Ok(outs)
}

/// Deals the entries out to `parts` parts: largest first, to the part with the fewest values.
pub(crate) fn split(entries: &[Entry], parts: usize) -> Vec<Vec<&Entry>> {
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by(|a, b| b.numel.cmp(&a.numel).then_with(|| a.name.cmp(&b.name)));
    let mut out: Vec<(usize, Vec<&Entry>)> = (0..parts.max(1)).map(|_| (0, Vec::new())).collect();
    for e in order {
        let (load, list) = out
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("at least one part");
        *load += e.numel;
        list.push(e);
    }
    out.into_iter()
        .map(|(_, mut list)| {
            list.sort_by(|a, b| a.name.cmp(&b.name));
            list
        })
        .collect()
}

/// A validated round: the layout, the contributing plants in canonical order and `N`.
struct Plan<'u, 'a> {
    layout: Layout,
    contributors: Vec<&'u PlantUpdate<'a>>,
    total: u64,
}

impl<'u, 'a> Plan<'u, 'a> {
    fn new(base: &ModelState, updates: &'u [PlantUpdate<'a>]) -> Result<Self, FedAvgError> {
        if updates.is_empty() {
            return Err(FedAvgError::NoPlants);
        }
        let mut sorted: Vec<&PlantUpdate<'a>> = updates.iter().collect();
        sorted.sort_by(|a, b| a.plant.cmp(&b.plant));
        if let Some(w) = sorted.windows(2).find(|w| w[0].plant == w[1].plant) {
            return Err(FedAvgError::DuplicatePlant(w[0].plant.clone()));
        }
        let mut total = 0u64;
        for u in &sorted {
            total =
                total
                    .checked_add(u.num_samples)
                    .ok_or_else(|| FedAvgError::WeightOverflow {
                        plant: u.plant.clone(),
                        num_samples: u.num_samples,
                    })?;
        }
        if total == 0 {
            return Err(FedAvgError::ZeroTotalWeight);
        }
        let layout = Layout::of(base);
        for u in &sorted {
            layout.check(&u.plant, u.delta)?;
        }
        sorted.retain(|u| u.num_samples > 0);
        Ok(Self {
            layout,
            contributors: sorted,
            total,
        })
    }

    /// One tensor, tile by tile: zero the tile, fold in the plants (up to [`MAX_FUSED`] per
    /// pass, in order), then write the average of the tile.
    fn average_tensor(
        &self,
        base: &ModelState,
        e: &Entry,
        acc: &mut [f64],
        out_buf: &mut [f32],
        scratch: &mut Vec<Vec<f32>>,
    ) -> Result<Vec<f32>, FedAvgError> {
        let base_data = base
            .get(&e.name)
            .expect("the layout was taken from this base")
            .data();
        let in_memory: Vec<Option<&[f32]>> = self
            .contributors
            .iter()
            .map(|u| u.delta.as_slice(&e.name).filter(|s| s.len() == e.numel))
            .collect();
        // Built by appending finished tiles: no zeroing pass over the output.
        let mut out = Vec::with_capacity(e.numel);
        let mut start = 0;
        while start < e.numel {
            let end = (start + TILE).min(e.numel);
            let tile = &mut acc[..end - start];
            tile.fill(0.0);
            for (g, group) in self.contributors.chunks(MAX_FUSED).enumerate() {
                let slices = &in_memory[g * MAX_FUSED..g * MAX_FUSED + group.len()];
                self.read_missing(group, slices, e, start, end, scratch)?;
                let terms: Vec<(f64, &[f32])> = group
                    .iter()
                    .zip(slices)
                    .zip(scratch.iter())
                    .map(|((u, s), buf)| {
                        let x = match s {
                            Some(s) => &s[start..end],
                            None => &buf[..end - start],
                        };
                        // Exact below 2^53 samples; above, the same rounding every time.
                        (u.num_samples as f64, x)
                    })
                    .collect();
                kernels::accumulate(tile, &terms);
            }
            let out_tile = &mut out_buf[..end - start];
            kernels::average(out_tile, &base_data[start..end], tile, self.total as f64);
            if let Some(i) = kernels::first_non_finite(out_tile) {
                return Err(self.blame(base_data, e, start + i));
            }
            out.extend_from_slice(out_tile);
            start = end;
        }
        Ok(out)
    }

    /// Copies the tile of every plant of `group` that is not in memory into `scratch`.
    fn read_missing(
        &self,
        group: &[&PlantUpdate<'_>],
        slices: &[Option<&[f32]>],
        e: &Entry,
        start: usize,
        end: usize,
        scratch: &mut Vec<Vec<f32>>,
    ) -> Result<(), FedAvgError> {
        if scratch.len() < group.len() {
            // Slots for in-memory plants stay empty; a slot is sized on its first use.
            scratch.resize_with(group.len(), Vec::new);
        }
        for ((u, s), buf) in group.iter().zip(slices).zip(scratch.iter_mut()) {
            if s.is_some() {
                continue;
            }
            if buf.len() < TILE {
                buf.resize(TILE, 0.0);
            }
            u.delta
                .read(&e.name, start, &mut buf[..end - start])
                .map_err(|source| FedAvgError::Read {
                    plant: u.plant.clone(),
                    tensor: e.name.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Names the cause of a non-finite average at `index` of tensor `e`.
    fn blame(&self, base_data: &[f32], e: &Entry, index: usize) -> FedAvgError {
        if !base_data[index].is_finite() {
            return FedAvgError::NonFiniteBase {
                tensor: e.name.clone(),
                index,
            };
        }
        for u in &self.contributors {
            let mut v = [0f32];
            if let Some(s) = u.delta.as_slice(&e.name).filter(|s| s.len() == e.numel) {
                v[0] = s[index];
            } else if let Err(source) = u.delta.read(&e.name, index, &mut v) {
                return FedAvgError::Read {
                    plant: u.plant.clone(),
                    tensor: e.name.clone(),
                    source,
                };
            }
            if !v[0].is_finite() {
                return FedAvgError::NonFinite {
                    plant: u.plant.clone(),
                    tensor: e.name.clone(),
                    index,
                };
            }
        }
        FedAvgError::Overflow {
            tensor: e.name.clone(),
            index,
        }
    }
}
