//! The `[aggregation]` section: which [`Strategy`](fedinspect_common::fedavg::Strategy)
//! turns a round's accepted updates into the next model, and its validation.
//!
//! ```toml
//! [aggregation]
//! strategy = "fedavg"      # "fedavg" (default), "median" or "trimmed_mean"
//! trim_fraction = 0.2      # trimmed_mean only: share of plants dropped at each end, 0 <= f < 0.5
//! server_learning_rate = 1 # fedavg only: the mean step is multiplied by it, 0 < lr <= 10
//! server_momentum = 0      # fedavg only: heavy-ball momentum from the lineage, 0 <= m <= 0.99
//! ```

use fedinspect_common::config_problems::Problems;
use fedinspect_common::fedavg::{ServerStep, Strategy, TrimmedMean};
use serde::Deserialize;

/// `[aggregation]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAggregation {
    pub strategy: Option<String>,
    pub trim_fraction: Option<f64>,
    pub server_learning_rate: Option<f64>,
    pub server_momentum: Option<f64>,
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
    /// FedAvg whose step is multiplied by a server learning rate other than 1, or which adds
    /// server momentum.
    ServerStep(ServerStep),
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
    if raw.server_learning_rate.is_some() || raw.server_momentum.is_some() {
        return server_step(&raw, p);
    }
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

/// `server_learning_rate` and `server_momentum`, which go with FedAvg only.
fn server_step(raw: &RawAggregation, p: &mut Problems) -> AggregationStrategy {
    let keys = match (raw.server_learning_rate, raw.server_momentum) {
        (Some(_), Some(_)) => "server_learning_rate and server_momentum",
        (Some(_), None) => "server_learning_rate",
        _ => "server_momentum",
    };
    match raw.strategy.as_deref() {
        None | Some("fedavg") if raw.trim_fraction.is_none() => {}
        other => {
            p.push(format!(
                "aggregation.{keys}: only used with strategy = \"fedavg\", but the strategy is \
                 {}{}; remove {keys} or set strategy = \"fedavg\"",
                other.unwrap_or("fedavg"),
                if raw.trim_fraction.is_some() {
                    " with a trim_fraction"
                } else {
                    ""
                }
            ));
            return AggregationStrategy::FedAvg;
        }
    }
    let lr = raw.server_learning_rate.unwrap_or(1.0);
    let momentum = raw.server_momentum.unwrap_or(0.0);
    let step = ServerStep::new(lr)
        .map_err(|e| p.push(format!("aggregation.server_learning_rate: {e}")))
        .ok();
    let momentum_ok = ServerStep::check_momentum(momentum)
        .map_err(|e| p.push(format!("aggregation.server_momentum: {e}")))
        .is_ok();
    match step {
        Some(_) if lr == 1.0 && momentum == 0.0 => AggregationStrategy::FedAvg,
        Some(step) if momentum_ok => AggregationStrategy::ServerStep(
            step.with_momentum(momentum)
                .expect("the momentum was checked above"),
        ),
        _ => AggregationStrategy::FedAvg,
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
            AggregationStrategy::ServerStep(s) => f.write_str(s.name()),
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
    fn a_server_learning_rate_goes_with_fedavg_only() {
        assert_eq!(
            resolve("server_learning_rate = 2.0", 3),
            Ok(AggregationStrategy::ServerStep(
                ServerStep::new(2.0).unwrap()
            ))
        );
        assert_eq!(
            resolve("strategy = \"fedavg\"\nserver_learning_rate = 1.0", 3),
            Ok(AggregationStrategy::FedAvg)
        );
        assert_eq!(
            AggregationStrategy::ServerStep(ServerStep::new(1.5).unwrap()).to_string(),
            "fedavg(server_lr=1.5)"
        );
        let e = resolve("server_learning_rate = 0.0", 3).unwrap_err();
        assert!(
            e[0].contains("aggregation.server_learning_rate: server learning rate 0"),
            "{e:?}"
        );
        let e = resolve("strategy = \"median\"\nserver_learning_rate = 2.0", 3).unwrap_err();
        assert!(
            e[0].contains("only used with strategy = \"fedavg\""),
            "{e:?}"
        );
        assert!(e[0].contains("the strategy is median"), "{e:?}");
    }

    #[test]
    fn server_momentum_goes_with_fedavg_and_its_learning_rate() {
        let with = |lr: f64, m: f64| {
            Ok(AggregationStrategy::ServerStep(
                ServerStep::new(lr).unwrap().with_momentum(m).unwrap(),
            ))
        };
        assert_eq!(resolve("server_momentum = 0.5", 3), with(1.0, 0.5));
        assert_eq!(
            resolve("server_momentum = 0.9\nserver_learning_rate = 0.5", 3),
            with(0.5, 0.9)
        );
        assert_eq!(
            resolve("server_momentum = 0.0", 3),
            Ok(AggregationStrategy::FedAvg)
        );
        assert_eq!(
            with(1.0, 0.5).unwrap().to_string(),
            "fedavg(server_lr=1,momentum=0.5)"
        );
        let e = resolve("server_momentum = 1.0", 3).unwrap_err();
        assert!(
            e[0].starts_with("aggregation.server_momentum: server momentum 1 must be"),
            "{e:?}"
        );
        // Both bad: both reported.
        let e = resolve("server_momentum = -1.0\nserver_learning_rate = 0.0", 3).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        let e = resolve("strategy = \"median\"\nserver_momentum = 0.5", 3).unwrap_err();
        assert!(
            e[0].starts_with("aggregation.server_momentum: only used with strategy = \"fedavg\""),
            "{e:?}"
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
