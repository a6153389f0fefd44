//! [`Handshakes`]: counters of the TLS handshakes the coordinator refused or lost, so that a
//! flood of bad client certificates shows on a dashboard even where the audit log, which is
//! rate-limited (`node::refusal_audit`), keeps only the first entries of each minute.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use fedinspect_common::tls::RefusalReason;

use super::Exposition;

/// Handshake counters, bumped by the connection acceptor and the refusal auditor.
#[derive(Debug, Default)]
pub struct Handshakes {
    /// Refused client certificates, by [`RefusalReason`].
    refused: Mutex<BTreeMap<RefusalReason, u64>>,
    /// Handshakes that failed for another reason (peer hung up, not TLS, timed out).
    failed: AtomicU64,
    /// Refusals counted but not written to the audit log (over the per-minute limit).
    audit_suppressed: AtomicU64,
    /// Refusals lost before the auditor saw them (its queue was full).
    audit_dropped: AtomicU64,
    /// Connections whose handshake finished, and those of them closed since.
    opened: AtomicU64,
    closed: AtomicU64,
}

/// The handshake counters at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HandshakeCounters {
    pub refused: BTreeMap<RefusalReason, u64>,
    pub failed: u64,
    pub audit_suppressed: u64,
    pub audit_dropped: u64,
    /// Connections open now (handshake finished, not yet closed).
    pub open: u64,
}

impl Handshakes {
    pub fn refused(&self, reason: RefusalReason) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        *refused.entry(reason).or_insert(0) += 1;
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn audit_suppressed(&self, n: u64) {
        self.audit_suppressed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn audit_dropped(&self) {
        self.audit_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }

    pub fn connection_closed(&self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }

    pub fn counters(&self) -> HandshakeCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HandshakeCounters {
            refused: self
                .refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            failed: get(&self.failed),
            audit_suppressed: get(&self.audit_suppressed),
            audit_dropped: get(&self.audit_dropped),
            open: get(&self.opened).saturating_sub(get(&self.closed)),
        }
    }

    /// Adds the handshake families to a scrape.
    pub fn render(&self, e: &mut Exposition) {
        let c = self.counters();
        let refused: Vec<(Vec<(&str, &str)>, f64)> = RefusalReason::ALL
            .iter()
            .map(|r| {
                let n = c.refused.get(r).copied().unwrap_or(0);
                (vec![("reason", r.as_str())], n as f64)
            })
            .collect();
        e.family(
            "fedinspect_tls_handshakes_refused_total",
            "counter",
            "Client certificates refused at the TLS handshake, by reason.",
            &refused,
        );
        e.single(
            "fedinspect_tls_handshakes_failed_total",
            "counter",
            "TLS handshakes that failed for another reason than the client certificate.",
            c.failed as f64,
        );
        e.family(
            "fedinspect_tls_refusals_not_audited_total",
            "counter",
            "Refused handshakes counted but not written to the audit log.",
            &[
                (vec![("why", "rate_limited")], c.audit_suppressed as f64),
                (vec![("why", "queue_full")], c.audit_dropped as f64),
            ],
        );
        e.single(
            "fedinspect_tls_connections_open",
            "gauge",
            "Mutual-TLS connections open now (plants and admins).",
            c.open as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_rendered_and_counted() {
        let h = Handshakes::default();
        h.refused(RefusalReason::Expired);
        h.refused(RefusalReason::Expired);
        h.audit_suppressed(3);
        let mut e = Exposition::default();
        h.render(&mut e);
        let text = e.into_text();
        assert!(
            text.contains("fedinspect_tls_handshakes_refused_total{reason=\"expired\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fedinspect_tls_handshakes_refused_total{reason=\"no_certificate\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fedinspect_tls_refusals_not_audited_total{why=\"rate_limited\"} 3"),
            "{text}"
        );
    }
}
