//! `coordinator.toml`: the raw, all-optional [`RawConfig`] read by serde, resolved into a
//! validated [`Config`] that reports every problem of the file at once.
//!
//! Relative paths are taken relative to the folder of the config file, so a config travels
//! with the files it names.

pub use fedinspect_common::config_problems::ConfigError;
use fedinspect_common::config_problems::{load_config, resolve, Problems, RawTls};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::delta::{Codec, DEFAULT_Q8_BLOCK, MAX_Q8_BLOCK};
use fedinspect_common::tls::TlsFiles;
use serde::Deserialize;

mod storage;
mod strategy;
pub use storage::{storage_settings, RawStorage, StorageSettings};
pub use strategy::{aggregation_strategy, AggregationStrategy, RawAggregation};

/// The file as written: every field optional, unknown fields refused.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub signing_key: Option<PathBuf>,
    pub initial_model: Option<PathBuf>,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub round: RawRound,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub aggregation: RawAggregation,
    /// Absent: no metrics endpoint.
    pub metrics: Option<RawMetrics>,
    /// Absent: no bundles are built or pushed.
    pub bundles: Option<crate::bundle::RawBundleSettings>,
    /// Absent: promotion keeps the plant-reported metric gate (`admin_ops`).
    pub promotion: Option<crate::gate::RawPromotion>,
    #[serde(default)]
    pub storage: RawStorage,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRound {
    pub min_participants: Option<u32>,
    pub target_participants: Option<u32>,
    pub deadline_secs: Option<u64>,
    pub local_epochs: Option<u32>,
    pub learning_rate: Option<f64>,
    pub fedprox_mu: Option<f64>,
    pub batch_size: Option<u32>,
    pub codec: Option<String>,
    pub q8_block: Option<u32>,
    pub max_rounds: Option<u64>,
    pub hold: Option<bool>,
    pub sample_fraction: Option<f64>,
    pub sample_seed: Option<u64>,
    pub keep_update_blobs_rounds: Option<u64>,
    pub stream_idle_timeout_secs: Option<u64>,
    pub lr_cycle_rounds: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_update_bytes: Option<u64>,
    pub max_samples_per_plant: Option<u64>,
    pub delta_norm_bound: Option<f64>,
    pub norm_action: Option<String>,
    pub max_concurrent_uploads: Option<usize>,
    pub max_concurrent_downloads: Option<usize>,
}

/// A checked configuration, ready to build a coordinator from.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub signing_key: PathBuf,
    /// Stored as version 1 by the first `serve` when no version exists yet.
    pub initial_model: Option<PathBuf>,
    pub round: RoundPolicy,
    pub limits: Limits,
    /// Where the Prometheus endpoint (`GET /metrics`, plain HTTP) listens; `None` without a
    /// `[metrics]` section.
    pub metrics_listen: Option<SocketAddr>,
    /// Inference bundles built on promotion and pushed to the plants; `None` without a
    /// `[bundles]` section.
    pub bundles: Option<crate::bundle::BundleConfig>,
    /// What happens after the database met a disk problem (`[storage]`).
    pub storage: StorageSettings,
}

/// How rounds are run and what plants are asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPolicy {
    /// Connected plants needed to open a round, and accepted updates needed to publish one.
    pub min_participants: u32,
    /// A round closes early once this many updates are accepted.
    pub target_participants: u32,
    pub deadline: Duration,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub fedprox_mu: f64,
    pub batch_size: u32,
    pub codec: Codec,
    /// Rounds that share one learning-rate cosine (`fedinspect_common::lr_cycle`); 0: every
    /// round decays a cosine of its own.
    pub lr_cycle_rounds: u64,
    /// Stop opening rounds after this many; 0 runs forever.
    pub max_rounds: u64,
    /// Open no round at all: plants register, download the current model and wait; admin
    /// works. For enrolling the fleet before the first round, or a freeze.
    pub hold: bool,
    /// How the round's accepted updates become the next model (`[aggregation]`).
    pub aggregation: AggregationStrategy,
    /// Fraction of the registered plants tasked per round, in (0, 1]; 1 tasks every plant.
    /// The sample is at least `target_participants` plants (all if fewer are registered).
    pub sample_fraction: f64,
    /// Seed of the sample: with the round number it fixes which plants are drawn.
    pub sample_seed: u64,
    /// Ended rounds whose accepted update blobs are kept (the newest ones); older rounds'
    /// blobs are removed. `None` keeps every blob.
    pub keep_update_blobs_rounds: Option<u64>,
    /// The evaluation gate of promotion, from the `[promotion]` section (set by
    /// `Config::from_raw`, as `aggregation` is from `[aggregation]`); `None` without it.
    pub promotion_gate: Option<crate::gate::PromotionGate>,
    /// A connection that answers no HTTP/2 ping for this long is closed, and an upload or
    /// download on it fails; a TLS handshake must finish within it too, and an upload stream
    /// that delivers no message for this long is refused as cut off
    /// (`round.stream_idle_timeout_secs`, default 60). Here rather than in a section of its
    /// own because it bounds how long a stalled plant can hold a round's upload open.
    pub stream_idle_timeout: Duration,
}

/// Bounds on what one plant's update may be.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    pub max_update_bytes: u64,
    pub max_samples_per_plant: u64,
    /// Largest accepted L2 norm of a decoded delta; `None` accepts any.
    pub delta_norm_bound: Option<f64>,
    pub norm_action: NormAction,
    /// Upload streams read at once; more wait (their HTTP/2 flow-control window fills and
    /// holds the plant back), so the coordinator's buffers are bounded by this, not by the
    /// number of plants.
    pub max_concurrent_uploads: usize,
    /// Model downloads streamed at once; more wait before their first chunk is read.
    pub max_concurrent_downloads: usize,
}

/// What happens to a delta whose L2 norm exceeds the bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormAction {
    /// Refuse the update.
    Reject,
    /// Accept it, scaled down to the bound at aggregation.
    Clip,
}

impl Default for RoundPolicy {
    fn default() -> Self {
        Self {
            min_participants: 2,
            target_participants: 3,
            deadline: Duration::from_secs(600),
            local_epochs: 1,
            learning_rate: 0.01,
            fedprox_mu: 0.0,
            batch_size: 8,
            codec: Codec::F16,
            lr_cycle_rounds: 0,
            max_rounds: 0,
            hold: false,
            aggregation: AggregationStrategy::FedAvg,
            sample_fraction: 1.0,
            sample_seed: 0,
            keep_update_blobs_rounds: None,
            promotion_gate: None,
            stream_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_update_bytes: 1 << 30,
            max_samples_per_plant: 10_000_000,
            delta_norm_bound: None,
            norm_action: NormAction::Reject,
            max_concurrent_uploads: 32,
            max_concurrent_downloads: 32,
        }
    }
}

impl fmt::Display for NormAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NormAction::Reject => "reject",
            NormAction::Clip => "clip",
        })
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_config(path, "the coordinator", Self::from_raw)
    }

    /// Validates `raw`, resolving relative paths against `base`; returns every problem found.
    pub fn from_raw(raw: RawConfig, base: &Path) -> Result<Self, Vec<String>> {
        let mut p = Problems::new(
            "coordinator.example.toml",
            "create the PKI with `fedinspect-certs init` or fix the path",
        );
        let listen = match raw.listen.as_deref() {
            None => p.missing("listen", "the address to serve on, e.g. \"0.0.0.0:50051\""),
            Some(s) => s
                .parse::<SocketAddr>()
                .map_err(|_| {
                    p.push(format!(
                        "listen: '{s}' is not an address with a port, e.g. \"0.0.0.0:50051\""
                    ))
                })
                .ok(),
        };
        let data_dir = match raw.data_dir {
            None => p.missing("data_dir", "the folder for the database and blobs"),
            Some(d) => Some(resolve(base, &d)),
        };
        let tls = p.tls_files(base, raw.tls);
        let signing_key = p.existing_file(base, "signing_key", raw.signing_key);
        let initial_model = raw.initial_model.and_then(|m| {
            let path = resolve(base, &m);
            if path.is_file() {
                Some(path)
            } else {
                p.push(format!("initial_model: {} is not a file", path.display()));
                None
            }
        });
        let mut round = round_policy(raw.round, &mut p);
        round.aggregation =
            aggregation_strategy(raw.aggregation, round.target_participants, &mut p);
        if let Some(raw_gate) = raw.promotion {
            round.promotion_gate =
                crate::gate::PromotionGate::resolve(raw_gate, base, initial_model.as_deref())
                    .map_err(|problems| problems.into_iter().for_each(|x| p.push(x)))
                    .ok();
        }
        let limits = limits(raw.limits, &mut p);
        let metrics_listen = raw.metrics.and_then(|m| metrics_listen(m, &mut p));
        let storage = storage_settings(raw.storage, &mut p);
        let bundles = match (raw.bundles, &data_dir) {
            (Some(b), Some(dir)) => {
                crate::bundle::BundleConfig::resolve(b, base, dir, initial_model.as_deref())
                    .map_err(|problems| problems.into_iter().for_each(|x| p.push(x)))
                    .ok()
            }
            _ => None,
        };
        match (listen, data_dir, tls, signing_key) {
            (Some(listen), Some(data_dir), Some(tls), Some(signing_key)) if p.is_empty() => {
                Ok(Config {
                    listen,
                    data_dir,
                    tls,
                    signing_key,
                    initial_model,
                    round,
                    limits,
                    metrics_listen,
                    bundles,
                    storage,
                })
            }
            _ => Err(p.into_vec()),
        }
    }
}

fn round_policy(raw: RawRound, p: &mut Problems) -> RoundPolicy {
    let d = RoundPolicy::default();
    let min_participants = raw.min_participants.unwrap_or(d.min_participants);
    if min_participants == 0 {
        p.push("round.min_participants: must be at least 1".into());
    }
    let target_participants = raw
        .target_participants
        .unwrap_or(d.target_participants.max(min_participants));
    if target_participants < min_participants {
        p.push(format!(
            "round.target_participants: {target_participants} is below min_participants \
             {min_participants}; raise it or lower min_participants"
        ));
    }
    let deadline_secs = raw.deadline_secs.unwrap_or(d.deadline.as_secs());
    if deadline_secs == 0 {
        p.push("round.deadline_secs: must be at least 1".into());
    }
    let local_epochs = raw.local_epochs.unwrap_or(d.local_epochs);
    if local_epochs == 0 {
        p.push("round.local_epochs: must be at least 1".into());
    }
    let learning_rate = raw.learning_rate.unwrap_or(d.learning_rate);
    if !(learning_rate.is_finite() && learning_rate > 0.0) {
        p.push(format!(
            "round.learning_rate: {learning_rate} must be a positive number"
        ));
    }
    let fedprox_mu = raw.fedprox_mu.unwrap_or(d.fedprox_mu);
    if !(fedprox_mu.is_finite() && fedprox_mu >= 0.0) {
        p.push(format!(
            "round.fedprox_mu: {fedprox_mu} must be 0 (plain FedAvg) or positive"
        ));
    }
    let batch_size = raw.batch_size.unwrap_or(d.batch_size);
    if batch_size == 0 {
        p.push("round.batch_size: must be at least 1".into());
    }
    let block = raw.q8_block.unwrap_or(DEFAULT_Q8_BLOCK);
    if !(1..=MAX_Q8_BLOCK).contains(&block) {
        p.push(format!(
            "round.q8_block: {block} is outside 1..={MAX_Q8_BLOCK}"
        ));
    }
    let codec = match raw.codec.as_deref() {
        None => d.codec,
        Some("f32") => Codec::F32,
        Some("f16") => Codec::F16,
        Some("q8") => Codec::Q8 { block },
        Some(other) => {
            p.push(format!(
                "round.codec: '{other}' is not a codec; use f32, f16 or q8"
            ));
            d.codec
        }
    };
    let sample_fraction = raw.sample_fraction.unwrap_or(d.sample_fraction);
    if !(sample_fraction.is_finite() && sample_fraction > 0.0 && sample_fraction <= 1.0) {
        p.push(format!(
            "round.sample_fraction: {sample_fraction} must be in (0, 1]; 1 tasks every plant"
        ));
    }
    if raw.keep_update_blobs_rounds == Some(0) {
        p.push(
            "round.keep_update_blobs_rounds: must be at least 1 (leave it out to keep every blob)"
                .into(),
        );
    }
    let stream_idle_secs = raw
        .stream_idle_timeout_secs
        .unwrap_or(d.stream_idle_timeout.as_secs());
    if stream_idle_secs < 2 {
        p.push(format!(
            "round.stream_idle_timeout_secs: {stream_idle_secs} is below 2 (the keepalive ping is sent every half of it)"
        ));
    }
    RoundPolicy {
        stream_idle_timeout: Duration::from_secs(stream_idle_secs),
        sample_fraction,
        sample_seed: raw.sample_seed.unwrap_or(d.sample_seed),
        keep_update_blobs_rounds: raw.keep_update_blobs_rounds,
        min_participants,
        target_participants,
        deadline: Duration::from_secs(deadline_secs),
        local_epochs,
        learning_rate,
        fedprox_mu,
        batch_size,
        codec,
        lr_cycle_rounds: raw.lr_cycle_rounds.unwrap_or(d.lr_cycle_rounds),
        max_rounds: raw.max_rounds.unwrap_or(d.max_rounds),
        hold: raw.hold.unwrap_or(d.hold),
        // Set from the [aggregation] section by `Config::from_raw`.
        aggregation: d.aggregation,
        // Set from the [promotion] section by `Config::from_raw`.
        promotion_gate: None,
    }
}

fn metrics_listen(raw: RawMetrics, p: &mut Problems) -> Option<SocketAddr> {
    let Some(s) = raw.listen else {
        p.push("metrics.listen: missing; name the address, e.g. \"127.0.0.1:9464\", or remove the [metrics] section".into());
        return None;
    };
    s.parse::<SocketAddr>()
        .map_err(|_| {
            p.push(format!(
                "metrics.listen: '{s}' is not an address with a port, e.g. \"127.0.0.1:9464\""
            ))
        })
        .ok()
}

fn limits(raw: RawLimits, p: &mut Problems) -> Limits {
    let d = Limits::default();
    let max_update_bytes = raw.max_update_bytes.unwrap_or(d.max_update_bytes);
    if max_update_bytes == 0 {
        p.push("limits.max_update_bytes: must be at least 1".into());
    }
    let max_samples_per_plant = raw.max_samples_per_plant.unwrap_or(d.max_samples_per_plant);
    if max_samples_per_plant == 0 {
        p.push("limits.max_samples_per_plant: must be at least 1".into());
    }
    let delta_norm_bound = raw.delta_norm_bound;
    if let Some(b) = delta_norm_bound {
        if !(b.is_finite() && b > 0.0) {
            p.push(format!(
                "limits.delta_norm_bound: {b} must be a positive number (leave it out for no bound)"
            ));
        }
    }
    let norm_action = match raw.norm_action.as_deref() {
        None | Some("reject") => NormAction::Reject,
        Some("clip") => NormAction::Clip,
        Some(other) => {
            p.push(format!(
                "limits.norm_action: '{other}' is not an action; use reject or clip"
            ));
            NormAction::Reject
        }
    };
    let max_concurrent_uploads = raw
        .max_concurrent_uploads
        .unwrap_or(d.max_concurrent_uploads);
    if max_concurrent_uploads == 0 {
        p.push("limits.max_concurrent_uploads: must be at least 1".into());
    }
    let max_concurrent_downloads = raw
        .max_concurrent_downloads
        .unwrap_or(d.max_concurrent_downloads);
    if max_concurrent_downloads == 0 {
        p.push("limits.max_concurrent_downloads: must be at least 1".into());
    }
    Limits {
        max_update_bytes,
        max_samples_per_plant,
        delta_norm_bound,
        norm_action,
        max_concurrent_uploads,
        max_concurrent_downloads,
    }
}

#[cfg(test)]
mod tests;
