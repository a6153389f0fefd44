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
    /// A COCO detection JSON of training images (`data.path` or `--data`) and one of test
    /// images (`data.test_path`); see [`crate::coco_data`].
    Coco,
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
    /// The DeepPCB `PCBData` folder (deeppcb) or the training COCO JSON (coco).
    pub path: Option<PathBuf>,
    /// COCO: the held-out global test set, a second COCO JSON with the same categories.
    pub test_path: Option<PathBuf>,
    /// COCO: the folder the JSONs' `file_name`s are relative to (default: `path`'s folder).
    pub images: Option<PathBuf>,
    /// COCO: how an image's group is found: `folder` (the first component of its
    /// `file_name`) or the name of a field of its image record (e.g. `site`).
    pub group_by: String,
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
    /// Score every this many rounds' models (and always the last round's); 1 scores all.
    /// Long studies spend as long scoring a version as training a round on a CPU.
    pub eval_every: u32,
    /// Also score, for each method, the element-wise mean of its last this many models (the
    /// federation's last published versions, a baseline's last rounds); 0: off.
    pub tail_mean: u32,
    /// Synthetic: `[[data.style]]`, plants whose look is set rather than drawn from the seed.
    pub style: Vec<PlantShift>,
    /// Synthetic: `[[data.drift]]`, plants whose look changes from a round on.
    pub drift: Vec<PlantShift>,
}

/// How a synthetic plant looks, set instead of drawn (`[[data.style]]`), or from a round on
/// (`[[data.drift]]`, with `from_round`). Unset knobs keep the plant's drawn values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlantShift {
    /// The plant, counted from 1 (`plant-01`).
    pub plant: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_round: Option<u32>,
    /// Lighting: multiplies intensities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gain: Option<f32>,
    /// Lighting: added to intensities (grey levels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<f32>,
    /// Sensor noise, standard deviation in grey levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<f32>,
    /// Optical blur, Gaussian sigma in pixels (0: sharp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur: Option<f32>,
    /// Camera scale: the board appears this many times larger (0.5..2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// Multiplies the size of every defect drawn (0.5..3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defect_scale: Option<f32>,
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
    /// Whether the federated arm runs. `false` runs only the baselines, with the budget
    /// `rounds` x `local_epochs` still set here: the coordinator starts holding
    /// (`round.hold`: it opens no round), the plants register and the initial model is
    /// fetched (so the baselines start from the very model a federation would), then the
    /// federation stops.
    pub enabled: bool,
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
    /// FedAvg's step multiplied by this at the coordinator (`[aggregation]
    /// server_learning_rate`); 1 is plain FedAvg.
    pub server_learning_rate: f64,
    /// Heavy-ball momentum of the coordinator's step (`[aggregation] server_momentum`); 0 is
    /// none.
    pub server_momentum: f64,
    pub deadline_secs: u64,
    pub warmup_steps: u64,
    /// Rounds sharing one learning-rate cosine, the plants (and the baselines) carrying their
    /// AdamW moments from round to round (`[round] lr_cycle_rounds`); 0: a cosine per round.
    pub lr_cycle_rounds: u64,
    /// Plants as agents inside `simulate` (one runtime, still over mutual TLS gRPC) rather
    /// than one `client run` process each; default above [`IN_PROCESS_ABOVE`] plants.
    pub plants_in_process: bool,
}

impl FederationSettings {
    /// The strategy as the coordinator names it in a version's record:
    /// `fedavg(server_lr=2)` when a server learning rate is set,
    /// `fedavg(server_lr=1,momentum=0.5)` with server momentum.
    pub fn strategy_label(&self) -> String {
        let (lr, m) = (self.server_learning_rate, self.server_momentum);
        if lr == 1.0 && m == 0.0 {
            self.strategy.clone()
        } else {
            fedinspect_common::fedavg::step_name(lr, m)
        }
    }
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
    /// In-process plants: at most this many train at once (wall time only, not results).
    pub concurrent_trainings: u32,
}

/// Above this many plants, plants run in process unless the file says otherwise.
pub const IN_PROCESS_ABOVE: u32 = 32;

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
    test_path: Option<PathBuf>,
    images: Option<PathBuf>,
    group_by: Option<String>,
    split: Option<SplitKind>,
    plants: Option<u32>,
    alpha: Option<f64>,
    train_per_plant: Option<usize>,
    test_per_plant: Option<usize>,
    image_size: Option<u32>,
    size_skew: Option<f64>,
    eval_limit: Option<usize>,
    eval_every: Option<u32>,
    tail_mean: Option<u32>,
    #[serde(default)]
    style: Vec<PlantShift>,
    #[serde(default)]
    drift: Vec<PlantShift>,
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
    enabled: Option<bool>,
    rounds: Option<u32>,
    local_epochs: Option<u32>,
    learning_rate: Option<f64>,
    batch_size: Option<u32>,
    codec: Option<String>,
    fedprox_mu: Option<f64>,
    participation: Option<f64>,
    strategy: Option<String>,
    server_learning_rate: Option<f64>,
    server_momentum: Option<f64>,
    deadline_secs: Option<u64>,
    warmup_steps: Option<u64>,
    lr_cycle_rounds: Option<u64>,
    plants_in_process: Option<bool>,
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
    concurrent_trainings: Option<u32>,
}

/// DeepPCB's training split holds seven board groups: its natural plants.
pub const DEEPPCB_GROUPS: u32 = 7;

/// `data.group_by` that groups COCO images by the first folder of their `file_name`.
pub const GROUP_BY_FOLDER: &str = "folder";

impl Experiment {
    /// Reads `path`; `data` (the `--data` flag) replaces `data.path` and implies
    /// `source = "deeppcb"` (`"coco"` for a `.json` file) when the file names no source.
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
            let json = d
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("json"));
            raw.data
                .source
                .get_or_insert(if json { Source::Coco } else { Source::Deeppcb });
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
        (Source::Coco, None) => problems.push(
            "data.source is \"coco\" but no training JSON is given: set data.path or pass --data /path/to/train.json".into(),
        ),
        (Source::Synthetic, Some(p)) => problems.push(format!(
            "data.path ({}) is set but data.source is \"synthetic\"; set source = \"deeppcb\" or \"coco\", or remove the path",
            p.display()
        )),
        _ => {}
    }
    check_coco_keys(source, &d, problems);
    let split = d.split.unwrap_or(SplitKind::Group);
    let image_size = d.image_size.unwrap_or(128);
    let synthetic_only = [
        ("train_per_plant", d.train_per_plant.is_some()),
        ("test_per_plant", d.test_per_plant.is_some()),
        ("image_size", d.image_size.is_some()),
        ("size_skew", d.size_skew.is_some()),
        ("style", !d.style.is_empty()),
        ("drift", !d.drift.is_empty()),
    ];
    if source != Source::Synthetic {
        let name = if source == Source::Coco {
            "coco"
        } else {
            "deeppcb"
        };
        for (key, given) in synthetic_only {
            if given {
                problems.push(format!(
                    "data.{key} only shapes synthetic plants; remove it for source = \"{name}\""
                ));
            }
        }
    }
    let default_input = match source {
        Source::Synthetic => image_size,
        Source::Deeppcb | Source::Coco => 640,
    };
    let input_size = raw.model.input_size.unwrap_or(default_input);
    let default_crop = match source {
        // About 3/5 of the board, like DeepPCB's 320 crops of 640 images.
        Source::Synthetic => ((input_size * 3 / 5) / 32 * 32).clamp(32, input_size.max(32)),
        Source::Deeppcb | Source::Coco => 320.min(input_size),
    };
    let arch = ArchConfig::default();
    let f = raw.federation;
    let plants = d.plants.unwrap_or(match source {
        Source::Synthetic | Source::Coco => 3,
        Source::Deeppcb => DEEPPCB_GROUPS,
    });
    let plant_threads = raw.compute.plant_threads.unwrap_or(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mut drift = d.drift;
    drift.sort_by_key(|s| (s.plant, s.from_round));
    Settings {
        name: raw.name.unwrap_or_else(|| default_name.to_string()),
        seed: raw.seed.unwrap_or(1),
        data: DataSettings {
            source,
            path: d.path,
            test_path: d.test_path,
            images: d.images,
            group_by: d.group_by.unwrap_or_else(|| GROUP_BY_FOLDER.into()),
            split,
            plants,
            alpha: d.alpha.unwrap_or(1.0),
            train_per_plant: d.train_per_plant.unwrap_or(64),
            test_per_plant: d.test_per_plant.unwrap_or(16),
            image_size,
            size_skew: d.size_skew.unwrap_or(0.0),
            eval_limit: d.eval_limit.unwrap_or(0),
            eval_every: d.eval_every.unwrap_or(1),
            tail_mean: d.tail_mean.unwrap_or(0),
            style: d.style,
            drift,
        },
        model: ModelSettings {
            input_size,
            crop_size: raw.model.crop_size.unwrap_or(default_crop),
            width: raw.model.width.unwrap_or(arch.width),
            fpn_width: raw.model.fpn_width.unwrap_or(arch.fpn_width),
            head_width: raw.model.head_width.unwrap_or(arch.head_width),
        },
        federation: FederationSettings {
            enabled: f.enabled.unwrap_or(true),
            rounds: f.rounds.unwrap_or(4),
            local_epochs: f.local_epochs.unwrap_or(1),
            learning_rate: f.learning_rate.unwrap_or(2e-3),
            batch_size: f.batch_size.unwrap_or(8),
            codec: f.codec.unwrap_or_else(|| "q8".into()),
            fedprox_mu: f.fedprox_mu.unwrap_or(0.0),
            participation: f.participation.unwrap_or(1.0),
            strategy: f.strategy.unwrap_or_else(|| "fedavg".into()),
            server_learning_rate: f.server_learning_rate.unwrap_or(1.0),
            server_momentum: f.server_momentum.unwrap_or(0.0),
            deadline_secs: f.deadline_secs.unwrap_or(600),
            warmup_steps: f.warmup_steps.unwrap_or(20),
            lr_cycle_rounds: f.lr_cycle_rounds.unwrap_or(0),
            plants_in_process: f.plants_in_process.unwrap_or(plants > IN_PROCESS_ABOVE),
        },
        baselines: BaselineSettings {
            centralised: raw.baselines.centralised.unwrap_or(true),
            local_only: raw.baselines.local_only.unwrap_or(true),
        },
        compute: ComputeSettings {
            device: raw.compute.device.unwrap_or_else(|| "auto".into()),
            plant_threads,
            threads: raw.compute.threads.unwrap_or(2),
            concurrent_trainings: raw
                .compute
                .concurrent_trainings
                .unwrap_or((cores / plant_threads.max(1)).max(1)),
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
    if d.eval_every == 0 {
        p.push("data.eval_every: 0; use 1 to score every round's models, or N to score every Nth round's (the last round is always scored)".into());
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
    if !f.enabled && !s.baselines.centralised && !s.baselines.local_only {
        p.push("federation.enabled = false with both baselines off leaves nothing to run; set baselines.centralised or baselines.local_only to true".into());
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
    if s.compute.concurrent_trainings == 0 {
        p.push("compute.concurrent_trainings must be at least 1".into());
    }
    check_shifts(s, &mut p);
    p
}

/// Problems of `[[data.style]]` and `[[data.drift]]`.
fn check_shifts(s: &Settings, p: &mut Vec<String>) {
    let d = &s.data;
    for (table, shifts) in [("style", &d.style), ("drift", &d.drift)] {
        for (i, sh) in shifts.iter().enumerate() {
            let at = format!("data.{table}[{i}]");
            if sh.plant == 0 || sh.plant > d.plants {
                p.push(format!(
                    "{at}.plant: {} is not a plant; plants are counted from 1 to {}",
                    sh.plant, d.plants
                ));
            }
            let ranges: [(&str, Option<f32>, f32, f32); 6] = [
                ("gain", sh.gain, 0.05, 4.0),
                ("offset", sh.offset, -128.0, 128.0),
                ("noise", sh.noise, 0.0, 64.0),
                ("blur", sh.blur, 0.0, 8.0),
                ("scale", sh.scale, 0.5, 2.0),
                ("defect_scale", sh.defect_scale, 0.5, 3.0),
            ];
            for (key, v, lo, hi) in ranges {
                if let Some(v) = v.filter(|v| !(v.is_finite() && (lo..=hi).contains(v))) {
                    p.push(format!("{at}.{key}: {v} must be between {lo} and {hi}"));
                }
            }
            match (table, sh.from_round) {
                ("style", Some(_)) => p.push(format!(
                    "{at}.from_round: a style holds from the start; put a change from a round on in [[data.drift]]"
                )),
                ("drift", None) => p.push(format!(
                    "{at}.from_round: missing; say from which round the plant's data changes"
                )),
                ("drift", Some(r)) if r < 2 || r > s.federation.rounds => p.push(format!(
                    "{at}.from_round: {r} must be between 2 and the last round {} (round 1's look is [[data.style]])",
                    s.federation.rounds
                )),
                _ => {}
            }
        }
    }
    if !d.drift.is_empty() {
        if d.split != SplitKind::Group {
            p.push("data.drift: needs split = \"group\" (a synthetic plant's boards are its own group, redrawn when it drifts)".into());
        }
        if !s.federation.plants_in_process {
            p.push("data.drift: needs federation.plants_in_process = true (the drifting plant is rebuilt on its new data between two rounds)".into());
        }
        if s.federation.participation < 1.0 {
            p.push("data.drift: needs federation.participation = 1.0 (the plant switches once it delivered the round before the drift)".into());
        }
    }
}

/// Problems of the COCO-only keys: `test_path` is required for COCO, and the COCO keys mean
/// nothing for other sources.
fn check_coco_keys(source: Source, d: &RawData, problems: &mut Vec<String>) {
    let coco_only = [
        ("test_path", d.test_path.is_some()),
        ("images", d.images.is_some()),
        ("group_by", d.group_by.is_some()),
    ];
    if source != Source::Coco {
        for (key, given) in coco_only {
            if given {
                problems.push(format!(
                    "data.{key} only applies to source = \"coco\"; remove it or set source = \"coco\""
                ));
            }
        }
        return;
    }
    if d.test_path.is_none() {
        problems.push(
            "data.test_path: required for source = \"coco\": a second COCO JSON of held-out images (the global test set, with the same categories as data.path)".into(),
        );
    }
    if d.group_by.as_deref().is_some_and(|g| g.trim().is_empty()) {
        problems.push(format!(
            "data.group_by: empty; use \"{GROUP_BY_FOLDER}\" (the first folder of each file_name) or the name of an image field such as \"site\""
        ));
    }
}

/// Why sweeping `key` would change nothing with these base settings, if it would not.
fn no_effect(base: &Settings, key: &str) -> Option<String> {
    let d = &base.data;
    match key {
        "alpha" if d.source != Source::Synthetic && d.split != SplitKind::Dirichlet => Some(format!(
            "alpha only shapes synthetic plants or split = \"dirichlet\"; {} split = \"{}\" ignores it",
            if d.source == Source::Coco { "COCO" } else { "DeepPCB" },
            match d.split {
                SplitKind::Group => "group",
                SplitKind::Iid => "iid",
                SplitKind::Dirichlet => "dirichlet",
            }
        )),
        "size_skew" if d.source != Source::Synthetic => {
            Some("size_skew only shapes synthetic plants".into())
        }
        _ => None,
    }
}

/// Plants asked per round: `participation` of `plants`, rounded up.
pub fn participants(plants: u32, participation: f64) -> u32 {
    ((f64::from(plants) * participation).ceil() as u32).clamp(1, plants.max(1))
}

impl DataSettings {
    /// Whether round `round` of `rounds` is scored under `eval_every`: every Nth round and
    /// the last one.
    pub fn scores_round(&self, round: u64, rounds: u64) -> bool {
        round == rounds || round % u64::from(self.eval_every.max(1)) == 0
    }

    /// The federation's rounds to score, given each round and whether it published a version:
    /// every Nth round that published and the last that did (the federation's result, even
    /// when a later round failed).
    pub fn federated_rounds_scored(&self, rounds: &[(u64, bool)]) -> Vec<u64> {
        let last = rounds
            .iter()
            .rev()
            .find(|(_, published)| *published)
            .map_or(0, |(r, _)| *r);
        rounds
            .iter()
            .filter(|&&(r, published)| published && self.scores_round(r, last) && r <= last)
            .map(|(r, _)| *r)
            .collect()
    }
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
