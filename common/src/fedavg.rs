//! Federated averaging: the canonical FedAvg that defines every published model, the streaming
//! accumulator that folds uploads in as they arrive, the [`Strategy`] trait they serve, and the
//! robust strategies next to FedAvg ([`CoordinateMedian`], [`TrimmedMean`]).
//!
//! FedAvg moves the global model by the sample-weighted mean of the plants' deltas:
//!
//! ```text
//! new = base + sum_k(n_k * delta_k) / sum_k(n_k)        n_k: plant k's sample count (u64)
//! ```
//!
//! Per element, both paths below compute it in f64 and round once:
//! `new[i] = ((base[i] as f64) + acc[i] / (N as f64)) as f32`, with
//! `acc[i] = sum_k (n_k as f64) * (delta_k[i] as f64)` and `N = sum_k n_k`. Each product is
//! rounded to f64 and then added; nothing is ever fused into an FMA, so every CPU gives the same
//! bits. On the benchmark workload (`bench/WORKLOAD.md`) this is exactly its canonical formula.
//!
//! # The canonical path defines the published model
//!
//! [`aggregate_canonical`] (and [`FedAvg`], the [`Strategy`] that calls it) accumulates in a
//! fixed order: the plants sorted by id, per element. It reads each delta through
//! [`DeltaSource`], by ranges, in tiles of [`TILE`] values whose f64 accumulator stays in L2,
//! so each delta streams from memory (or from its blob file) once. Neither the order of the
//! updates, nor the tile size, nor where the deltas live changes a bit of the result: after a
//! crash the coordinator recomputes the same model from the stored uploads. **The published
//! model of a round is always the canonical one.**
//!
//! # The streaming path, and when it gives the same bits
//!
//! [`StreamingFedAvg`] keeps one f64 accumulator of the model's size (O(P) memory, whatever the
//! number of plants) and adds each plant's values in arrival order, so the average is ready as
//! soon as the last value arrived. f64 addition is not associative, so in general its result can
//! differ from the canonical one in the last bit. It is bit-identical whenever every product and
//! every partial sum is exact, because then no order rounds anything: for instance when all
//! `n_k * delta_k[i]` are multiples of one power of two `q` and `sum_k |n_k * delta_k[i]| <
//! 2^53 q`, with `n_k < 2^29` so that the f32-by-integer products are exact. The workload is such
//! a case (`delta = D * 2^-24` with small integers `D`, `n_k <= 6400`), and the streaming
//! result matches its published checksums. Outside that case the streaming result is a
//! preview within rounding of the canonical model: publish the canonical one. Between rounds,
//! [`StreamingFedAvg::reset`] reuses the accumulator's memory rather than paying for fresh pages.
//!
//! # Discarding a plant whose stream failed
//!
//! A plant's values go into the shared accumulator as they arrive, and a plant whose stream
//! fails is taken out again by subtracting the values it had delivered, read back from the
//! stored upload ([`StreamingFedAvg::discard_plant`]). The other way, a staging buffer per
//! upload folded in at commit, costs 4 bytes per parameter for every upload in flight: with K
//! plants uploading at once that is K model copies, which is the memory streaming is meant to
//! save. The coordinator stores every upload anyway (the canonical recomputation reads it), so
//! the values to subtract are at hand and a failure costs one more read of that upload.
//! Subtraction undoes an addition exactly whenever the sums were exact, the same condition under
//! which streaming equals canonical; otherwise the streaming preview is off by rounding, and the
//! published model, computed canonically without the failed plant, is unaffected. If the
//! upload cannot be read back, the accumulator refuses further use ([`FedAvgError::Poisoned`])
//! and the round is aggregated canonically. A whole delta given to [`StreamingFedAvg::add`] has
//! its layout checked before any value is added; a NaN or infinity found part-way takes the
//! plant out again, subtracting from that same delta.
//!
//! # Robust strategies
//!
//! [`CoordinateMedian`] and [`TrimmedMean`] replace the weighted mean by a per-coordinate
//! median or trimmed mean of the plants' deltas, one vote per plant, so that one plant's
//! boosted, sign-flipped or over-weighted delta cannot drag the model far. They share one
//! engine (`coordinate`): the same validation as FedAvg, then K tiles of
//! [`COORDINATE_TILE`] values read from the [`DeltaSource`]s (memory O(K × tile + P)), each
//! coordinate's values sorted before they are reduced, so that the result depends on the set
//! of updates only, bit for bit, whatever their order, the tile size or where they live.
//!
//! # Refusals
//!
//! Every refusal is its own [`FedAvgError`] variant naming the plant and tensor: no plants, a
//! duplicate plant id, a total weight of zero (a plant of zero weight is allowed and adds
//! nothing), a weight sum overflowing u64, a missing, extra or reshaped tensor, a non-finite
//! value, and a float32 overflow of the average.

mod canonical;
mod coordinate;
mod error;
mod kernels;
mod layout;
mod median;
mod server_step;
mod source;
mod strategy;
mod stream;
mod trimmed_mean;
pub mod workload;

pub use canonical::{aggregate_canonical, aggregate_canonical_part, TILE};
pub use coordinate::COORDINATE_TILE;
pub use error::FedAvgError;
pub use median::CoordinateMedian;
pub use server_step::{
    is_running_statistic, step_name, BadServerLr, BadServerMomentum, ServerStep, MAX_SERVER_LR,
    MAX_SERVER_MOMENTUM,
};
pub use source::{DeltaSource, PlantUpdate};
pub use strategy::{FedAvg, Strategy};
pub use stream::StreamingFedAvg;
pub use trimmed_mean::{BadTrimFraction, TrimmedMean};

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod robust_prop_tests;
#[cfg(test)]
mod robust_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod workload_tests;
