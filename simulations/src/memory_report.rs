//! Does memory grow with rounds? The part of a run's outputs that answers it from the resident
//! memory of `simulate` and of the coordinator after every round
//! ([`crate::process_memory::RoundMemory`]): `memory_by_round.csv` with every round, the
//! chart `memory_vs_round.{png,svg}`, and for `report.md` a table of at most
//! [`TABLE_COLUMNS`] rounds spread over the run (a 300-round table is unreadable) with the
//! least-squares growth over the run's second half, the figure that says whether it levels off.

use std::fmt::Write as _;

use crate::chart::{top_y, AxisFormat, Chart, Series};
use crate::process_memory::RoundMemory;
use crate::report::human_bytes;

/// Most rounds shown in the report's table; the CSV and the chart have them all.
pub const TABLE_COLUMNS: usize = 12;

const MIB: f64 = 1024.0 * 1024.0;

/// The header of `memory_by_round.csv`, written by [`csv`] and required by [`parse_csv`].
const CSV_HEADER: &str = "round,simulate_bytes,coordinator_bytes";

/// `round,simulate_bytes,coordinator_bytes`, one row per round (empty where not measured).
pub fn csv(by_round: &[RoundMemory]) -> String {
    let mut s = format!("{CSV_HEADER}\n");
    let opt = |b: Option<u64>| b.map_or(String::new(), |b| b.to_string());
    for r in by_round {
        let _ = writeln!(s, "{},{},{}", r.round, opt(r.simulate), opt(r.coordinator));
    }
    s
}

/// Reads back what [`csv`] wrote (or the same columns from elsewhere, e.g. the coordinator
/// benchmark's long runs); an empty cell is a process not measured that round.
pub fn parse_csv(text: &str) -> Result<Vec<RoundMemory>, String> {
    let mut lines = text.lines();
    match lines.next() {
        Some(h) if h.trim() == CSV_HEADER => {}
        other => {
            return Err(format!(
                "the first line is {:?}, not '{CSV_HEADER}'; give a memory_by_round.csv",
                other.unwrap_or("")
            ))
        }
    }
    let cell = |line: usize, v: &str| -> Result<Option<u64>, String> {
        if v.trim().is_empty() {
            return Ok(None);
        }
        v.trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("line {line}: '{v}' is not a byte count"))
    };
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let n = i + 2;
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 3 {
            return Err(format!("line {n}: {} fields, the header has 3", f.len()));
        }
        let round = f[0]
            .trim()
            .parse()
            .map_err(|_| format!("line {n}: '{}' is not a round number", f[0]))?;
        rows.push(RoundMemory {
            round,
            simulate: cell(n, f[1])?,
            coordinator: cell(n, f[2])?,
        });
    }
    Ok(rows)
}

/// Resident MiB of both processes by round; `None` when no round was measured.
pub fn chart(by_round: &[RoundMemory]) -> Option<Chart> {
    let line = |name: &str, f: fn(&RoundMemory) -> Option<u64>| Series {
        name: name.into(),
        points: by_round
            .iter()
            .filter_map(|r| f(r).map(|b| (r.round as f64, b as f64 / MIB)))
            .collect(),
        dashed: false,
    };
    if !has_figures(by_round) {
        return None;
    }
    let series: Vec<Series> = [
        line("simulate", |r| r.simulate),
        line("coordinator", |r| r.coordinator),
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
    let top = top_y(&series);
    let last = by_round.last().map_or(1, |r| r.round);
    Some(Chart {
        title: "Resident memory after each round".into(),
        x_label: "round".into(),
        y_label: "resident MiB".into(),
        x_format: AxisFormat::Number,
        // From round 0, so that the ticks of a long run fall on round numbers (100, 200, ...).
        x_range: Some((0.0, last as f64)),
        y_range: Some((0.0, round_up(top * 1.1))),
        series,
    })
}

/// The report's section: the spread-out table, the growth over the second half, and where
/// the full series is.
pub fn markdown(by_round: &[RoundMemory]) -> String {
    let mut s = String::new();
    if by_round.is_empty() {
        return s;
    }
    let shown = spread(by_round.len(), TABLE_COLUMNS);
    let cells = |f: &dyn Fn(&RoundMemory) -> Option<u64>| {
        shown
            .iter()
            .map(|&i| f(&by_round[i]).map_or("-".into(), human_bytes))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let rounds: Vec<String> = shown
        .iter()
        .map(|&i| by_round[i].round.to_string())
        .collect();
    let _ = writeln!(
        s,
        "Resident memory after round (does it grow with rounds?{}):\n\n| round | {} |\n|---|{}\n| simulate | {} |\n| coordinator | {} |\n",
        if shown.len() < by_round.len() {
            format!(
                " {} of {} rounds; all in `memory_by_round.csv`",
                shown.len(),
                by_round.len()
            )
        } else {
            String::new()
        },
        rounds.join(" | "),
        "---:|".repeat(rounds.len()),
        cells(&|r| r.simulate),
        cells(&|r| r.coordinator),
    );
    let half = &by_round[by_round.len() / 2..];
    let growth = |f: fn(&RoundMemory) -> Option<u64>| {
        slope(half, f).map_or("-".into(), |b| format!("{:+.1} KiB", b / 1024.0))
    };
    if half.len() >= 2 {
        let _ = writeln!(
            s,
            "Growth over rounds {}–{} (least squares): simulate {} a round, coordinator {} a round.\n",
            half[0].round,
            half[half.len() - 1].round,
            growth(|r| r.simulate),
            growth(|r| r.coordinator),
        );
    }
    if has_figures(by_round) {
        let _ = writeln!(
            s,
            "![resident memory by round](memory_vs_round.png) ([SVG](memory_vs_round.svg))\n"
        );
    }
    s
}

/// Whether any round has a figure (none off Linux): what the chart needs to be drawn.
fn has_figures(by_round: &[RoundMemory]) -> bool {
    by_round
        .iter()
        .any(|r| r.simulate.is_some() || r.coordinator.is_some())
}

/// `x` rounded up to a half or a whole power of ten (391 -> 400, 141 -> 150), at least 1, so
/// that the axis ticks are round numbers.
fn round_up(x: f64) -> f64 {
    if x <= 1.0 {
        return 1.0;
    }
    let step = 10f64.powf(x.log10().floor());
    (x / step * 2.0).ceil() / 2.0 * step
}

/// Indices of at most `k` items of `n`, evenly spread, always the first and the last.
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let k = k.max(2);
    let mut out: Vec<usize> = (0..k).map(|j| j * (n - 1) / (k - 1)).collect();
    out.dedup();
    out
}

/// Least-squares slope in bytes per round of `f` over `rows` (rounds without a figure are
/// skipped); `None` below two points.
pub fn slope(rows: &[RoundMemory], f: fn(&RoundMemory) -> Option<u64>) -> Option<f64> {
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| f(r).map(|b| (r.round as f64, b as f64)))
        .collect();
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u64, simulate: impl Fn(u64) -> u64) -> Vec<RoundMemory> {
        (1..=n)
            .map(|round| RoundMemory {
                round,
                simulate: Some(simulate(round)),
                coordinator: (round % 2 == 0).then_some(50 << 20),
            })
            .collect()
    }

    #[test]
    fn spread_keeps_the_first_and_the_last_and_at_most_k() {
        assert_eq!(spread(5, 12), vec![0, 1, 2, 3, 4]);
        let s = spread(300, 12);
        assert_eq!(s.len(), 12);
        assert_eq!((s[0], s[11]), (0, 299));
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        assert_eq!(spread(3, 2), vec![0, 2]);
    }

    #[test]
    fn the_axis_ends_at_a_round_number() {
        assert_eq!(round_up(391.3), 400.0);
        assert_eq!(round_up(141.5), 150.0);
        assert_eq!(round_up(100.0), 100.0);
        assert_eq!(round_up(0.2), 1.0);
    }

    #[test]
    fn slope_is_the_growth_per_round() {
        let r = rows(10, |round| (100 << 20) + round * 2048);
        assert!((slope(&r, |r| r.simulate).unwrap() - 2048.0).abs() < 1e-6);
        // Only the even rounds have a coordinator figure; it is flat.
        assert_eq!(slope(&r, |r| r.coordinator), Some(0.0));
        assert_eq!(slope(&r[..1], |r| r.simulate), None);
    }

    #[test]
    fn a_long_run_shows_a_spread_table_and_its_second_half_growth() {
        let r = rows(300, |round| (400 << 20) + round * 1024);
        let md = markdown(&r);
        let header = md.lines().find(|l| l.starts_with("| round |")).unwrap();
        assert_eq!(header.matches(" | ").count(), TABLE_COLUMNS, "{header}");
        assert!(
            header.contains("| 1 |") && header.ends_with("| 300 |"),
            "{header}"
        );
        assert!(
            md.contains("12 of 300 rounds; all in `memory_by_round.csv`"),
            "{md}"
        );
        assert!(
            md.contains("Growth over rounds 151–300 (least squares): simulate +1.0 KiB a round, coordinator +0.0 KiB a round."),
            "{md}"
        );
        let csv = csv(&r);
        assert_eq!(csv.lines().count(), 301);
        assert_eq!(
            csv.lines().nth(1).unwrap(),
            format!("1,{},", (400 << 20) + 1024)
        );
        let chart = chart(&r).unwrap();
        assert_eq!(chart.series.len(), 2);
        assert_eq!(chart.series[1].points.len(), 150);
        let ticks: Vec<String> = chart
            .frame(720, 420)
            .x_ticks(AxisFormat::Number)
            .into_iter()
            .map(|t| t.1)
            .collect();
        assert_eq!(ticks.first().map(String::as_str), Some("0"), "{ticks:?}");
        assert!(
            ticks.iter().all(|t| !t.contains('.')),
            "round ticks: {ticks:?}"
        );
    }

    #[test]
    fn a_short_run_shows_every_round_and_no_chart_without_figures() {
        let md = markdown(&rows(3, |_| 1 << 20));
        assert!(!md.contains("all in `memory_by_round.csv`"), "{md}");
        assert!(md.contains("| 1 | 2 | 3 |"), "{md}");
        assert!(markdown(&[]).is_empty());
        let unmeasured = [RoundMemory {
            round: 1,
            simulate: None,
            coordinator: None,
        }];
        assert!(chart(&unmeasured).is_none());
    }
}
