//! The `[promotion]` section of `coordinator.toml`, resolved into a [`PromotionGate`]: which
//! command evaluates a candidate on central IT's validation set, how far its `map_50` may drop
//! below the promoted version's, and how long the command may run.
//!
//! ```toml
//! [promotion]
//! # Must print one JSON object with map_50 on stdout (`client eval --json` does).
//! eval_command = ["/opt/fedinspect/client", "eval", "--data", "/srv/validation/PCBData",
//!                 "--checkpoint", "{model}", "--json", "--device", "cpu"]
//! max_map50_drop = 0.01      # default 0: any drop is refused
//! timeout_secs = 900         # default 900
//! evaluate_on_publish = true # default false: versions are evaluated when promoted
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::config_problems::resolve;
use fedinspect_common::ModelState;
use serde::Deserialize;

/// What `{model}` in `eval_command` is replaced with: the exported candidate's path.
pub const MODEL_PLACEHOLDER: &str = "{model}";
/// Default time limit of one evaluation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(900);
/// Metadata keys of a client checkpoint that describe the model, copied from `initial_model`
/// into every exported candidate so that `client eval` can load it. Training state
/// (`fedinspect.training`, `fedinspect.optimizer`) is left out: the candidate has none.
const CHECKPOINT_KEYS_SKIPPED: [&str; 2] = ["fedinspect.training", "fedinspect.optimizer"];
const CHECKPOINT_KEY_PREFIX: &str = "fedinspect.";

/// The section as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPromotion {
    pub eval_command: Option<Vec<String>>,
    pub max_map50_drop: Option<f64>,
    pub timeout_secs: Option<u64>,
    pub evaluate_on_publish: Option<bool>,
}

/// The resolved section: promotion is refused unless the candidate's `map_50` on the
/// validation set is at most `max_map50_drop` below the promoted version's.
#[derive(Clone, Debug, PartialEq)]
pub struct PromotionGate {
    /// The program, then its arguments; every `{model}` is replaced by the candidate's path.
    pub eval_command: Vec<String>,
    pub max_map50_drop: f64,
    pub timeout: Duration,
    /// Evaluate each version right after it is published, not only when it is promoted.
    pub evaluate_on_publish: bool,
    /// Safetensors metadata written into each exported candidate: the model description of
    /// `initial_model` when it is a client checkpoint, so `client eval` can load the file.
    pub checkpoint_metadata: BTreeMap<String, String>,
}

impl PromotionGate {
    /// Resolves the section; a program named with a `/` is taken relative to `base` (the
    /// config's folder), a bare name is looked up on PATH when it runs. Every problem is
    /// listed, prefixed with its key.
    pub fn resolve(
        raw: RawPromotion,
        base: &Path,
        initial_model: Option<&Path>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let eval_command = match raw.eval_command {
            None => {
                problems.push("promotion.eval_command: missing; give the evaluator as a list, e.g. [\"/opt/fedinspect/client\", \"eval\", \"--data\", \"/srv/validation/PCBData\", \"--checkpoint\", \"{model}\", \"--json\"], or remove the [promotion] section".to_string());
                Vec::new()
            }
            Some(cmd) if cmd.is_empty() || cmd[0].trim().is_empty() => {
                problems.push(
                    "promotion.eval_command: empty; its first element is the program to run"
                        .to_string(),
                );
                Vec::new()
            }
            Some(mut cmd) => {
                if !cmd.iter().any(|a| a.contains(MODEL_PLACEHOLDER)) {
                    problems.push(format!(
                        "promotion.eval_command: no argument contains {MODEL_PLACEHOLDER}; put it where the evaluator takes the checkpoint to evaluate"
                    ));
                }
                if cmd[0].contains('/') {
                    cmd[0] = resolve(base, &PathBuf::from(&cmd[0]))
                        .to_string_lossy()
                        .into_owned();
                }
                cmd
            }
        };
        let max_map50_drop = raw.max_map50_drop.unwrap_or(0.0);
        if !(max_map50_drop.is_finite() && (0.0..=1.0).contains(&max_map50_drop)) {
            problems.push(format!(
                "promotion.max_map50_drop: {max_map50_drop} must be between 0 (no drop allowed) and 1"
            ));
        }
        let timeout_secs = raw.timeout_secs.unwrap_or(DEFAULT_TIMEOUT.as_secs());
        if timeout_secs == 0 {
            problems.push("promotion.timeout_secs: must be at least 1".to_string());
        }
        let checkpoint_metadata = match initial_model.map(checkpoint_metadata).transpose() {
            Ok(m) => m.unwrap_or_default(),
            Err(e) => {
                problems.push(format!("promotion: {e}"));
                BTreeMap::new()
            }
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            eval_command,
            max_map50_drop,
            timeout: Duration::from_secs(timeout_secs),
            evaluate_on_publish: raw.evaluate_on_publish.unwrap_or(false),
            checkpoint_metadata,
        })
    }
}

/// The model-describing `fedinspect.*` metadata of the checkpoint at `path` (empty when it is
/// a bare state dict).
fn checkpoint_metadata(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let (_, meta) = ModelState::load_safetensors(path).map_err(|e| {
        format!(
            "cannot read initial_model {} for the checkpoint metadata of exported candidates: {e}",
            path.display()
        )
    })?;
    Ok(meta
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with(CHECKPOINT_KEY_PREFIX) && !CHECKPOINT_KEYS_SKIPPED.contains(&k.as_str())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(cmd: &[&str]) -> RawPromotion {
        RawPromotion {
            eval_command: Some(cmd.iter().map(|s| s.to_string()).collect()),
            ..RawPromotion::default()
        }
    }

    #[test]
    fn defaults_refuse_any_drop_within_fifteen_minutes() {
        let g = PromotionGate::resolve(raw(&["eval", "{model}"]), Path::new("/cfg"), None).unwrap();
        assert_eq!(
            g.eval_command,
            ["eval", "{model}"],
            "a bare name stays for PATH"
        );
        assert_eq!(g.max_map50_drop, 0.0);
        assert_eq!(g.timeout, DEFAULT_TIMEOUT);
        assert!(!g.evaluate_on_publish);
    }

    #[test]
    fn a_relative_program_path_is_taken_from_the_config_folder() {
        let g = PromotionGate::resolve(
            raw(&["bin/eval.sh", "--m={model}"]),
            Path::new("/cfg"),
            None,
        )
        .unwrap();
        assert_eq!(g.eval_command[0], "/cfg/bin/eval.sh");
    }

    #[test]
    fn the_section_is_read_from_toml_and_unknown_keys_are_refused() {
        let raw: crate::config::RawConfig = toml::from_str(
            "[promotion]\neval_command = [\"eval\", \"{model}\"]\nmax_map50_drop = 0.01\ntimeout_secs = 5\nevaluate_on_publish = true\n",
        )
        .unwrap();
        let g = PromotionGate::resolve(raw.promotion.unwrap(), Path::new("/"), None).unwrap();
        assert_eq!(g.max_map50_drop, 0.01);
        assert_eq!(g.timeout, Duration::from_secs(5));
        assert!(g.evaluate_on_publish);
        let e = toml::from_str::<crate::config::RawConfig>("[promotion]\nmax_drop = 0.1\n")
            .unwrap_err();
        assert!(e.to_string().contains("max_drop"), "{e}");
    }

    #[test]
    fn every_problem_is_listed() {
        let mut r = raw(&["eval", "--checkpoint", "x.safetensors"]);
        r.max_map50_drop = Some(-0.5);
        r.timeout_secs = Some(0);
        let problems = PromotionGate::resolve(r, Path::new("/cfg"), None).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("{model}"), "{problems:?}");
        assert!(problems[1].contains("max_map50_drop"), "{problems:?}");
        assert!(problems[2].contains("timeout_secs"), "{problems:?}");
        let missing =
            PromotionGate::resolve(RawPromotion::default(), Path::new("/"), None).unwrap_err();
        assert!(missing[0].contains("eval_command: missing"), "{missing:?}");
    }
}
