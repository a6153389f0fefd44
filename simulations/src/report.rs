//! The per-round table of a federation run: one [`RoundRow`] per round, from what the
//! coordinator recorded (participants, bytes, times) and this program's evaluation of the
//! published model on the test split, rendered as Markdown with footnotes on what each figure
//! measures.

use std::fmt::Write as _;

use fedinspect_coordinator::rpc::admin_client::RoundDetailView;
use serde::Serialize;

use crate::evaluation::Scores;

/// One round of the run.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRow {
    pub round: u64,
    /// The version the round published; `None` when it failed.
    pub version: Option<u64>,
    pub participants: u32,
    pub map_33: Option<f64>,
    pub map_50: Option<f64>,
    /// Encoded delta bytes the coordinator accepted in the round, as it counted them.
    pub bytes_up: u64,
    /// Model bytes the coordinator streamed to plants while the round was open.
    pub bytes_down: u64,
    /// From the round's opening to its version being stored, by the coordinator's clock.
    pub seconds: f64,
    /// The slowest participant's training time, as it reported it.
    pub train_seconds: f64,
    /// The slowest participant's base model fetch (cache or download), as it reported it.
    pub download_seconds: f64,
    /// The slowest participant's local evaluation (before and after training).
    pub local_eval_seconds: f64,
    /// The slowest participant's delta computation and encoding.
    pub encode_seconds: f64,
    /// From the round's close to its version being stored (FedAvg, signing, storing).
    pub aggregate_seconds: f64,
    /// This program's evaluation of the version on the test split.
    pub eval_seconds: Option<f64>,
    /// Hex content hash of the published version.
    pub model_hash: Option<String>,
    /// Why the round failed.
    pub failure: Option<String>,
}

/// What the columns measure, printed under the table.
pub const FOOTNOTES: &str = "\
bytes up / down: measured by the coordinator: the encoded deltas it accepted in the round \
(payload bytes, each checked against its SHA-256) and the model bytes it streamed to plants \
while the round was open (gRPC and TLS framing not included). seconds: the round from its \
opening to its version being stored, by the coordinator's clock; download s, train s, local \
eval s, encode s: the slowest plant's base model fetch, training, evaluation on its own \
holdout (before and after) and delta encoding, as it reported them; aggregate s: close to stored version (FedAvg, signing, storage); \
eval s: this program's evaluation on the test split, which overlaps the next round.";

impl RoundRow {
    /// A row from the coordinator's record of the round and, if published, its evaluation.
    pub fn new(
        detail: &RoundDetailView,
        model_hash: Option<String>,
        scores: Option<Scores>,
    ) -> Self {
        let r = &detail.round;
        let ms = |from: i64, to: i64| {
            if from > 0 && to >= from {
                (to - from) as f64 / 1000.0
            } else {
                0.0
            }
        };
        let published = r.state == "published";
        let end = if published {
            detail.published_unix_ms
        } else {
            detail.closed_unix_ms
        };
        let slowest = |metric: &str| {
            detail
                .updates
                .iter()
                .filter_map(|u| u.metrics.get(metric).copied())
                .fold(0.0, f64::max)
        };
        RoundRow {
            round: r.round,
            version: published.then_some(r.published_version),
            participants: r.participants,
            map_33: scores.map(|s| s.map_33),
            map_50: scores.map(|s| s.map_50),
            bytes_up: detail.bytes_received,
            bytes_down: detail.bytes_sent,
            seconds: ms(detail.opened_unix_ms, end),
            train_seconds: slowest("train_seconds"),
            download_seconds: slowest("download_seconds"),
            local_eval_seconds: slowest("eval_seconds"),
            encode_seconds: slowest("encode_seconds"),
            aggregate_seconds: if published {
                ms(detail.closed_unix_ms, detail.published_unix_ms)
            } else {
                0.0
            },
            eval_seconds: scores.map(|s| s.seconds),
            model_hash,
            failure: (!r.failure.is_empty()).then(|| r.failure.clone()),
        }
    }
}

/// The table, as printed and written to `rounds.txt`.
pub fn render_table(rows: &[RoundRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| round | version | participants | map_33 | map_50 | bytes up | bytes down | seconds | download s | train s | local eval s | encode s | aggregate s | eval s |"
    );
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
            r.round,
            r.version.map_or("failed".to_string(), |v| v.to_string()),
            r.participants,
            opt(r.map_33, 3),
            opt(r.map_50, 3),
            human_bytes(r.bytes_up),
            human_bytes(r.bytes_down),
            r.seconds,
            r.download_seconds,
            r.train_seconds,
            r.local_eval_seconds,
            r.encode_seconds,
            r.aggregate_seconds,
            opt(r.eval_seconds, 1),
        );
    }
    for r in rows {
        if let Some(f) = &r.failure {
            let _ = writeln!(s, "\nround {} failed: {f}", r.round);
        }
    }
    s
}

pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}
