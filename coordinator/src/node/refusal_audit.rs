//! Refused TLS handshakes into the audit log: a task drains the acceptor's bounded queue and
//! writes one audit entry per refusal, at most [`PER_MINUTE`] per reason and minute, so a
//! flood of bad handshakes cannot fill the disk; the rest are counted
//! (`fedinspect_tls_refusals_not_audited_total`) and summed up in one entry per reason and
//! minute.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::tls::RefusalReason;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::accept::{stopped, Refused};
use crate::hub::Hub;
use crate::records::AuditKind;

/// Refusals of one reason audited one by one per window.
pub const PER_MINUTE: u32 = 20;
/// Refusals queued for the auditor; beyond that they are counted and dropped.
pub const QUEUE: usize = 256;
const WINDOW: Duration = Duration::from_secs(60);
/// Who a refused handshake's audit entry names: the peer proved no identity.
pub const ACTOR: &str = "unauthenticated";
/// The audit action of a refused handshake.
pub const ACTION: &str = "tls_handshake";

/// Per-reason limit over fixed one-minute windows.
#[derive(Debug)]
pub struct RateLimit {
    per_window: u32,
    window: Duration,
    started: Instant,
    seen: BTreeMap<RefusalReason, u32>,
}

impl RateLimit {
    pub fn new(per_window: u32, window: Duration, now: Instant) -> Self {
        Self {
            per_window,
            window,
            started: now,
            seen: BTreeMap::new(),
        }
    }

    /// Whether a refusal for `reason` in the current window is audited one by one.
    pub fn admit(&mut self, reason: RefusalReason) -> bool {
        let n = self.seen.entry(reason).or_insert(0);
        *n = n.saturating_add(1);
        *n <= self.per_window
    }

    /// When the window has passed: the refusals over the limit in it, per reason, and a new
    /// window from `now`.
    pub fn roll(&mut self, now: Instant) -> Option<Vec<(RefusalReason, u32)>> {
        if now.duration_since(self.started) < self.window {
            return None;
        }
        self.started = now;
        Some(self.take_over())
    }

    /// The refusals over the limit so far, per reason; the counts start again.
    pub fn take_over(&mut self) -> Vec<(RefusalReason, u32)> {
        let over = self
            .seen
            .iter()
            .filter(|(_, n)| **n > self.per_window)
            .map(|(r, n)| (*r, n - self.per_window))
            .collect();
        self.seen.clear();
        over
    }
}

/// Drains `rx` into the audit log until the coordinator stops.
pub async fn run(hub: Arc<Hub>, mut rx: mpsc::Receiver<Refused>, mut stop: watch::Receiver<bool>) {
    let mut limit = RateLimit::new(PER_MINUTE, WINDOW, Instant::now());
    let mut tick = tokio::time::interval(WINDOW);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            _ = tick.tick() => summarise(&hub, &mut limit),
            r = rx.recv() => match r {
                None => break,
                Some(r) => audit(&hub, &mut limit, &r),
            },
        }
    }
    // What is still queued and the current window's summary, so nothing counted is lost.
    while let Ok(r) = rx.try_recv() {
        audit(&hub, &mut limit, &r);
    }
    write_summary(&hub, limit.take_over());
}

fn audit(hub: &Hub, limit: &mut RateLimit, r: &Refused) {
    if limit.admit(r.refusal.reason) {
        let detail = format!("{} (from {})", r.refusal, r.peer);
        hub.audit_event(AuditKind::Refusal, ACTOR, ACTION, None, &detail);
    } else {
        hub.metrics.handshakes.audit_suppressed(1);
    }
}

fn summarise(hub: &Hub, limit: &mut RateLimit) {
    write_summary(hub, limit.roll(Instant::now()).unwrap_or_default());
}

fn write_summary(hub: &Hub, over: Vec<(RefusalReason, u32)>) {
    for (reason, n) in over {
        let detail = format!(
            "{n} more client certificates refused for {reason} in the last minute were not audited one by one (limit {PER_MINUTE} per reason and minute); see fedinspect_tls_handshakes_refused_total"
        );
        hub.audit_event(AuditKind::Refusal, ACTOR, ACTION, None, &detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_n_per_reason_and_window_pass_then_the_rest_are_summed() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(2, WINDOW, t0);
        let expired = RefusalReason::Expired;
        let none = RefusalReason::NoCertificate;
        assert!(l.admit(expired));
        assert!(l.admit(expired));
        assert!(!l.admit(expired));
        assert!(!l.admit(expired));
        assert!(l.admit(none), "reasons are limited separately");
        assert_eq!(l.roll(t0 + Duration::from_secs(59)), None);
        assert_eq!(
            l.roll(t0 + WINDOW),
            Some(vec![(expired, 2)]),
            "two over the limit, none for the other reason"
        );
        assert!(l.admit(expired), "a new window starts afresh");
    }
}
