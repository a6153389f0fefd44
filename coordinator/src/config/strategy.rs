//! The `[aggregation]` section: which [`Strategy`](fedinspect_common::fedavg::Strategy)
//! turns a round's accepted updates into the next model, and its validation.
//!
//! ```toml
//! [aggregation]
//! strategy = "fedavg"      # "fedavg" (default), "median" or "trimmed_mean"
//! trim_fraction = 0.2      # trimmed_mean only: share of plants dropped at each end, 0 <= f < 0.5
//! ```

use fedinspect_common::config_problems::Problems;
use fedinspect_common::fedavg::TrimmedMean;
use serde::Deserialize;

/// `[aggregation]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAggregation {
    pub strategy: Option<String>,
    pub trim_fraction: Option<f64>,
}

/// The aggregation a round uses; see `docs/reliability.md` for how to choose.
#[derive(Clone, Debug, PartialEq)]
pub enum AggregationStrategy {
    /// Sample-weighted mean (the canonical FedAvg). The default.
    FedAvg,
    /// Coordinate-wise median, one vote per plant.
    Median,
    /// Coordinate-wise mean after dropping `floor(trim_fraction × K)` values at each end
    /// (the fraction validated when the strategy was made).
    TrimmedMean(TrimmedMean),
}

/// `trim_fraction` when none is written: one plant of five dropped at each end.
pub const DEFAULT_TRIM_FRACTION: f64 = 0.2;

/// Resolves `[aggregation]`, pushing every problem to `p`. A trimmed mean that would trim no
/// plant at `target_participants` is refused: it would be a plain unweighted mean that
/// protects nothing.
pub fn aggregation_strategy(
    raw: RawAggregation,
    target_participants: u32,
    p: &mut Problems,
) -> AggregationStrategy {
    let fraction = raw.trim_fraction.unwrap_or(DEFAULT_TRIM_FRACTION);
    match raw.strategy.as_deref() {
        None | Some("fedavg") | Some("median") if raw.trim_fraction.is_some() => {
            p.push(format!(
                "aggregation.trim_fraction: only used with strategy = \"trimmed_mean\", but the \
                 strategy is {}; remove trim_fraction or set strategy = \"trimmed_mean\"",
                raw.strategy.as_deref().unwrap_or("fedavg (the default)")
            ));
            AggregationStrategy::FedAvg
        }
        None | Some("fedavg") => AggregationStrategy::FedAvg,
        Some("median") => AggregationStrategy::Median,
        Some("trimmed_mean") => match TrimmedMean::new(fraction) {
            Err(e) => {
                p.push(format!("aggregation.trim_fraction: {e}"));
                AggregationStrategy::FedAvg
            }
            Ok(tm) if tm.trimmed_per_side(target_participants as usize) == 0 => {
                p.push(format!(
                    "aggregation.trim_fraction: {fraction} trims no plant at \
                     round.target_participants = {target_participants}, so nothing would be \
                     dropped; raise it to at least {:.3} or use strategy = \"median\"",
                    1.0 / f64::from(target_participants.max(1))
                ));
                AggregationStrategy::FedAvg
            }
            Ok(tm) => AggregationStrategy::TrimmedMean(tm),
        },
        Some(other) => {
            p.push(format!(
                "aggregation.strategy: '{other}' is not a strategy; use fedavg, median or \
                 trimmed_mean"
            ));
            AggregationStrategy::FedAvg
        }
    }
}

impl std::fmt::Display for AggregationStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AggregationStrategy::FedAvg => f.write_str("fedavg"),
            AggregationStrategy::Median => f.write_str("median"),
            AggregationStrategy::TrimmedMean(tm) => {
                write!(f, "trimmed_mean({})", tm.trim_fraction())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str, target: u32) -> Result<AggregationStrategy, Vec<String>> {
        let raw: RawAggregation = toml::from_str(text).unwrap();
        let mut p = Problems::new("coordinator.example.toml", "fix the path");
        let s = aggregation_strategy(raw, target, &mut p);
        if p.is_empty() {
            Ok(s)
        } else {
            Err(p.into_vec())
        }
    }

    #[test]
    fn strategies_and_their_defaults() {
        assert_eq!(resolve("", 3), Ok(AggregationStrategy::FedAvg));
        assert_eq!(
            resolve("strategy = \"fedavg\"", 3),
            Ok(AggregationStrategy::FedAvg)
        );
        assert_eq!(
            resolve("strategy = \"median\"", 3),
            Ok(AggregationStrategy::Median)
        );
        assert_eq!(
            resolve("strategy = \"trimmed_mean\"", 7),
            Ok(AggregationStrategy::TrimmedMean(
                TrimmedMean::new(DEFAULT_TRIM_FRACTION).unwrap()
            ))
        );
        assert_eq!(
            resolve("strategy = \"trimmed_mean\"\ntrim_fraction = 0.1", 10),
            Ok(AggregationStrategy::TrimmedMean(
                TrimmedMean::new(0.1).unwrap()
            ))
        );
        assert_eq!(
            AggregationStrategy::TrimmedMean(TrimmedMean::new(0.1).unwrap()).to_string(),
            "trimmed_mean(0.1)"
        );
    }

    #[test]
    fn bad_sections_name_the_field_and_the_fix() {
        let one = |text: &str, target: u32| {
            let problems = resolve(text, target).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            problems.into_iter().next().unwrap()
        };
        let m = one("strategy = \"krum\"", 3);
        assert!(
            m.starts_with("aggregation.strategy: 'krum'") && m.contains("median"),
            "{m}"
        );
        for bad in ["0.5", "-0.1", "0.9", "nan"] {
            let m = one(
                &format!("strategy = \"trimmed_mean\"\ntrim_fraction = {bad}"),
                10,
            );
            assert!(
                m.starts_with("aggregation.trim_fraction:") && m.contains("below 0.5"),
                "{m}"
            );
        }
        let m = one("strategy = \"trimmed_mean\"\ntrim_fraction = 0.2", 4);
        assert!(m.contains("trims no plant") && m.contains("0.250"), "{m}");
        let m = one("strategy = \"median\"\ntrim_fraction = 0.2", 7);
        assert!(
            m.contains("only used with strategy = \"trimmed_mean\""),
            "{m}"
        );
        assert!(toml::from_str::<RawAggregation>("strategy = \"median\"\nclip = 1").is_err());
    }
}
