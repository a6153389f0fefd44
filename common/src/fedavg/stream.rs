//! The streaming FedAvg accumulator: folds each plant's delta into one f64 accumulator as the
//! decoder delivers it, so memory stays O(P) whatever the number of plants.

use std::collections::BTreeMap;

use ndarray::Array1;

use super::canonical::TILE;
use super::error::FedAvgError;
use super::kernels;
use super::layout::Layout;
use super::source::DeltaSource;
use crate::model::ModelState;

/// Running FedAvg of one round: `acc[i] = sum over committed plants of n_k * delta_k[i]`.
///
/// A plant's upload is `begin_plant`, any number of `add_values`, then `commit_plant` once
/// every value of every tensor arrived, or `discard_plant` when its stream failed. Values are
/// added to the shared accumulator as they arrive; a discarded plant is taken out again by
/// subtracting the values it had delivered (see the module docs of [`crate::fedavg`] for why,
/// and for when the result equals the canonical one). Several plants may be open at once.
#[derive(Debug)]
pub struct StreamingFedAvg {
    layout: Layout,
    acc: Array1<f64>,
    committed: BTreeMap<String, u64>,
    open: BTreeMap<String, OpenPlant>,
    /// Weight of the committed plants, `N` at the end.
    total: u64,
    /// Weight of the committed and the open plants: checked at `begin_plant`, so that a
    /// commit cannot overflow.
    reserved: u64,
    /// The plant whose undo failed; the accumulator is unusable from then on.
    poisoned: Option<String>,
}

#[derive(Debug)]
struct OpenPlant {
    num_samples: u64,
    /// Per tensor of the layout, how many values (a prefix) were added.
    received: Vec<usize>,
}

impl StreamingFedAvg {
    /// An empty accumulator for models laid out as `base` (names and shapes; values unused).
    pub fn begin(base: &ModelState) -> Self {
        let layout = Layout::of(base);
        let acc = Array1::zeros(layout.total());
        Self {
            layout,
            acc,
            committed: BTreeMap::new(),
            open: BTreeMap::new(),
            total: 0,
            reserved: 0,
            poisoned: None,
        }
    }

    /// Starts the next round as [`begin`](Self::begin) would, but keeps the accumulator's
    /// memory when `base` has as many values: fresh pages cost more than the zeroing (in a VM,
    /// first-touch page faults run ~15 times slower than a second pass over the same memory).
    pub fn reset(&mut self, base: &ModelState) {
        self.layout = Layout::of(base);
        if self.acc.len() == self.layout.total() {
            self.acc.fill(0.0);
        } else {
            self.acc = Array1::zeros(self.layout.total());
        }
        self.committed.clear();
        self.open.clear();
        self.total = 0;
        self.reserved = 0;
        self.poisoned = None;
    }

    /// Adds a whole delta and commits it. Its layout is checked before any value is added; on
    /// a non-finite value the values added so far are subtracted again (as by
    /// [`discard_plant`](Self::discard_plant)), so the plant is not counted.
    pub fn add(
        &mut self,
        plant: &str,
        delta: &ModelState,
        num_samples: u64,
    ) -> Result<(), FedAvgError> {
        self.usable()?;
        if self.committed.contains_key(plant) || self.open.contains_key(plant) {
            return Err(FedAvgError::DuplicatePlant(plant.to_string()));
        }
        self.layout.check(plant, delta)?;
        self.begin_plant(plant, num_samples)?;
        for (name, t) in delta.iter() {
            if let Err(e) = self.add_values(plant, name, 0, t.data()) {
                self.discard_plant(plant, delta)?;
                return Err(e);
            }
        }
        self.commit_plant(plant)
    }

    /// Opens the upload of `plant`, whose weight is `num_samples`.
    pub fn begin_plant(&mut self, plant: &str, num_samples: u64) -> Result<(), FedAvgError> {
        self.usable()?;
        if self.committed.contains_key(plant) || self.open.contains_key(plant) {
            return Err(FedAvgError::DuplicatePlant(plant.to_string()));
        }
        self.reserved =
            self.reserved
                .checked_add(num_samples)
                .ok_or_else(|| FedAvgError::WeightOverflow {
                    plant: plant.to_string(),
                    num_samples,
                })?;
        self.open.insert(
            plant.to_string(),
            OpenPlant {
                num_samples,
                received: vec![0; self.layout.entries().len()],
            },
        );
        Ok(())
    }

    /// Adds `values`, the values `offset..offset + values.len()` of tensor `tensor` of an open
    /// plant. Each tensor's values must come in order, without gap or repeat; tensors may come
    /// in any order and interleave. On error the plant can only be discarded: a non-finite
    /// value is refused after the values before it were added (they count as delivered).
    pub fn add_values(
        &mut self,
        plant: &str,
        tensor: &str,
        offset: usize,
        values: &[f32],
    ) -> Result<(), FedAvgError> {
        self.usable()?;
        let p = self
            .open
            .get_mut(plant)
            .ok_or_else(|| FedAvgError::NotOpen(plant.to_string()))?;
        let t = self
            .layout
            .position(tensor)
            .ok_or_else(|| FedAvgError::UnexpectedTensor {
                plant: plant.to_string(),
                tensor: tensor.to_string(),
            })?;
        let e = &self.layout.entries()[t];
        if offset != p.received[t] {
            return Err(FedAvgError::OutOfOrder {
                plant: plant.to_string(),
                tensor: tensor.to_string(),
                offset,
                expected: p.received[t],
            });
        }
        let end = offset
            .checked_add(values.len())
            .filter(|&end| end <= e.numel)
            .ok_or_else(|| FedAvgError::OutOfRange {
                plant: plant.to_string(),
                tensor: tensor.to_string(),
                offset,
                end: offset.saturating_add(values.len()),
                numel: e.numel,
            })?;
        if p.num_samples > 0 {
            let acc = self.acc.as_slice_mut().expect("a new Array1 is contiguous");
            let acc = &mut acc[e.offset + offset..e.offset + end];
            // Check a cache-sized chunk, then add it while it is still in cache.
            let w = p.num_samples as f64;
            for (c, (a, x)) in acc.chunks_mut(TILE).zip(values.chunks(TILE)).enumerate() {
                if let Some(i) = kernels::first_non_finite(x) {
                    // The chunks before this one were added: they count as delivered.
                    p.received[t] = offset + c * TILE;
                    return Err(FedAvgError::NonFinite {
                        plant: plant.to_string(),
                        tensor: tensor.to_string(),
                        index: offset + c * TILE + i,
                    });
                }
                kernels::accumulate(a, &[(w, x)]);
            }
        }
        p.received[t] = end;
        Ok(())
    }

    /// Counts an open plant in, once every value of every tensor arrived.
    pub fn commit_plant(&mut self, plant: &str) -> Result<(), FedAvgError> {
        self.usable()?;
        let p = self
            .open
            .get(plant)
            .ok_or_else(|| FedAvgError::NotOpen(plant.to_string()))?;
        for (e, &received) in self.layout.entries().iter().zip(&p.received) {
            if received != e.numel {
                return Err(FedAvgError::Incomplete {
                    plant: plant.to_string(),
                    tensor: e.name.clone(),
                    received,
                    numel: e.numel,
                });
            }
        }
        let p = self.open.remove(plant).expect("looked up just above");
        // Cannot overflow: `reserved` >= `total` + this weight was checked at begin_plant.
        self.total += p.num_samples;
        self.committed.insert(plant.to_string(), p.num_samples);
        Ok(())
    }

    /// Takes an open plant out: subtracts the values it delivered, read back from `delivered`
    /// (the stored upload, or whatever holds the same values), tensor by tensor up to where
    /// the plant got. The plant may then begin again. If `delivered` cannot be read, the
    /// accumulator is poisoned and every later call fails with [`FedAvgError::Poisoned`].
    pub fn discard_plant(
        &mut self,
        plant: &str,
        delivered: &dyn DeltaSource,
    ) -> Result<(), FedAvgError> {
        self.usable()?;
        let p = self
            .open
            .remove(plant)
            .ok_or_else(|| FedAvgError::NotOpen(plant.to_string()))?;
        self.reserved -= p.num_samples;
        if p.num_samples == 0 {
            return Ok(());
        }
        let minus_w = -(p.num_samples as f64);
        let acc = self.acc.as_slice_mut().expect("a new Array1 is contiguous");
        let mut buf = Vec::new();
        for (e, &received) in self.layout.entries().iter().zip(&p.received) {
            let acc = &mut acc[e.offset..e.offset + received];
            if let Some(s) = delivered.as_slice(&e.name).and_then(|s| s.get(..received)) {
                kernels::accumulate(acc, &[(minus_w, s)]);
                continue;
            }
            for (c, a) in acc.chunks_mut(TILE).enumerate() {
                buf.resize(a.len(), 0.0);
                if let Err(source) = delivered.read(&e.name, c * TILE, &mut buf) {
                    self.poisoned = Some(plant.to_string());
                    return Err(FedAvgError::Read {
                        plant: plant.to_string(),
                        tensor: e.name.clone(),
                        source,
                    });
                }
                kernels::accumulate(a, &[(minus_w, &buf)]);
            }
        }
        Ok(())
    }

    /// Plants counted in so far, with their sample counts, in id order.
    pub fn committed(&self) -> impl Iterator<Item = (&str, u64)> {
        self.committed.iter().map(|(k, &n)| (k.as_str(), n))
    }

    /// Plants begun and neither committed nor discarded yet.
    pub fn open_plants(&self) -> usize {
        self.open.len()
    }

    /// `N`, the sample count of the committed plants.
    pub fn total_samples(&self) -> u64 {
        self.total
    }

    /// The average: `((base[i] as f64) + acc[i] / (N as f64)) as f32` per element. `base` must
    /// have the layout given to [`begin`](Self::begin).
    pub fn finish(self, base: &ModelState) -> Result<ModelState, FedAvgError> {
        self.average(base)
    }

    /// The same as [`finish`](Self::finish), keeping the accumulator for [`reset`](Self::reset).
    pub fn average(&self, base: &ModelState) -> Result<ModelState, FedAvgError> {
        self.usable()?;
        if let Some(plant) = self.open.keys().next() {
            return Err(FedAvgError::StillOpen(plant.clone()));
        }
        if self.committed.is_empty() {
            return Err(FedAvgError::NoPlants);
        }
        if self.total == 0 {
            return Err(FedAvgError::ZeroTotalWeight);
        }
        self.layout.check_base(base)?;
        let acc = self.acc.as_slice().expect("a new Array1 is contiguous");
        let total = self.total as f64;
        let mut tile = vec![0f32; TILE.min(self.layout.total())];
        let mut outs = Vec::with_capacity(self.layout.entries().len());
        for (e, (_, t)) in self.layout.entries().iter().zip(base.iter()) {
            let mut out = Vec::with_capacity(e.numel);
            let acc = &acc[e.offset..e.offset + e.numel];
            for (b, a) in t.data().chunks(TILE).zip(acc.chunks(TILE)) {
                let o = &mut tile[..b.len()];
                kernels::average(o, b, a, total);
                if let Some(i) = kernels::first_non_finite(o) {
                    let (tensor, index) = (e.name.clone(), out.len() + i);
                    // Deltas were checked on arrival, so only the base or an overflow is left.
                    return Err(if b[i].is_finite() {
                        FedAvgError::Overflow { tensor, index }
                    } else {
                        FedAvgError::NonFiniteBase { tensor, index }
                    });
                }
                out.extend_from_slice(o);
            }
            outs.push(out);
        }
        Ok(self.layout.assemble(outs))
    }

    /// Compares the average (as [`average`](Self::average) would compute it) with `other`
    /// bit for bit, tile by tile, without building it: returns how many values differ and the
    /// largest absolute difference. `other` must have `base`'s layout.
    pub fn compare_average(
        &self,
        base: &ModelState,
        other: &ModelState,
    ) -> Result<(usize, f64), FedAvgError> {
        self.usable()?;
        if let Some(plant) = self.open.keys().next() {
            return Err(FedAvgError::StillOpen(plant.clone()));
        }
        if self.total == 0 {
            return Err(FedAvgError::ZeroTotalWeight);
        }
        self.layout.check_base(base)?;
        self.layout.check_base(other)?;
        let acc = self.acc.as_slice().expect("a new Array1 is contiguous");
        let total = self.total as f64;
        let mut tile = vec![0f32; TILE.min(self.layout.total())];
        let (mut differing, mut max_abs) = (0usize, 0f64);
        for ((e, (_, b)), (_, o)) in self
            .layout
            .entries()
            .iter()
            .zip(base.iter())
            .zip(other.iter())
        {
            let acc = &acc[e.offset..e.offset + e.numel];
            for ((b, a), o) in b
                .data()
                .chunks(TILE)
                .zip(acc.chunks(TILE))
                .zip(o.data().chunks(TILE))
            {
                let t = &mut tile[..b.len()];
                kernels::average(t, b, a, total);
                for (&x, &y) in t.iter().zip(o) {
                    if x.to_bits() != y.to_bits() {
                        differing += 1;
                        max_abs = max_abs.max((f64::from(x) - f64::from(y)).abs());
                    }
                }
            }
        }
        Ok((differing, max_abs))
    }

    fn usable(&self) -> Result<(), FedAvgError> {
        match &self.poisoned {
            Some(plant) => Err(FedAvgError::Poisoned {
                plant: plant.clone(),
            }),
            None => Ok(()),
        }
    }
}
