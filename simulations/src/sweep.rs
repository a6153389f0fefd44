//! The `[sweep]` table of an experiment file: lists of values for some knobs, whose cartesian
//! product makes the runs (the first key varies slowest, in the order of [`KNOBS`]). Each run
//! gets a label naming the swept values only, which is also its folder name.

use serde::Deserialize;

use crate::experiment::Settings;

/// The knobs a sweep may vary, in expansion order.
pub const KNOBS: [&str; 14] = [
    "plants",
    "alpha",
    "size_skew",
    "rounds",
    "local_epochs",
    "learning_rate",
    "participation",
    "codec",
    "fedprox_mu",
    "strategy",
    "server_learning_rate",
    "server_momentum",
    "lr_cycle_rounds",
    "seed",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSweep {
    plants: Option<Vec<u32>>,
    alpha: Option<Vec<f64>>,
    size_skew: Option<Vec<f64>>,
    rounds: Option<Vec<u32>>,
    local_epochs: Option<Vec<u32>>,
    learning_rate: Option<Vec<f64>>,
    participation: Option<Vec<f64>>,
    codec: Option<Vec<String>>,
    fedprox_mu: Option<Vec<f64>>,
    strategy: Option<Vec<String>>,
    server_learning_rate: Option<Vec<f64>>,
    server_momentum: Option<Vec<f64>>,
    lr_cycle_rounds: Option<Vec<u64>>,
    seed: Option<Vec<u64>>,
}

/// One swept value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
    Text(String),
}

/// A swept knob and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub key: &'static str,
    pub values: Vec<Value>,
}

/// The resolved sweep; no axes means one run of the base settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sweep {
    pub axes: Vec<Axis>,
}

/// One combination: its label and its settings.
#[derive(Clone, Debug)]
pub struct Run {
    /// `run-01` alone, or with the swept values: `run-03_alpha-0.5_codec-q8`.
    pub label: String,
    /// The swept knobs and their values in this run.
    pub swept: Vec<(&'static str, String)>,
    pub settings: Settings,
}

impl Sweep {
    pub fn resolve(raw: RawSweep, problems: &mut Vec<String>) -> Self {
        let ints =
            |v: Option<Vec<u32>>| v.map(|v| v.into_iter().map(|x| Value::Int(x.into())).collect());
        let floats = |v: Option<Vec<f64>>| v.map(|v| v.into_iter().map(Value::Float).collect());
        let texts = |v: Option<Vec<String>>| v.map(|v| v.into_iter().map(Value::Text).collect());
        let u64s = |v: Option<Vec<u64>>| v.map(|v| v.into_iter().map(Value::Int).collect());
        let lists: [(&'static str, Option<Vec<Value>>); 14] = [
            ("plants", ints(raw.plants)),
            ("alpha", floats(raw.alpha)),
            ("size_skew", floats(raw.size_skew)),
            ("rounds", ints(raw.rounds)),
            ("local_epochs", ints(raw.local_epochs)),
            ("learning_rate", floats(raw.learning_rate)),
            ("participation", floats(raw.participation)),
            ("codec", texts(raw.codec)),
            ("fedprox_mu", floats(raw.fedprox_mu)),
            ("strategy", texts(raw.strategy)),
            ("server_learning_rate", floats(raw.server_learning_rate)),
            ("server_momentum", floats(raw.server_momentum)),
            ("lr_cycle_rounds", u64s(raw.lr_cycle_rounds)),
            ("seed", u64s(raw.seed)),
        ];
        let mut axes = Vec::new();
        for (key, values) in lists {
            let Some(values) = values else { continue };
            if values.is_empty() {
                problems.push(format!(
                    "sweep.{key}: the list is empty; give at least one value or remove the key"
                ));
                continue;
            }
            let mut seen: Vec<&Value> = Vec::new();
            for v in &values {
                if seen.contains(&v) {
                    problems.push(format!("sweep.{key}: {} is listed twice", v.render()));
                }
                seen.push(v);
            }
            axes.push(Axis { key, values });
        }
        Self { axes }
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.axes.iter().map(|a| a.values.len()).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every combination applied to `base`, the first axis varying slowest.
    pub fn expand(&self, base: &Settings) -> Vec<Run> {
        let mut runs = vec![(Vec::new(), base.clone())];
        for axis in &self.axes {
            let mut next = Vec::with_capacity(runs.len() * axis.values.len());
            for (swept, settings) in &runs {
                for v in &axis.values {
                    let mut s: Settings = settings.clone();
                    apply(&mut s, axis.key, v);
                    let mut sw: Vec<(&'static str, String)> = swept.clone();
                    sw.push((axis.key, v.render()));
                    next.push((sw, s));
                }
            }
            runs = next;
        }
        let width = runs.len().to_string().len().max(2);
        runs.into_iter()
            .enumerate()
            .map(|(i, (swept, settings))| {
                let mut label = format!("run-{:0width$}", i + 1);
                for (k, v) in &swept {
                    label.push('_');
                    label.push_str(k);
                    label.push('-');
                    label.push_str(&folder_safe(v));
                }
                Run {
                    label,
                    swept,
                    settings,
                }
            })
            .collect()
    }
}

impl Value {
    pub fn render(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("{f}"),
            Value::Text(t) => t.clone(),
        }
    }
}

fn apply(s: &mut Settings, key: &str, v: &Value) {
    let int = || match v {
        Value::Int(i) => *i,
        _ => unreachable!("integer knobs hold integers"),
    };
    let float = || match v {
        Value::Float(f) => *f,
        _ => unreachable!("float knobs hold floats"),
    };
    let text = || match v {
        Value::Text(t) => t.clone(),
        _ => unreachable!("text knobs hold text"),
    };
    let small = || u32::try_from(int()).unwrap_or(u32::MAX);
    match key {
        "plants" => s.data.plants = small(),
        "alpha" => s.data.alpha = float(),
        "size_skew" => s.data.size_skew = float(),
        "rounds" => s.federation.rounds = small(),
        "local_epochs" => s.federation.local_epochs = small(),
        "learning_rate" => s.federation.learning_rate = float(),
        "participation" => s.federation.participation = float(),
        "codec" => s.federation.codec = text(),
        "fedprox_mu" => s.federation.fedprox_mu = float(),
        "strategy" => s.federation.strategy = text(),
        "server_learning_rate" => s.federation.server_learning_rate = float(),
        "server_momentum" => s.federation.server_momentum = float(),
        "lr_cycle_rounds" => s.federation.lr_cycle_rounds = int(),
        "seed" => s.seed = int(),
        other => unreachable!("{other} is not in KNOBS"),
    }
}

/// Letters, digits, `.`, `-` and `+` kept; anything else becomes `-`.
fn folder_safe(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') {
                c
            } else {
                '-'
            }
        })
        .collect()
}
