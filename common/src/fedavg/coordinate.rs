//! The engine the robust strategies share: the round validated as FedAvg validates it, then,
//! tile by tile, every plant's values of one coordinate gathered and handed to a reducer
//! (median, trimmed mean) that returns the step for that coordinate.
//!
//! Memory is K tiles of [`COORDINATE_TILE`] f32 values plus the output (O(K × tile + P)),
//! never K whole deltas. The values of one coordinate are sorted before the reducer sees them
//! ([`f32::total_cmp`], so `-0.0` sorts before `+0.0`), which makes the result a function of
//! the multiset of values alone: neither the order of the updates nor the tile size nor where
//! the deltas live changes a bit, and a restarted coordinator recomputes the same model.

use super::canonical::split;
use super::error::FedAvgError;
use super::kernels;
use super::layout::{Entry, Layout};
use super::source::PlantUpdate;
use crate::model::{ModelState, Tensor};

/// Values per plant per tile: 4 Ki f32 (16 KiB) per plant, so 64 plants gather 1 MiB. The
/// tile size never changes the result, only the speed.
pub const COORDINATE_TILE: usize = 4 * 1024;

/// Turns the sorted values of one coordinate (one per contributing plant, ascending, all
/// finite, at least one) into the f64 step added to the base value.
pub(crate) trait Reducer {
    fn reduce(&self, sorted: &[f32]) -> f64;
}

/// The plants that vote: validated like FedAvg (no plants, duplicate ids, layouts), then the
/// plants that trained on no sample left out, as FedAvg gives them no weight.
pub(crate) fn voters<'u, 'a>(
    base: &ModelState,
    updates: &'u [PlantUpdate<'a>],
) -> Result<(Layout, Vec<&'u PlantUpdate<'a>>), FedAvgError> {
    if updates.is_empty() {
        return Err(FedAvgError::NoPlants);
    }
    let mut sorted: Vec<&PlantUpdate<'a>> = updates.iter().collect();
    sorted.sort_by(|a, b| a.plant.cmp(&b.plant));
    if let Some(w) = sorted.windows(2).find(|w| w[0].plant == w[1].plant) {
        return Err(FedAvgError::DuplicatePlant(w[0].plant.clone()));
    }
    let layout = Layout::of(base);
    for u in &sorted {
        layout.check(&u.plant, u.delta)?;
    }
    sorted.retain(|u| u.num_samples > 0);
    if sorted.is_empty() {
        return Err(FedAvgError::ZeroTotalWeight);
    }
    Ok((layout, sorted))
}

/// Part `part` of `parts` of the model the reducer defines, with tiles of `tile` values; the
/// tensors are dealt out to parts as [`aggregate_canonical_part`](super::aggregate_canonical_part)
/// deals them.
pub(crate) fn aggregate_part(
    reducer: &dyn Reducer,
    base: &ModelState,
    updates: &[PlantUpdate<'_>],
    part: usize,
    parts: usize,
    tile: usize,
) -> Result<Vec<(String, Tensor)>, FedAvgError> {
    assert!(part < parts, "part {part} of {parts}");
    assert!(tile > 0, "a tile holds at least one value");
    let (layout, voters) = voters(base, updates)?;
    let mine: Vec<&Entry> = split(layout.entries(), parts)
        .into_iter()
        .nth(part)
        .unwrap_or_default();
    let tile = tile
        .min(mine.iter().map(|e| e.numel).max().unwrap_or(0))
        .max(1);
    let mut tiles: Vec<Vec<f32>> = vec![vec![0f32; tile]; voters.len()];
    let mut outs = Vec::with_capacity(mine.len());
    for e in mine {
        let values = reduce_tensor(reducer, base, &voters, e, tile, &mut tiles)?;
        let t = Tensor::new(e.shape.clone(), values)
            .expect("the reducer writes exactly numel values per tensor of the layout");
        outs.push((e.name.clone(), t));
    }
    Ok(outs)
}

/// The whole model: [`aggregate_part`] as one part.
pub(crate) fn aggregate(
    reducer: &dyn Reducer,
    base: &ModelState,
    updates: &[PlantUpdate<'_>],
    tile: usize,
) -> Result<ModelState, FedAvgError> {
    let tensors = aggregate_part(reducer, base, updates, 0, 1, tile)?;
    Ok(ModelState::from_tensors(tensors).expect("layout names come from a valid ModelState"))
}

/// One tensor, tile by tile: read every voter's tile, refuse a non-finite value, then per
/// coordinate sort the voters' values and write `base + step` rounded once to f32.
fn reduce_tensor(
    reducer: &dyn Reducer,
    base: &ModelState,
    voters: &[&PlantUpdate<'_>],
    e: &Entry,
    tile: usize,
    tiles: &mut [Vec<f32>],
) -> Result<Vec<f32>, FedAvgError> {
    let base_data = base
        .get(&e.name)
        .expect("the layout was taken from this base")
        .data();
    let mut column = vec![0f32; voters.len()];
    let mut out = Vec::with_capacity(e.numel);
    let mut start = 0;
    while start < e.numel {
        let end = (start + tile).min(e.numel);
        let len = end - start;
        for (u, buf) in voters.iter().zip(tiles.iter_mut()) {
            read_tile(u, e, start, &mut buf[..len])?;
            if let Some(i) = kernels::first_non_finite(&buf[..len]) {
                return Err(FedAvgError::NonFinite {
                    plant: u.plant.clone(),
                    tensor: e.name.clone(),
                    index: start + i,
                });
            }
        }
        for i in 0..len {
            for (c, buf) in column.iter_mut().zip(tiles.iter()) {
                *c = buf[i];
            }
            column.sort_unstable_by(f32::total_cmp);
            let b = base_data[start + i];
            let v = (f64::from(b) + reducer.reduce(&column)) as f32;
            if !v.is_finite() {
                return Err(if b.is_finite() {
                    FedAvgError::Overflow {
                        tensor: e.name.clone(),
                        index: start + i,
                    }
                } else {
                    FedAvgError::NonFiniteBase {
                        tensor: e.name.clone(),
                        index: start + i,
                    }
                });
            }
            out.push(v);
        }
        start = end;
    }
    Ok(out)
}

/// Values `start..start + out.len()` of tensor `e` of plant `u`, from memory when they lie
/// there, else through [`DeltaSource::read`](super::DeltaSource::read).
fn read_tile(
    u: &PlantUpdate<'_>,
    e: &Entry,
    start: usize,
    out: &mut [f32],
) -> Result<(), FedAvgError> {
    if let Some(s) = u.delta.as_slice(&e.name).filter(|s| s.len() == e.numel) {
        out.copy_from_slice(&s[start..start + out.len()]);
        return Ok(());
    }
    u.delta
        .read(&e.name, start, out)
        .map_err(|source| FedAvgError::Read {
            plant: u.plant.clone(),
            tensor: e.name.clone(),
            source,
        })
}
