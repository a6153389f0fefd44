//! [`LrSpan`]: the stretch of a learning-rate cosine that one round's local training covers.
//!
//! # Why
//!
//! By default every round is a training run of its own: AdamW starts from zero moments, warms
//! up over up to a third of the round and decays a whole cosine to zero by its end. With rounds
//! of one local epoch, a small plant's round is 7 to 37 optimizer steps, so it spends a third
//! of them warming up and the rest decaying: its mean learning rate is about a third of the
//! plan's. A centralised run of the same epochs warms up once and decays once.
//!
//! With a cycle of N rounds (`[round] lr_cycle_rounds` of the coordinator), round r covers
//! `[k/N, (k+1)/N]` of one cosine, `k = (r - 1) mod N`: the rounds of a cycle together train
//! like one run, and plants carry their AdamW moments from one round of the cycle to the next
//! (no warm-up after the first). A cycle ends with the learning rate near zero; the next one
//! starts again at the peak (a warm restart), so a federation that runs for months keeps
//! learning. On DeepPCB, 7 plants, 15 rounds × 1 epoch: docs/simulations.md, "One cosine over
//! the rounds".

use serde::{Deserialize, Serialize};

/// Where a round's training starts and ends in the cosine, `0 <= start < end <= 1`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSpan {
    pub start: f64,
    pub end: f64,
}

/// A span that is not `0 <= start < end <= 1`.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "learning-rate span [{start}, {end}] must satisfy 0 <= start < end <= 1 (the part of the \
     cosine a round covers)"
)]
pub struct BadLrSpan {
    pub start: f64,
    pub end: f64,
}

impl LrSpan {
    /// The whole cosine: a round that is a training run of its own.
    pub const WHOLE: LrSpan = LrSpan {
        start: 0.0,
        end: 1.0,
    };

    pub fn new(start: f64, end: f64) -> Result<Self, BadLrSpan> {
        let ok = start.is_finite() && end.is_finite() && 0.0 <= start && start < end && end <= 1.0;
        if ok {
            Ok(Self { start, end })
        } else {
            Err(BadLrSpan { start, end })
        }
    }

    /// The span of round `round` (numbered from 1) in cycles of `cycle_rounds` rounds; `None`
    /// when `cycle_rounds` is 0 (every round its own cosine).
    pub fn for_round(round: u64, cycle_rounds: u64) -> Option<Self> {
        if cycle_rounds == 0 {
            return None;
        }
        let k = round.saturating_sub(1) % cycle_rounds;
        let n = cycle_rounds as f64;
        Some(Self {
            start: k as f64 / n,
            end: (k + 1) as f64 / n,
        })
    }

    /// Whether the round continues a cycle begun by an earlier round: a plant then keeps the
    /// AdamW moments of its previous round, if it has them.
    pub fn continues(&self) -> bool {
        self.start > 0.0
    }

    /// Whether the next round continues this one's cycle (this round does not end it), so
    /// that this round's AdamW moments are worth keeping for it.
    pub fn continued_by_next(&self) -> bool {
        self.end < 1.0
    }

    /// The position in the cosine when the round is `progress` (0 to 1) through its training.
    pub fn at(&self, progress: f64) -> f64 {
        self.start + progress.clamp(0.0, 1.0) * (self.end - self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_of_a_cycle_cover_the_cosine_end_to_end_and_the_next_cycle_restarts() {
        let spans: Vec<LrSpan> = (1..=7).map(|r| LrSpan::for_round(r, 3).unwrap()).collect();
        let third = 1.0 / 3.0;
        assert_eq!(
            spans[0],
            LrSpan {
                start: 0.0,
                end: third
            }
        );
        assert_eq!(
            spans[1],
            LrSpan {
                start: third,
                end: 2.0 / 3.0
            }
        );
        assert_eq!(
            spans[2],
            LrSpan {
                start: 2.0 / 3.0,
                end: 1.0
            }
        );
        assert_eq!(spans[3], spans[0], "round 4 starts the second cycle");
        assert_eq!(spans[6], spans[0]);
        assert!(!spans[0].continues() && spans[1].continues() && spans[2].continues());
        assert!(!spans[3].continues());
        assert!(spans[0].continued_by_next() && spans[1].continued_by_next());
        assert!(!spans[2].continued_by_next(), "round 3 ends the cycle");
        for w in spans[..3].windows(2) {
            assert_eq!(w[0].end, w[1].start, "no gap and no overlap between rounds");
        }
        assert_eq!(LrSpan::for_round(5, 0), None);
        assert_eq!(LrSpan::for_round(0, 4), LrSpan::for_round(1, 4));
    }

    #[test]
    fn a_round_maps_its_own_progress_into_its_stretch() {
        let s = LrSpan::new(0.25, 0.5).unwrap();
        assert_eq!(s.at(0.0), 0.25);
        assert_eq!(s.at(0.5), 0.375);
        assert_eq!(s.at(1.0), 0.5);
        assert_eq!(s.at(7.0), 0.5);
        assert_eq!(LrSpan::WHOLE.at(0.3), 0.3);
    }

    #[test]
    fn impossible_spans_are_refused() {
        for (a, b) in [
            (0.5, 0.5),
            (0.6, 0.5),
            (-0.1, 0.5),
            (0.0, 1.5),
            (f64::NAN, 1.0),
        ] {
            assert!(LrSpan::new(a, b).is_err(), "[{a}, {b}]");
        }
        assert!(LrSpan::new(0.0, 1.0).is_ok());
    }
}
