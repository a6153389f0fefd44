//! The experiment file of `simulate run` (TOML): what data the plants hold, how the
//! federation trains, which baselines run beside it, and `[sweep]` lists whose cartesian
//! product makes the runs. Read into all-optional raw tables that refuse unknown keys, then
//! resolved into [`Settings`] with the documented defaults, every problem reported at once.
//! docs/simulations.md describes each key; `simulations/experiments/` has commented examples.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::Codec;
use serde::{Deserialize, Serialize};

use crate::sweep::{RawSweep, Sweep};

/// Where the plants' images come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Procedural boards (`synthetic`), one board group per plant.
    Synthetic,
    /// A DeepPCB `PCBData` folder (`data.path` or `--data`).
    Deeppcb,
}

/// How the training images are divided among the plants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// One or more whole board groups per plant (DeepPCB's natural 7 plants).
    Group,
    /// Each class's images divided by a Dirichlet(alpha) draw over the plants.
    Dirichlet,
    /// Images shuffled and dealt out evenly.
    Iid,
}

/// A fully resolved run (or the base of a sweep).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub name: String,
    /// Seeds the data, the initial model, the plants' shuffles and the partition.
    pub seed: u64,
    pub data: DataSettings,
    pub model: ModelSettings,
    pub federation: FederationSettings,
    pub baselines: BaselineSettings,
    pub compute: ComputeSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataSettings {
    pub source: Source,
    /// The DeepPCB `PCBData` folder (deeppcb only).
    pub path: Option<PathBuf>,
    pub split: SplitKind,
    pub plants: u32,
    /// Dirichlet concentration: of the class split (`split = "dirichlet"`) or of the synthetic
    /// plants' class mixes (`source = "synthetic"`). Small is skewed.
    pub alpha: f64,
    /// Synthetic: training and test boards per plant (on average, see `size_skew`).
    pub train_per_plant: usize,
    pub test_per_plant: usize,
    /// Synthetic: board side in pixels.
    pub image_size: u32,
    /// Synthetic: plant p gets boards in proportion to (p + 1)^-size_skew; 0 is even.
    pub size_skew: f64,
    /// Evaluate at most this many images of each test set (0: all).
    pub eval_limit: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSettings {
    pub input_size: u32,
    pub crop_size: u32,
    pub width: f64,
    pub fpn_width: u32,
    pub head_width: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FederationSettings {
    pub rounds: u32,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    /// `f32`, `f16`, `q8` or `q8:<block>`.
    pub codec: String,
    pub fedprox_mu: f64,
    /// Share of the plants asked to train each round.
    pub participation: f64,
    /// Aggregation strategy; `fedavg` is what every coordinator runs.
    pub strategy: String,
    pub deadline_secs: u64,
    pub warmup_steps: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BaselineSettings {
    pub centralised: bool,
    pub local_only: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ComputeSettings {
    /// `training.device` of the plants and of the baselines: auto, cpu or cuda.
    pub device: String,
    pub plant_threads: u32,
    /// LibTorch threads of this program (evaluation, baselines).
    pub threads: u32,
}

/// The experiment file: its base settings and the sweep over them.
#[derive(Clone, Debug)]
pub struct Experiment {
    pub base: Settings,
    pub sweep: Sweep,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("cannot read experiment file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("experiment file {} is not valid: {message}\n(every key is described in docs/simulations.md)", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("experiment file {} has {} problem(s):\n  - {}", path.display(), problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExperiment {
    name: Option<String>,
    seed: Option<u64>,
    #[serde(default)]
    data: RawData,
    #[serde(default)]
    model: RawModel,
    #[serde(default)]
    federation: RawFederation,
    #[serde(default)]
    baselines: RawBaselines,
    #[serde(default)]
    compute: RawCompute,
    #[serde(default)]
    sweep: RawSweep,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    source: Option<Source>,
    path: Option<PathBuf>,
    split: Option<SplitKind>,
    plants: Option<u32>,
    alpha: Option<f64>,
    train_per_plant: Option<usize>,
    test_per_plant: Option<usize>,
    image_size: Option<u32>,
    size_skew: Option<f64>,
    eval_limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    input_size: Option<u32>,
    crop_size: Option<u32>,
    width: Option<f64>,
    fpn_width: Option<u32>,
    head_width: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    rounds: Option<u32>,
    local_epochs: Option<u32>,
    learning_rate: Option<f64>,
    batch_size: Option<u32>,
    codec: Option<String>,
    fedprox_mu: Option<f64>,
    participation: Option<f64>,
    strategy: Option<String>,
    deadline_secs: Option<u64>,
    warmup_steps: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBaselines {
    centralised: Option<bool>,
    local_only: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompute {
    device: Option<String>,
    plant_threads: Option<u32>,
    threads: Option<u32>,
}

/// DeepPCB's training split holds seven board groups: its natural plants.
pub const DEEPPCB_GROUPS: u32 = 7;

impl Experiment {
    /// Reads `path`; `data` (the `--data` flag) replaces `data.path` and implies
    /// `source = "deeppcb"` when the file names no source.
    pub fn load(path: &Path, data: Option<&Path>) -> Result<Self, ExperimentError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map_or("experiment".into(), |s| s.to_string_lossy().into_owned());
        Self::parse(&text, &stem, data).map_err(|e| match e {
            ParseFailure::Toml(message) => ExperimentError::Parse {
                path: path.to_path_buf(),
                message,
            },
            ParseFailure::Invalid(problems) => ExperimentError::Invalid {
                path: path.to_path_buf(),
                problems,
            },
        })
    }

    /// Parses the text of an experiment file named `default_name` (its stem).
    pub fn parse(
        text: &str,
        default_name: &str,
        data: Option<&Path>,
    ) -> Result<Self, ParseFailure> {
        let mut raw: RawExperiment =
            toml::from_str(text).map_err(|e| ParseFailure::Toml(e.to_string()))?;
        if let Some(d) = data {
            raw.data.path = Some(d.to_path_buf());
            raw.data.source.get_or_insert(Source::Deeppcb);
        }
        let mut problems = Vec::new();
        let sweep = Sweep::resolve(raw.sweep, &mut problems);
        let base = resolve(
            RawParts {
                name: raw.name,
                seed: raw.seed,
                data: raw.data,
                model: raw.model,
                federation: raw.federation,
                baselines: raw.baselines,
                compute: raw.compute,
            },
            default_name,
            &mut problems,
        );
        for key in sweep.axes.iter().map(|a| a.key) {
            if let Some(why) = no_effect(&base, key) {
                problems.push(format!("sweep.{key}: {why}"));
            }
        }
        if problems.is_empty() {
            // Each combination must make sense too (e.g. a swept plant count), and the
            // coordinator must support what it asks for.
            for run in sweep.expand(&base) {
                let unsupported =
                    crate::coordinator_support::coordinator_entries(&run.settings).err();
                for p in check(&run.settings)
                    .into_iter()
                    .chain(unsupported.into_iter().flatten())
                {
                    let p = format!("sweep run {}: {p}", run.label);
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(Self { base, sweep })
        } else {
            Err(ParseFailure::Invalid(problems))
        }
    }
}

/// Why an experiment text was refused.
#[derive(Debug)]
pub enum ParseFailure {
    /// Not TOML, a wrong type, or an unknown key (the message names it).
    Toml(String),
    /// Every impossible or unsupported value.
    Invalid(Vec<String>),
}

impl fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseFailure::Toml(m) => f.write_str(m),
            ParseFailure::Invalid(p) => f.write_str(&p.join("\n")),
        }
    }
}

struct RawParts {
    name: Option<String>,
    seed: Option<u64>,
    data: RawData,
    model: RawModel,
    federation: RawFederation,
    baselines: RawBaselines,
    compute: RawCompute,
}

/// Applies the defaults; problems that do not depend on the sweep go to `problems`.
fn resolve(raw: RawParts, default_name: &str, problems: &mut Vec<String>) -> Settings {
    let d = raw.data;
    let source = d.source.unwrap_or(Source::Synthetic);
    match (source, &d.path) {
        (Source::Deeppcb, None) => problems.push(
            "data.source is \"deeppcb\" but no folder is given: set data.path or pass --data /path/to/PCBData".into(),
        ),
        (Source::Synthetic, Some(p)) => problems.push(format!(
            "data.path ({}) is set but data.source is \"synthetic\"; set source = \"deeppcb\" or remove the path",
            p.display()
        )),
        _ => {}
    }
    let split = d.split.unwrap_or(SplitKind::Group);
    let image_size = d.image_size.unwrap_or(128);
    let synthetic_only = [
        ("train_per_plant", d.train_per_plant.is_some()),
        ("test_per_plant", d.test_per_plant.is_some()),
        ("image_size", d.image_size.is_some()),
        ("size_skew", d.size_skew.is_some()),
    ];
    if source == Source::Deeppcb {
        for (key, given) in synthetic_only {
            if given {
                problems.push(format!(
                    "data.{key} only shapes synthetic plants; remove it for source = \"deeppcb\""
                ));
            }
        }
    }
    let default_input = match source {
        Source::Synthetic => image_size,
        Source::Deeppcb => 640,
    };
    let input_size = raw.model.input_size.unwrap_or(default_input);
    let default_crop = match source {
        // About 3/5 of the board, like DeepPCB's 320 crops of 640 images.
        Source::Synthetic => ((input_size * 3 / 5) / 32 * 32).clamp(32, input_size.max(32)),
        Source::Deeppcb => 320.min(input_size),
    };
    let arch = ArchConfig::default();
    let f = raw.federation;
    Settings {
        name: raw.name.unwrap_or_else(|| default_name.to_string()),
        seed: raw.seed.unwrap_or(1),
        data: DataSettings {
            source,
            path: d.path,
            split,
            plants: d.plants.unwrap_or(match source {
                Source::Synthetic => 3,
                Source::Deeppcb => DEEPPCB_GROUPS,
            }),
            alpha: d.alpha.unwrap_or(1.0),
            train_per_plant: d.train_per_plant.unwrap_or(64),
            test_per_plant: d.test_per_plant.unwrap_or(16),
            image_size,
            size_skew: d.size_skew.unwrap_or(0.0),
            eval_limit: d.eval_limit.unwrap_or(0),
        },
        model: ModelSettings {
            input_size,
            crop_size: raw.model.crop_size.unwrap_or(default_crop),
            width: raw.model.width.unwrap_or(arch.width),
            fpn_width: raw.model.fpn_width.unwrap_or(arch.fpn_width),
            head_width: raw.model.head_width.unwrap_or(arch.head_width),
        },
        federation: FederationSettings {
            rounds: f.rounds.unwrap_or(4),
            local_epochs: f.local_epochs.unwrap_or(1),
            learning_rate: f.learning_rate.unwrap_or(2e-3),
            batch_size: f.batch_size.unwrap_or(8),
            codec: f.codec.unwrap_or_else(|| "q8".into()),
            fedprox_mu: f.fedprox_mu.unwrap_or(0.0),
            participation: f.participation.unwrap_or(1.0),
            strategy: f.strategy.unwrap_or_else(|| "fedavg".into()),
            deadline_secs: f.deadline_secs.unwrap_or(600),
            warmup_steps: f.warmup_steps.unwrap_or(20),
        },
        baselines: BaselineSettings {
            centralised: raw.baselines.centralised.unwrap_or(true),
            local_only: raw.baselines.local_only.unwrap_or(true),
        },
        compute: ComputeSettings {
            device: raw.compute.device.unwrap_or_else(|| "auto".into()),
            plant_threads: raw.compute.plant_threads.unwrap_or(1),
            threads: raw.compute.threads.unwrap_or(2),
        },
    }
}

/// Every impossible value of one run's settings.
pub fn check(s: &Settings) -> Vec<String> {
    let mut p = Vec::new();
    let d = &s.data;
    if d.plants < 2 {
        p.push(format!(
            "data.plants: {} plant(s) cannot federate; use at least 2",
            d.plants
        ));
    }
    if !(d.alpha.is_finite() && d.alpha > 0.0) {
        p.push(format!("data.alpha: {} must be a positive number", d.alpha));
    }
    if d.source == Source::Deeppcb && d.split == SplitKind::Group && d.plants > DEEPPCB_GROUPS {
        p.push(format!(
            "data.plants: {} plants cannot each hold whole board groups of DeepPCB, which has {DEEPPCB_GROUPS}; use at most {DEEPPCB_GROUPS} or split = \"dirichlet\" / \"iid\"",
            d.plants
        ));
    }
    if d.source == Source::Synthetic {
        if d.train_per_plant < 2 {
            p.push("data.train_per_plant: must be at least 2".into());
        }
        if d.test_per_plant == 0 {
            p.push("data.test_per_plant: must be at least 1 (each plant is scored on its own test boards)".into());
        }
        if d.image_size < 64 || d.image_size % 32 != 0 {
            p.push(format!(
                "data.image_size: {} must be a multiple of 32, at least 64",
                d.image_size
            ));
        }
        if !(d.size_skew.is_finite() && d.size_skew >= 0.0) {
            p.push(format!(
                "data.size_skew: {} must be 0 (even) or positive",
                d.size_skew
            ));
        }
    }
    let m = &s.model;
    if m.input_size < 32 || m.input_size % 32 != 0 {
        p.push(format!(
            "model.input_size: {} must be a multiple of 32",
            m.input_size
        ));
    }
    if m.crop_size < 32 || m.crop_size % 32 != 0 || m.crop_size > m.input_size {
        p.push(format!(
            "model.crop_size: {} must be a multiple of 32 no larger than input_size {}",
            m.crop_size, m.input_size
        ));
    }
    if !(m.width.is_finite() && m.width > 0.0) {
        p.push(format!("model.width: {} must be positive", m.width));
    }
    if m.fpn_width == 0 || m.head_width == 0 {
        p.push("model.fpn_width and model.head_width must be at least 1".into());
    }
    let f = &s.federation;
    for (key, v) in [
        ("rounds", f.rounds),
        ("local_epochs", f.local_epochs),
        ("batch_size", f.batch_size),
    ] {
        if v == 0 {
            p.push(format!("federation.{key}: must be at least 1"));
        }
    }
    if f.deadline_secs == 0 {
        p.push("federation.deadline_secs: must be at least 1".into());
    }
    if !(f.learning_rate.is_finite() && f.learning_rate > 0.0) {
        p.push(format!(
            "federation.learning_rate: {} must be positive",
            f.learning_rate
        ));
    }
    if let Err(e) = Codec::from_str(&f.codec) {
        p.push(format!(
            "federation.codec: {e}; use f32, f16, q8 or q8:<block>"
        ));
    }
    if !(f.fedprox_mu.is_finite() && f.fedprox_mu >= 0.0) {
        p.push(format!(
            "federation.fedprox_mu: {} must be 0 (plain FedAvg) or positive",
            f.fedprox_mu
        ));
    }
    if !(f.participation > 0.0 && f.participation <= 1.0) {
        p.push(format!(
            "federation.participation: {} must be in (0, 1], the share of plants asked each round",
            f.participation
        ));
    } else if d.plants >= 2 && participants(d.plants, f.participation) < 2 {
        p.push(format!(
            "federation.participation: {} of {} plants asks fewer than 2 plants per round; raise it",
            f.participation, d.plants
        ));
    }
    if !["auto", "cpu", "cuda"].contains(&s.compute.device.as_str()) {
        p.push(format!(
            "compute.device: '{}' is not auto, cpu or cuda",
            s.compute.device
        ));
    }
    if s.compute.plant_threads == 0 || s.compute.threads == 0 {
        p.push("compute.plant_threads and compute.threads must be at least 1".into());
    }
    p
}

/// Why sweeping `key` would change nothing with these base settings, if it would not.
fn no_effect(base: &Settings, key: &str) -> Option<String> {
    let d = &base.data;
    match key {
        "alpha" if d.source == Source::Deeppcb && d.split != SplitKind::Dirichlet => Some(format!(
            "alpha only shapes synthetic plants or split = \"dirichlet\"; DeepPCB split = \"{}\" ignores it",
            match d.split {
                SplitKind::Group => "group",
                SplitKind::Iid => "iid",
                SplitKind::Dirichlet => "dirichlet",
            }
        )),
        "size_skew" if d.source == Source::Deeppcb => {
            Some("size_skew only shapes synthetic plants".into())
        }
        _ => None,
    }
}

/// Plants asked per round: `participation` of `plants`, rounded up.
pub fn participants(plants: u32, participation: f64) -> u32 {
    ((f64::from(plants) * participation).ceil() as u32).clamp(1, plants.max(1))
}

impl Settings {
    pub fn codec(&self) -> Codec {
        Codec::from_str(&self.federation.codec).expect("the codec was checked when parsed")
    }

    /// The resolved settings as TOML, written into each run's folder.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render the settings: {e}\n"))
    }
}
