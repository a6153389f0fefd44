//! One scrape: the hub's counters plus the gauges read at that moment (connected and
//! registered plants, the current round and its state, the latest and promoted versions),
//! rendered as Prometheus text.

use super::Exposition;
use crate::error::CoreError;
use crate::hub::Hub;
use crate::records::RoundState;

const STATES: [RoundState; 5] = [
    RoundState::Open,
    RoundState::Collecting,
    RoundState::Aggregating,
    RoundState::Published,
    RoundState::Failed,
];

/// The metrics text of `hub` now (blocking: reads sled).
pub fn render(hub: &Hub) -> Result<String, CoreError> {
    let c = hub.metrics.counters();
    let mut e = Exposition::default();
    e.family(
        "fedinspect_rounds_total",
        "counter",
        "Rounds this process opened, published or failed.",
        &[
            (vec![("event", "opened")], c.rounds_opened as f64),
            (vec![("event", "published")], c.rounds_published as f64),
            (vec![("event", "failed")], c.rounds_failed as f64),
        ],
    );
    e.family(
        "fedinspect_updates_total",
        "counter",
        "Update uploads acknowledged (accepted, or a duplicate of an accepted one).",
        &[
            (vec![("result", "accepted")], c.updates_accepted as f64),
            (vec![("result", "duplicate")], c.updates_duplicate as f64),
        ],
    );
    let refused: Vec<(Vec<(&str, &str)>, f64)> = c
        .updates_refused
        .iter()
        .map(|(reason, n)| (vec![("reason", *reason)], *n as f64))
        .collect();
    e.family(
        "fedinspect_updates_refused_total",
        "counter",
        "Update uploads refused, by reason.",
        &refused,
    );
    e.single(
        "fedinspect_update_bytes_received_total",
        "counter",
        "Update payload bytes received, refused uploads included.",
        c.update_bytes_received as f64,
    );
    e.single(
        "fedinspect_model_bytes_sent_total",
        "counter",
        "Model file bytes streamed to plants.",
        c.model_bytes_sent as f64,
    );
    e.single(
        "fedinspect_restarts_in_place_total",
        "counter",
        "Times this coordinator (same PID) restarted itself after its disk took writes again.",
        hub.metrics.restarts_in_place() as f64,
    );
    e.single(
        "fedinspect_aggregations_total",
        "counter",
        "Aggregations completed.",
        c.aggregations as f64,
    );
    e.single(
        "fedinspect_aggregation_seconds_total",
        "counter",
        "Seconds spent aggregating and storing published versions.",
        c.aggregation_seconds_total,
    );
    e.single(
        "fedinspect_aggregation_last_seconds",
        "gauge",
        "Seconds the last aggregation took.",
        c.aggregation_seconds_last,
    );
    hub.metrics.handshakes.render(&mut e);
    gauges(hub, &mut e)?;
    Ok(e.into_text())
}

fn gauges(hub: &Hub, e: &mut Exposition) -> Result<(), CoreError> {
    e.single(
        "fedinspect_plants_connected",
        "gauge",
        "Plants with an open task stream.",
        hub.connected().len() as f64,
    );
    let plants = hub.store.plants()?;
    let revoked = plants.iter().filter(|p| p.revoked.is_some()).count();
    e.family(
        "fedinspect_plants_registered",
        "gauge",
        "Registered plants, revoked or not.",
        &[
            (vec![("revoked", "false")], (plants.len() - revoked) as f64),
            (vec![("revoked", "true")], revoked as f64),
        ],
    );
    let round = hub.store.latest_round()?;
    e.single(
        "fedinspect_current_round",
        "gauge",
        "The newest round's number (0 before the first).",
        round.as_ref().map_or(0, |r| r.round) as f64,
    );
    let state = round.map(|r| r.state);
    let states: Vec<(Vec<(&str, &str)>, f64)> = STATES
        .iter()
        .map(|s| {
            let on = if state == Some(*s) { 1.0 } else { 0.0 };
            (vec![("state", s.as_str())], on)
        })
        .collect();
    e.family(
        "fedinspect_current_round_state",
        "gauge",
        "1 for the state the newest round is in.",
        &states,
    );
    e.single(
        "fedinspect_model_version_latest",
        "gauge",
        "The newest stored model version.",
        hub.store.latest_model()?.map_or(0, |m| m.version) as f64,
    );
    e.single(
        "fedinspect_model_version_promoted",
        "gauge",
        "The promoted model version (0 when none is).",
        hub.store.promotion_history()?.last().copied().unwrap_or(0) as f64,
    );
    Ok(())
}
