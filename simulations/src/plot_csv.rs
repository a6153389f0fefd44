//! `simulate plot`: one mAP-by-round chart (PNG and SVG) drawn from the `map_by_round.csv`
//! of several runs. Arms that ran separately (a baseline added later with
//! `federation.enabled = false`, runs of two experiment files) meet on one figure without
//! running anything again; each run's own report only shows the arms it ran.
//! `simulate plot-memory` draws a `memory_by_round.csv` again (a run's, or one written from
//! the coordinator benchmark's long runs) as the run's own memory chart.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::chart::{AxisFormat, Chart, Series};
use crate::run_report::{map_axis, write_chart_files};

/// One CSV to draw, with the name its lines get in the legend.
#[derive(Clone, Debug, PartialEq)]
pub struct PlotInput {
    /// A `map_by_round.csv`, or a run folder holding one.
    pub path: PathBuf,
    /// Prefix of its lines' names (`LABEL=PATH` on the command line); none: the method alone.
    pub label: Option<String>,
}

impl std::str::FromStr for PlotInput {
    type Err = std::convert::Infallible;

    /// `PATH` or `LABEL=PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.split_once('=') {
            Some((label, path)) if !label.is_empty() => PlotInput {
                path: path.into(),
                label: Some(label.to_string()),
            },
            _ => PlotInput {
                path: s.into(),
                label: None,
            },
        })
    }
}

/// What to draw: `metric` (`map_33` or `map_50`) on `test_set` (`global`, `unseen` or a plant
/// id) by round.
#[derive(Clone, Debug)]
pub struct PlotOptions {
    pub inputs: Vec<PlotInput>,
    pub metric: String,
    pub test_set: String,
    pub title: Option<String>,
    /// Written as `<out>.png` and `<out>.svg` (`.png`/`.svg` appended to the name).
    pub out: PathBuf,
}

/// Draws the chart and returns the two files written.
pub fn plot(o: &PlotOptions) -> Result<[PathBuf; 2]> {
    let column = match o.metric.as_str() {
        "map_33" => 3,
        "map_50" => 4,
        m => bail!("--metric {m}: use map_33 or map_50"),
    };
    let mut series = Vec::new();
    for input in &o.inputs {
        let csv = if input.path.is_dir() {
            input.path.join("map_by_round.csv")
        } else {
            input.path.clone()
        };
        let text = std::fs::read_to_string(&csv).with_context(|| {
            format!(
                "cannot read {} (give a run folder or its map_by_round.csv)",
                csv.display()
            )
        })?;
        let found = series_from_csv(&text, input.label.as_deref(), column, &o.test_set)
            .with_context(|| format!("in {}", csv.display()))?;
        series.extend(found);
    }
    let chart = Chart {
        title: o
            .title
            .clone()
            .unwrap_or_else(|| format!("{} {} by round", o.test_set, o.metric)),
        x_label: "round".into(),
        y_label: o.metric.clone(),
        x_format: AxisFormat::Number,
        x_range: None,
        y_range: map_axis(&series),
        series,
    };
    write_chart_files(&chart, &o.out)
}

/// One line per method found in a `map_by_round.csv` (`method,round,test_set,map_33,map_50`),
/// in the order the file lists them: the value of `column` on `test_set` by round. Baselines
/// are dashed, the federation solid, as in the run's own report.
pub fn series_from_csv(
    text: &str,
    label: Option<&str>,
    column: usize,
    test_set: &str,
) -> Result<Vec<Series>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    if header.trim() != "method,round,test_set,map_33,map_50" {
        bail!("not a map_by_round.csv: its header is '{header}'");
    }
    let mut series: Vec<Series> = Vec::new();
    for (i, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        let bad = || {
            anyhow!(
                "line {}: '{line}' is not method,round,test_set,map_33,map_50",
                i + 2
            )
        };
        if fields.len() != 5 {
            return Err(bad());
        }
        if fields[2] != test_set {
            continue;
        }
        let round: f64 = fields[1].parse().map_err(|_| bad())?;
        let value: f64 = fields[column].parse().map_err(|_| bad())?;
        let method = fields[0];
        let name = label.map_or(method.to_string(), |l| format!("{l} {method}"));
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((round, value)),
            None => series.push(Series {
                name,
                points: vec![(round, value)],
                dashed: method != "federated",
            }),
        }
    }
    if series.is_empty() {
        bail!("no rows for test set '{test_set}' (global, unseen or a plant id)");
    }
    Ok(series)
}

/// `simulate plot-memory`: the memory chart of `csv` (`round,simulate_bytes,coordinator_bytes`)
/// as `OUT.png` and `OUT.svg`.
pub fn plot_memory(csv: &Path, out: &Path) -> Result<[PathBuf; 2]> {
    let text = std::fs::read_to_string(csv)
        .with_context(|| format!("cannot read {} (give a memory_by_round.csv)", csv.display()))?;
    let rows =
        crate::memory_report::parse_csv(&text).map_err(|e| anyhow!("{}: {e}", csv.display()))?;
    let chart = crate::memory_report::chart(&rows)
        .ok_or_else(|| anyhow!("{}: no round has a memory figure", csv.display()))?;
    write_chart_files(&chart, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chart::{HEIGHT, WIDTH};

    const CSV: &str = "method,round,test_set,map_33,map_50\n\
        federated,0,global,0.000000,0.000000\n\
        federated,0,plant-01,0.000000,0.000000\n\
        federated,1,global,0.500000,0.400000\n\
        centralised,0,global,0.000000,0.000000\n\
        centralised,1,global,0.700000,0.650000\n";

    #[test]
    fn one_line_per_method_on_the_chosen_test_set() {
        let s = series_from_csv(CSV, Some("30x1"), 4, "global").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "30x1 federated");
        assert_eq!(s[0].points, [(0.0, 0.0), (1.0, 0.4)]);
        assert!(!s[0].dashed && s[1].dashed);
        assert_eq!(s[1].points, [(0.0, 0.0), (1.0, 0.65)]);
        let plant = series_from_csv(CSV, None, 3, "plant-01").unwrap();
        assert_eq!((plant.len(), plant[0].name.as_str()), (1, "federated"));
    }

    #[test]
    fn other_files_and_missing_sets_are_refused_by_name() {
        let e = series_from_csv("round,map\n1,0.5\n", None, 3, "global").unwrap_err();
        assert!(e.to_string().contains("not a map_by_round.csv"), "{e}");
        let e = series_from_csv(CSV, None, 3, "unseen").unwrap_err();
        assert!(
            e.to_string().contains("no rows for test set 'unseen'"),
            "{e}"
        );
        let broken = format!("{CSV}federated,x,global,0.1,0.1\n");
        let e = series_from_csv(&broken, None, 3, "global").unwrap_err();
        assert!(e.to_string().contains("line 7"), "{e}");
    }

    #[test]
    fn labels_come_before_the_first_equals_sign() {
        let p: PlotInput = "fed 30x1=out/runs/run-01".parse().unwrap();
        assert_eq!(p.label.as_deref(), Some("fed 30x1"));
        assert_eq!(p.path, PathBuf::from("out/runs/run-01"));
        let p: PlotInput = "out/runs/run-01".parse().unwrap();
        assert_eq!(p.label, None);
    }

    #[test]
    fn plot_writes_a_png_and_an_svg_naming_every_line() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.csv");
        std::fs::write(&a, CSV).unwrap();
        let [png, svg] = plot(&PlotOptions {
            inputs: vec![PlotInput {
                path: a,
                label: Some("run A".into()),
            }],
            metric: "map_33".into(),
            test_set: "global".into(),
            title: None,
            out: dir.path().join("chart"),
        })
        .unwrap();
        let image = image::open(&png).unwrap();
        assert_eq!((image.width(), image.height()), (WIDTH, HEIGHT));
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.contains(">run A federated<") && svg.contains(">run A centralised<"));
    }

    #[test]
    fn plot_memory_draws_a_memory_csv_and_names_a_wrong_file() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("memory_by_round.csv");
        std::fs::write(
            &csv,
            "round,simulate_bytes,coordinator_bytes\n1,,1048576\n100,,2097152\n",
        )
        .unwrap();
        let [png, svg] = plot_memory(&csv, &dir.path().join("mem")).unwrap();
        assert!(std::fs::metadata(&png).unwrap().len() > 1000);
        assert!(std::fs::read_to_string(&svg)
            .unwrap()
            .contains("coordinator"));
        std::fs::write(&csv, CSV).unwrap();
        let e = plot_memory(&csv, &dir.path().join("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("give a memory_by_round.csv"), "{e}");
        std::fs::write(&csv, "round,simulate_bytes,coordinator_bytes\n1,,12x\n").unwrap();
        let e = plot_memory(&csv, &dir.path().join("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: '12x' is not a byte count"), "{e}");
    }
}
