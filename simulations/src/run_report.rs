//! The human-facing outputs of an experiment: per run the figures (PNG and SVG) and a
//! `report.md` that puts them together with the configuration, and at the output's root the
//! sweep summary (`summary.csv`, `report.md`, the bytes-vs-mAP figure across runs).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedinspect_common::fsutil;

use crate::chart::{AxisFormat, Chart, Series, HEIGHT, WIDTH};
use crate::eval_sets::Map;
use crate::report::human_bytes;
use crate::run_metrics::{csv_text, RunMetrics};
use crate::{chart_png, chart_svg, memory_report};

/// What the figures and tables measure, printed in every report.
const MEASURES: &str = "\
- **map_33**: mean average precision over the defect classes (DeepPCB's six, or the COCO \
source's categories) with a detection counted correct at IoU > 0.33 (the DeepPCB protocol); \
**map_50** at IoU >= 0.5.
- **global**: the held-out test split (DeepPCB's official `test.txt`, the COCO source's \
`test_path`, or every synthetic plant's test boards). **unseen**: its boards of groups no plant trains on. \
**own**: a plant's own test data (its share of the test split).
- **federated**: the version the coordinator published after each round, exported through the \
Admin service with its signature checked. **centralised**: one model trained on the union of \
the plants' training data. **local-only**: each plant alone on its own data (the mean of the \
plants' models on the global set; each plant's model on its own data). Both baselines run the \
plants' own round recipe with the same budget: per round, the round's local epochs over their \
data. Round 0 is the initial model all three start from.
- **bytes up / down**: as the coordinator counted them: encoded deltas accepted, model bytes \
streamed to plants (gRPC and TLS framing not included).";

/// Writes a run's figures and `report.md` into `dir`.
pub fn write_run_report(m: &RunMetrics, dir: &Path) -> Result<()> {
    save_chart(&map_vs_round(m, Metric::Map33), dir, "map33_vs_round")?;
    save_chart(&map_vs_round(m, Metric::Map50), dir, "map50_vs_round")?;
    save_chart(&per_plant(m), dir, "per_plant_map33")?;
    save_chart(
        &bytes_vs_map(std::slice::from_ref(m), &m.settings.federation.codec),
        dir,
        "bytes_vs_map33",
    )?;
    if let Some(chart) = memory_report::chart(&m.memory.by_round) {
        save_chart(&chart, dir, "memory_vs_round")?;
    }
    fsutil::write_bytes_atomic(&dir.join("report.md"), run_markdown(m).as_bytes())
        .with_context(|| format!("cannot write {}/report.md", dir.display()))
}

/// Writes `summary.csv`, `report.md` and `bytes_vs_map33.{png,svg}` of the whole sweep into
/// `out`; `runs` are the finished runs in sweep order.
pub fn write_summary(runs: &[RunMetrics], experiment: &str, out: &Path) -> Result<()> {
    save_chart(&bytes_vs_map(runs, "sweep"), out, "bytes_vs_map33")?;
    fsutil::write_bytes_atomic(&out.join("summary.csv"), summary_csv(runs).as_bytes())?;
    let mut s = String::new();
    let _ = writeln!(s, "# Experiment `{experiment}`: {} run(s)\n", runs.len());
    let _ = writeln!(
        s,
        "| run | federated map_33 | centralised map_33 | local-only map_33 | federated / centralised | bytes up | bytes down |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for m in runs {
        let _ = writeln!(
            s,
            "| [{0}](runs/{0}/report.md) | {1} | {2} | {3} | {4} | {5} | {6} |",
            m.label,
            map33(m.final_federated()),
            map33(m.final_centralised()),
            map33(m.final_local_only()),
            ratio(m).map_or("-".into(), |r| format!("{:.1}%", 100.0 * r)),
            human_bytes(m.total_bytes_up()),
            human_bytes(m.total_bytes_down()),
        );
    }
    let _ = writeln!(
        s,
        "\n![bytes vs map_33](bytes_vs_map33.png)\n\n[SVG](bytes_vs_map33.svg). Each line is one run: the federation's global map_33 after each round against the delta bytes uploaded so far, so codecs and settings compare by what their accuracy cost in traffic.\n\n## What the figures measure\n\n{MEASURES}"
    );
    fsutil::write_bytes_atomic(&out.join("report.md"), s.as_bytes())?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Metric {
    Map33,
    Map50,
}

impl Metric {
    fn of(self, m: &Map) -> f64 {
        match self {
            Metric::Map33 => m.map_33,
            Metric::Map50 => m.map_50,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::Map33 => "map_33",
            Metric::Map50 => "map_50",
        }
    }
}

fn map_vs_round(m: &RunMetrics, metric: Metric) -> Chart {
    let start = (0.0, metric.of(&m.initial.global));
    let mut series = Vec::new();
    // Empty when `federation.enabled = false` ran the baselines alone.
    if !m.federated.is_empty() {
        series.push(Series {
            name: "federated".into(),
            points: std::iter::once(start)
                .chain(m.federated.iter().filter_map(|r| {
                    r.scores
                        .as_ref()
                        .map(|s| (r.round as f64, metric.of(&s.global)))
                }))
                .collect(),
            dashed: false,
        });
    }
    if !m.centralised.is_empty() {
        series.push(Series {
            name: "centralised".into(),
            points: std::iter::once(start)
                .chain(
                    m.centralised
                        .iter()
                        .map(|r| (r.round as f64, metric.of(&r.scores.global))),
                )
                .collect(),
            dashed: true,
        });
    }
    if !m.local_only.is_empty() {
        series.push(Series {
            name: "local-only (mean)".into(),
            points: std::iter::once(start)
                .chain(
                    m.local_only
                        .iter()
                        .map(|r| (r.round as f64, metric.of(&r.mean_global))),
                )
                .collect(),
            dashed: true,
        });
    }
    Chart {
        title: format!("{}: global {} by round", m.label, metric.name()),
        x_label: "round".into(),
        y_label: metric.name().into(),
        x_format: AxisFormat::Number,
        x_range: None,
        y_range: map_axis(&series),
        series,
    }
}

fn per_plant(m: &RunMetrics) -> Chart {
    let mut series = Vec::new();
    for p in &m.plants {
        let Some(initial) = m.initial.plants.get(&p.id) else {
            continue;
        };
        let start = (0.0, initial.map_33);
        if !m.federated.is_empty() {
            series.push(Series {
                name: format!("{} fed", p.id),
                points: std::iter::once(start)
                    .chain(m.federated.iter().filter_map(|r| {
                        let s = r.scores.as_ref()?.plants.get(&p.id)?;
                        Some((r.round as f64, s.map_33))
                    }))
                    .collect(),
                dashed: false,
            });
        }
        if !m.local_only.is_empty() {
            series.push(Series {
                name: format!("{} local", p.id),
                points: std::iter::once(start)
                    .chain(
                        m.local_only
                            .iter()
                            .filter_map(|r| Some((r.round as f64, r.own.get(&p.id)?.map_33))),
                    )
                    .collect(),
                dashed: true,
            });
        }
    }
    Chart {
        title: format!("{}: map_33 on each plant's own test data", m.label),
        x_label: "round".into(),
        y_label: "map_33".into(),
        x_format: AxisFormat::Number,
        x_range: None,
        y_range: map_axis(&series),
        series,
    }
}

fn bytes_vs_map(runs: &[RunMetrics], what: &str) -> Chart {
    let series: Vec<Series> = runs
        .iter()
        .map(|m| {
            let mut up = 0u64;
            let points = m
                .federated
                .iter()
                .filter_map(|r| {
                    up += r.bytes_up;
                    r.scores.as_ref().map(|s| (up as f64, s.global.map_33))
                })
                .collect();
            let others = other_swept(m);
            let name = if others.is_empty() {
                m.settings.federation.codec.clone()
            } else {
                format!("{} {others}", m.settings.federation.codec)
            };
            Series {
                name,
                points,
                dashed: false,
            }
        })
        .collect();
    Chart {
        title: format!("bytes uploaded vs global map_33 ({what})"),
        x_label: "delta bytes uploaded so far".into(),
        y_label: "map_33".into(),
        x_format: AxisFormat::Bytes,
        x_range: None,
        y_range: map_axis(&series),
        series,
    }
}

/// The run's swept values other than the codec (already in the series name).
fn other_swept(m: &RunMetrics) -> String {
    m.swept
        .iter()
        .filter(|(k, _)| k != "codec")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The mAP axis: from 0 to the next tenth above the highest value (at most 1), so small
/// values stay readable.
/// The y range of an mAP chart: 0 to the next tenth above its highest point.
pub(crate) fn map_axis(series: &[Series]) -> Option<(f64, f64)> {
    let top = crate::chart::top_y(series);
    Some((0.0, ((top * 10.0).ceil() / 10.0).clamp(0.1, 1.0)))
}

fn save_chart(chart: &Chart, dir: &Path, stem: &str) -> Result<()> {
    write_chart_files(chart, &dir.join(stem))?;
    Ok(())
}

/// Writes `chart` as `<stem>.png` and `<stem>.svg` (each atomically) and returns the two paths.
pub(crate) fn write_chart_files(chart: &Chart, stem: &Path) -> Result<[PathBuf; 2]> {
    let with = |ext: &str| {
        let mut name = stem.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    let (png, svg) = (with(".png"), with(".svg"));
    fsutil::write_bytes_atomic(&png, &chart_png::render(chart, WIDTH, HEIGHT)?)?;
    fsutil::write_bytes_atomic(&svg, chart_svg::render(chart, WIDTH, HEIGHT).as_bytes())?;
    Ok([png, svg])
}

/// Final federated map_33 over final centralised map_33.
fn ratio(m: &RunMetrics) -> Option<f64> {
    let (f, c) = (m.final_federated()?, m.final_centralised()?);
    (c.map_33 > 0.0).then(|| f.map_33 / c.map_33)
}

fn map33(m: Option<Map>) -> String {
    m.map_or("-".into(), |m| format!("{:.3}", m.map_33))
}

/// Rounds per hour and the processes' memory, for a run whose federation ran.
fn scale_lines(s: &mut String, m: &RunMetrics) {
    // In-process plants have no process of their own; their figure follows below.
    let plants = m.memory.mean_plant().map_or(String::new(), |b| {
        format!(" {} per plant process (mean),", human_bytes(b))
    });
    let _ = writeln!(
        s,
        "Scale on this machine: {:.0} rounds per hour; peak memory:{plants} coordinator {}.\n",
        m.rounds_per_hour,
        m.memory.coordinator.map_or("-".into(), human_bytes),
    );
    if let Some(v) = &m.memory.in_process {
        let _ = writeln!(
            s,
            "Plants in process: {} plants cost {} of `simulate` ({} before them, {} at the peak): {} per plant.\n",
            v.plants,
            human_bytes(v.peak_rss.saturating_sub(v.baseline_rss)),
            human_bytes(v.baseline_rss),
            human_bytes(v.peak_rss),
            human_bytes(v.per_plant),
        );
    }
}

fn run_markdown(m: &RunMetrics) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Run `{}` of experiment `{}`\n",
        m.label, m.settings.name
    );
    if !m.swept.is_empty() {
        let swept: Vec<String> = m.swept.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let _ = writeln!(s, "Swept values: {}.\n", swept.join(", "));
    }
    let _ = writeln!(
        s,
        "{} plants, {} rounds of {} local epoch(s), codec {}, FedProx mu {}, participation {}, strategy {}; global test set {} images{}. Class skew of the split (mean total variation distance of the plants' class mixes from the overall mix): {:.3}. Federation {:.0} s, baselines {:.0} s.\n",
        m.plants.len(),
        m.settings.federation.rounds,
        m.settings.federation.local_epochs,
        m.settings.federation.codec,
        m.settings.federation.fedprox_mu,
        m.settings.federation.participation,
        m.settings.federation.strategy_label(),
        m.global_test_images,
        m.unseen_test_images
            .map_or(String::new(), |n| format!(", unseen groups {n} images")),
        m.class_skew,
        m.federation_seconds,
        m.baseline_seconds,
    );
    if m.federated.is_empty() {
        let _ = writeln!(
            s,
            "The federation did not run (`federation.enabled = false`): the baselines alone, from the coordinator's initial model, with the budget of {} rounds of {} epoch(s).\n",
            m.settings.federation.rounds, m.settings.federation.local_epochs,
        );
    } else {
        scale_lines(&mut s, m);
    }
    s.push_str(&memory_report::markdown(&m.memory.by_round));
    let _ = writeln!(s, "## Final models\n\n| method | global map_33 | global map_50 | unseen map_33 |\n|---|---:|---:|---:|");
    let unseen_fed = m
        .federated
        .iter()
        .rev()
        .find_map(|r| r.scores.as_ref())
        .and_then(|s| s.unseen);
    let rows = [
        ("federated", m.final_federated(), unseen_fed),
        (
            "centralised",
            m.final_centralised(),
            m.centralised.last().and_then(|r| r.scores.unseen),
        ),
        (
            "local-only (mean)",
            m.final_local_only(),
            m.local_only.last().and_then(|r| r.mean_unseen),
        ),
    ];
    for (name, g, u) in rows {
        if g.is_none() {
            continue;
        }
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            map33(g),
            g.map_or("-".into(), |g| format!("{:.3}", g.map_50)),
            map33(u)
        );
    }
    if let Some(r) = ratio(m) {
        let _ = writeln!(
            s,
            "\nThe federated model reaches **{:.1}%** of the centralised map_33.",
            100.0 * r
        );
    }
    tail_mean_lines(&mut s, m);
    let _ = writeln!(
        s,
        "\n![map_33 by round](map33_vs_round.png)\n\n![map_50 by round](map50_vs_round.png)\n\n![per-plant map_33](per_plant_map33.png)\n\n![bytes vs map_33](bytes_vs_map33.png)\n\nThe same figures as SVG: [map_33](map33_vs_round.svg), [map_50](map50_vs_round.svg), [per plant](per_plant_map33.svg), [bytes](bytes_vs_map33.svg).\n"
    );
    if !m.federated.is_empty() {
        let _ = writeln!(s, "## Federation rounds\n\n| round | version | participants | bytes up | bytes down | seconds | map_33 | map_50 |\n|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for r in &m.federated {
        let g = r.scores.as_ref().map(|s| s.global);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            r.round,
            r.version.map_or("failed".into(), |v| v.to_string()),
            r.participants,
            human_bytes(r.bytes_up),
            human_bytes(r.bytes_down),
            r.seconds,
            map33(g),
            g.map_or("-".into(), |g| format!("{:.3}", g.map_50)),
        );
    }
    let _ = writeln!(s, "\n## Plants (map_33 on own test data, final models)\n\n| plant | groups | train images | test images | federated | local-only | centralised |\n|---|---|---:|---:|---:|---:|---:|");
    let fed = m.federated.iter().rev().find_map(|r| r.scores.as_ref());
    for p in &m.plants {
        let get = |sc: Option<&crate::eval_sets::ModelScores>| {
            map33(sc.and_then(|s| s.plants.get(&p.id).copied()))
        };
        let local = m.local_only.last().and_then(|r| r.own.get(&p.id).copied());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            p.id,
            abbreviate(&p.groups),
            p.train_images,
            p.test_images,
            get(fed),
            map33(local),
            get(m.centralised.last().map(|r| &r.scores)),
        );
    }
    let _ = writeln!(
        s,
        "\n## Files\n\n`metrics.json` (everything), `federation_rounds.csv`, `map_by_round.csv` (method, round, test set), `tail_mean.csv` (with `data.tail_mean`), `settings.toml` (this run's resolved settings), `site/` (PKI, coordinator data, plant states, logs, exported versions in `site/models/`).\n\n## What the figures measure\n\n{MEASURES}\n\n## Configuration\n\n```toml\n{}```",
        m.settings.to_toml()
    );
    s
}

/// The "Mean of the last models" section (`data.tail_mean`); nothing when it is off.
fn tail_mean_lines(s: &mut String, m: &RunMetrics) {
    let t = &m.tail_mean;
    if t.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Mean of the last {} models\n\nEach method's last models averaged element by element (weights and BatchNorm statistics, uniformly; `data.tail_mean`), scored as one model: the federation's last published versions, a baseline's models after its last rounds (local-only: each plant's own mean, scores averaged over the plants). `tail_mean.csv` has every test set.\n\n| method | rounds | models | global map_33 | global map_50 | unseen map_33 |\n|---|---|---:|---:|---:|---:|",
        m.settings.data.tail_mean
    );
    for (name, t) in [
        ("federated", &t.federated),
        ("centralised", &t.centralised),
        ("local-only (mean)", &t.local_only),
    ] {
        let Some(t) = t else { continue };
        let _ = writeln!(
            s,
            "| {name} | {}-{} | {} | {:.3} | {:.3} | {} |",
            t.first_round,
            t.last_round,
            t.models,
            t.scores.global.map_33,
            t.scores.global.map_50,
            map33(t.scores.unseen)
        );
    }
    if let (Some(f), Some(c)) = (&t.federated, &t.centralised) {
        if c.scores.global.map_33 > 0.0 {
            let _ = writeln!(
                s,
                "\nThe federation's mean reaches **{:.1}%** of the centralised mean's map_33.",
                100.0 * f.scores.global.map_33 / c.scores.global.map_33
            );
        } else {
            let _ = writeln!(s, "\nThe centralised mean scores map_33 0: no ratio.");
        }
    }
}

fn abbreviate(groups: &[String]) -> String {
    if groups.len() <= 3 {
        groups.join(", ")
    } else {
        format!("{}, ... ({} groups)", groups[..2].join(", "), groups.len())
    }
}

fn summary_csv(runs: &[RunMetrics]) -> String {
    let mut s = String::from("run,swept,plants,rounds,local_epochs,codec,fedprox_mu,alpha,participation,strategy,seed,federated_map_33,federated_map_50,centralised_map_33,local_only_map_33,federated_over_centralised,bytes_up,bytes_down,federation_seconds,rounds_per_hour,plant_peak_rss_bytes,federated_tail_map_33,centralised_tail_map_33,local_only_tail_map_33\n");
    let f = |m: Option<Map>, pick: fn(&Map) -> f64| {
        m.map_or(String::new(), |m| format!("{:.6}", pick(&m)))
    };
    for m in runs {
        let st = &m.settings;
        let swept: Vec<String> = m.swept.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{},{},{},{}",
            m.label,
            csv_text(&swept.join(" ")),
            m.plants.len(),
            st.federation.rounds,
            st.federation.local_epochs,
            st.federation.codec,
            st.federation.fedprox_mu,
            st.data.alpha,
            st.federation.participation,
            st.federation.strategy_label(),
            st.seed,
            f(m.final_federated(), |m| m.map_33),
            f(m.final_federated(), |m| m.map_50),
            f(m.final_centralised(), |m| m.map_33),
            f(m.final_local_only(), |m| m.map_33),
            ratio(m).map_or(String::new(), |r| format!("{r:.4}")),
            m.total_bytes_up(),
            m.total_bytes_down(),
            m.federation_seconds,
            m.rounds_per_hour,
            m.memory
                .mean_plant()
                .map_or(String::new(), |b| b.to_string()),
            f(
                m.tail_mean.federated.as_ref().map(|t| t.scores.global),
                |m| m.map_33
            ),
            f(
                m.tail_mean.centralised.as_ref().map(|t| t.scores.global),
                |m| m.map_33
            ),
            f(
                m.tail_mean.local_only.as_ref().map(|t| t.scores.global),
                |m| m.map_33
            ),
        );
    }
    s
}
