//! What one run of an experiment measured, per round: the federation's published versions
//! (as the coordinator recorded them: participants, bytes, times, model hash) with their mAP,
//! and the baselines' mAP, each on the global test split, the unseen groups' boards and each
//! plant's own test data. Written as `metrics.json` (everything) and two CSV files in long
//! format for spreadsheets and pandas: `federation_rounds.csv` (one row per round) and
//! `map_by_round.csv` (one row per method, round and test set), and `tail_mean.csv` (each
//! method's mean of its last models, [`crate::tail_mean`]); `memory_by_round.csv` comes from
//! [`crate::memory_report`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use fedinspect_common::fsutil;
use serde::Serialize;

use crate::eval_sets::{Map, ModelScores};
use crate::experiment::Settings;
use crate::process_memory::ProcessMemory;

/// A published (or failed) round of the federation.
#[derive(Clone, Debug, Serialize)]
pub struct FederatedRound {
    pub round: u64,
    /// `None` when the round failed.
    pub version: Option<u64>,
    pub model_hash: Option<String>,
    pub participants: u32,
    /// Encoded delta bytes the coordinator accepted in the round.
    pub bytes_up: u64,
    /// Model bytes the coordinator streamed to plants while the round was open.
    pub bytes_down: u64,
    /// Opening to stored version, by the coordinator's clock.
    pub seconds: f64,
    /// The slowest participant's training, as it reported it.
    pub train_seconds: f64,
    pub scores: Option<ModelScores>,
    pub failure: Option<String>,
}

/// A baseline's model after round-equivalent `round` (0: the initial model).
#[derive(Clone, Debug, Serialize)]
pub struct BaselineRound {
    pub round: u64,
    pub scores: ModelScores,
}

/// Every plant's local-only model after round-equivalent `round`.
#[derive(Clone, Debug, Serialize)]
pub struct LocalOnlyRound {
    pub round: u64,
    /// Mean over the plants' models on the global (and unseen) test sets.
    pub mean_global: Map,
    pub mean_unseen: Option<Map>,
    /// Each plant's own model on its own test data.
    pub own: BTreeMap<String, Map>,
    pub by_plant: BTreeMap<String, ModelScores>,
}

/// The mean of one method's last models (`data.tail_mean`), scored like a model of its own.
#[derive(Clone, Debug, Serialize)]
pub struct TailMean {
    /// The rounds whose models were averaged, first and last.
    pub first_round: u64,
    pub last_round: u64,
    /// Models in the mean (per plant for local-only).
    pub models: usize,
    /// Local-only: the plants' means on the global and unseen sets averaged over the plants,
    /// and each plant's mean on its own test data, as for [`LocalOnlyRound`].
    pub scores: ModelScores,
}

/// Every method's tail mean in a run with `data.tail_mean` set.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TailMeans {
    pub federated: Option<TailMean>,
    pub centralised: Option<TailMean>,
    pub local_only: Option<TailMean>,
}

impl TailMeans {
    pub fn is_empty(&self) -> bool {
        self.federated.is_none() && self.centralised.is_none() && self.local_only.is_none()
    }

    /// `tail_mean.csv`: one row per method and test set.
    pub fn csv(&self) -> String {
        let mut s = String::from("method,first_round,last_round,models,test_set,map_33,map_50\n");
        for (method, t) in [
            ("federated", &self.federated),
            ("centralised", &self.centralised),
            ("local_only", &self.local_only),
        ] {
            let Some(t) = t else { continue };
            let mut row = |set: &str, m: &Map| {
                let _ = writeln!(
                    s,
                    "{method},{},{},{},{set},{},{}",
                    t.first_round,
                    t.last_round,
                    t.models,
                    fmt6(m.map_33),
                    fmt6(m.map_50)
                );
            };
            row("global", &t.scores.global);
            if let Some(u) = &t.scores.unseen {
                row("unseen", u);
            }
            for (p, m) in &t.scores.plants {
                row(p, m);
            }
        }
        s
    }
}

/// A plant as the run set it up.
#[derive(Clone, Debug, Serialize)]
pub struct PlantSummary {
    pub id: String,
    pub groups: Vec<String>,
    pub train_images: usize,
    pub test_images: usize,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RunMetrics {
    pub label: String,
    pub swept: Vec<(String, String)>,
    pub settings: Settings,
    pub plants: Vec<PlantSummary>,
    pub class_skew: f64,
    pub global_test_images: usize,
    pub unseen_test_images: Option<usize>,
    /// The initial model (version 1) on every test set: round 0 of every method.
    pub initial: ModelScores,
    pub federated: Vec<FederatedRound>,
    pub centralised: Vec<BaselineRound>,
    pub local_only: Vec<LocalOnlyRound>,
    /// Each method's mean of its last `data.tail_mean` models; empty when that is 0.
    pub tail_mean: TailMeans,
    /// From starting the processes to stopping them after the last round.
    pub federation_seconds: f64,
    /// Federated rounds per hour of wall-clock time on this machine (start-up included).
    pub rounds_per_hour: f64,
    /// Peak resident memory of the coordinator and of each plant process.
    pub memory: ProcessMemory,
    pub baseline_seconds: f64,
}

impl RunMetrics {
    /// The last federated version's global scores.
    pub fn final_federated(&self) -> Option<Map> {
        self.federated
            .iter()
            .rev()
            .find_map(|r| r.scores.as_ref().map(|s| s.global))
    }

    pub fn final_centralised(&self) -> Option<Map> {
        self.centralised.last().map(|r| r.scores.global)
    }

    pub fn final_local_only(&self) -> Option<Map> {
        self.local_only.last().map(|r| r.mean_global)
    }

    pub fn total_bytes_up(&self) -> u64 {
        self.federated.iter().map(|r| r.bytes_up).sum()
    }

    pub fn total_bytes_down(&self) -> u64 {
        self.federated.iter().map(|r| r.bytes_down).sum()
    }

    /// Writes `metrics.json`, `federation_rounds.csv`, `map_by_round.csv` and (when rounds
    /// ran) `memory_by_round.csv` and (with `data.tail_mean`) `tail_mean.csv` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fsutil::write_bytes_atomic(&dir.join("metrics.json"), &serde_json::to_vec_pretty(self)?)?;
        fsutil::write_bytes_atomic(
            &dir.join("federation_rounds.csv"),
            self.federation_csv().as_bytes(),
        )?;
        fsutil::write_bytes_atomic(&dir.join("map_by_round.csv"), self.map_csv().as_bytes())?;
        if !self.tail_mean.is_empty() {
            fsutil::write_bytes_atomic(
                &dir.join("tail_mean.csv"),
                self.tail_mean.csv().as_bytes(),
            )?;
        }
        if !self.memory.by_round.is_empty() {
            fsutil::write_bytes_atomic(
                &dir.join("memory_by_round.csv"),
                crate::memory_report::csv(&self.memory.by_round).as_bytes(),
            )?;
        }
        Ok(())
    }

    pub fn federation_csv(&self) -> String {
        let mut s = String::from(
            "round,version,model_hash,participants,bytes_up,bytes_down,cumulative_bytes_up,seconds,train_seconds,map_33,map_50,failure\n",
        );
        let mut cumulative = 0;
        for r in &self.federated {
            cumulative += r.bytes_up;
            let global = r.scores.as_ref().map(|s| s.global);
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{:.3},{:.3},{},{},{}",
                r.round,
                opt(r.version),
                r.model_hash.as_deref().unwrap_or(""),
                r.participants,
                r.bytes_up,
                r.bytes_down,
                cumulative,
                r.seconds,
                r.train_seconds,
                opt(global.map(|g| fmt6(g.map_33))),
                opt(global.map(|g| fmt6(g.map_50))),
                csv_text(r.failure.as_deref().unwrap_or("")),
            );
        }
        s
    }

    /// One row per method, round and test set; round 0 is the initial model.
    pub fn map_csv(&self) -> String {
        let mut s = String::from("method,round,test_set,map_33,map_50\n");
        let mut row = |method: &str, round: u64, set: &str, m: &Map| {
            let _ = writeln!(
                s,
                "{method},{round},{set},{},{}",
                fmt6(m.map_33),
                fmt6(m.map_50)
            );
        };
        let mut scored = |method: &str, round: u64, sc: &ModelScores| {
            row(method, round, "global", &sc.global);
            if let Some(u) = &sc.unseen {
                row(method, round, "unseen", u);
            }
            for (p, m) in &sc.plants {
                row(method, round, p, m);
            }
        };
        for method in ["federated", "centralised", "local_only"] {
            let include = match method {
                "centralised" => !self.centralised.is_empty(),
                "local_only" => !self.local_only.is_empty(),
                _ => !self.federated.is_empty(),
            };
            if include {
                scored(method, 0, &self.initial);
            }
        }
        for r in &self.federated {
            if let Some(sc) = &r.scores {
                scored("federated", r.round, sc);
            }
        }
        for r in &self.centralised {
            scored("centralised", r.round, &r.scores);
        }
        for r in &self.local_only {
            let sc = ModelScores {
                global: r.mean_global,
                unseen: r.mean_unseen,
                plants: r.own.clone(),
            };
            scored("local_only", r.round, &sc);
        }
        s
    }
}

/// The mean of `maps` (zeros when empty).
pub fn mean(maps: &[Map]) -> Map {
    let n = maps.len().max(1) as f64;
    Map {
        map_33: maps.iter().map(|m| m.map_33).sum::<f64>() / n,
        map_50: maps.iter().map(|m| m.map_50).sum::<f64>() / n,
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

fn fmt6(x: f64) -> String {
    format!("{x:.6}")
}

/// A CSV field, quoted when it holds a comma, quote or line break.
pub fn csv_text(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
