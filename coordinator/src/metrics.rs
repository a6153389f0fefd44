//! [`Metrics`]: the coordinator's counters for Prometheus: rounds opened, published and
//! failed, updates accepted, duplicated and refused (by reason), payload bytes received and
//! model bytes sent, and time spent aggregating. The rpc handlers and the round driver bump
//! them; `metrics::scrape` adds the gauges read from the hub at scrape time (connected plants,
//! current round and its state, latest and promoted version) and `metrics::server` serves the
//! text exposition format over plain HTTP when `[metrics] listen` is set; `metrics::handshakes`
//! counts refused TLS handshakes.
//!
//! Counters live in this process only: they start at zero at each start, as Prometheus
//! expects of counters (it handles the reset); durable history is in sled.

mod exposition;
pub mod handshakes;
pub mod idle_io;
pub mod scrape;
pub mod server;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::CoreError;

pub use exposition::Exposition;

/// Process-wide counters, shared through the hub.
#[derive(Debug, Default)]
pub struct Metrics {
    rounds_opened: AtomicU64,
    rounds_published: AtomicU64,
    rounds_failed: AtomicU64,
    updates_accepted: AtomicU64,
    updates_duplicate: AtomicU64,
    /// Refused uploads by [`CoreError::reason`].
    updates_refused: Mutex<BTreeMap<&'static str, u64>>,
    update_bytes_received: AtomicU64,
    model_bytes_sent: AtomicU64,
    /// Aggregations completed and their total and last duration, in microseconds.
    aggregations: AtomicU64,
    aggregation_micros_total: AtomicU64,
    aggregation_micros_last: AtomicU64,
    /// Refused and failed TLS handshakes (`metrics::handshakes`).
    pub handshakes: handshakes::Handshakes,
    /// Restarts in place of this PID after a disk problem (`node::restart_in_place`), carried
    /// through exec, since the process memory is not.
    restarts_in_place: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub rounds_opened: u64,
    pub rounds_published: u64,
    pub rounds_failed: u64,
    pub updates_accepted: u64,
    pub updates_duplicate: u64,
    pub updates_refused: BTreeMap<&'static str, u64>,
    pub update_bytes_received: u64,
    pub model_bytes_sent: u64,
    pub aggregations: u64,
    pub aggregation_seconds_total: f64,
    pub aggregation_seconds_last: f64,
}

impl Metrics {
    pub fn round_opened(&self) {
        self.rounds_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// A round published its version after `aggregation_secs` of reading and averaging.
    pub fn round_published(&self, aggregation_secs: f64) {
        self.rounds_published.fetch_add(1, Ordering::Relaxed);
        let micros = (aggregation_secs.max(0.0) * 1e6).round() as u64;
        self.aggregations.fetch_add(1, Ordering::Relaxed);
        self.aggregation_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        self.aggregation_micros_last
            .store(micros, Ordering::Relaxed);
    }

    pub fn round_failed(&self) {
        self.rounds_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// An upload was acknowledged; `duplicate` when it had been counted before.
    pub fn update_accepted(&self, duplicate: bool) {
        let counter = if duplicate {
            &self.updates_duplicate
        } else {
            &self.updates_accepted
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// An upload was refused for `why`.
    pub fn update_refused(&self, why: &CoreError) {
        let mut refused = self
            .updates_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *refused.entry(why.reason()).or_insert(0) += 1;
    }

    /// `n` payload bytes of an upload arrived (whether or not the update is accepted).
    pub fn update_bytes_received(&self, n: u64) {
        self.update_bytes_received.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes of a model file were streamed to a plant.
    pub fn model_bytes_sent(&self, n: u64) {
        self.model_bytes_sent.fetch_add(n, Ordering::Relaxed);
    }

    /// This process was started by its `total`-th restart in place.
    pub fn restarted_in_place(&self, total: u64) {
        self.restarts_in_place.store(total, Ordering::Relaxed);
    }

    pub fn restarts_in_place(&self) -> u64 {
        self.restarts_in_place.load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> Counters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            rounds_opened: get(&self.rounds_opened),
            rounds_published: get(&self.rounds_published),
            rounds_failed: get(&self.rounds_failed),
            updates_accepted: get(&self.updates_accepted),
            updates_duplicate: get(&self.updates_duplicate),
            updates_refused: self
                .updates_refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            update_bytes_received: get(&self.update_bytes_received),
            model_bytes_sent: get(&self.model_bytes_sent),
            aggregations: get(&self.aggregations),
            aggregation_seconds_total: get(&self.aggregation_micros_total) as f64 / 1e6,
            aggregation_seconds_last: get(&self.aggregation_micros_last) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_reason() {
        let m = Metrics::default();
        m.update_refused(&CoreError::NoRoundOpen);
        m.update_refused(&CoreError::NoRoundOpen);
        m.update_refused(&CoreError::ZeroSamples);
        let c = m.counters();
        assert_eq!(c.updates_refused.get("no_round_open"), Some(&2));
        assert_eq!(c.updates_refused.get("zero_samples"), Some(&1));
    }

    #[test]
    fn aggregation_time_accumulates() {
        let m = Metrics::default();
        m.round_published(1.5);
        m.round_published(0.25);
        let c = m.counters();
        assert_eq!(c.rounds_published, 2);
        assert_eq!(c.aggregations, 2);
        assert!((c.aggregation_seconds_total - 1.75).abs() < 1e-9);
        assert!((c.aggregation_seconds_last - 0.25).abs() < 1e-9);
    }
}
