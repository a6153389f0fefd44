//! The `[bundles]` section of `coordinator.toml`: where trtexec is (or that it is not used),
//! which targets to build engines for, precisions, the build time limit, and what the manifest
//! says about thresholds and batch sizes. Raw (all optional, unknown keys refused) and resolved
//! with every problem reported at once.
//!
//! ```toml
//! [bundles]
//! trtexec = "auto"            # "auto": the PATH; "off": never; or a path to bin/trtexec
//! precisions = ["fp16", "int8"]
//! build_timeout_secs = 1800
//! score_threshold = 0.3
//! max_batch = 8
//! model_name = "fedinspect_detector"
//! [[bundles.targets]]         # the GPUs this host builds for (its own GPU)
//! compute_capability = "8.6"
//! tensorrt_version = "10.3.0" # or the banner number plants report, "100300"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedinspect_common::bundle::trtexec::dotted_tensorrt_version;
use fedinspect_common::bundle::{EnginePrecision, EngineTarget};
use fedinspect_common::config_problems::resolve;
use serde::Deserialize;

/// Default time limit of one engine build.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundleSettings {
    pub trtexec: Option<String>,
    pub targets: Option<Vec<RawTarget>>,
    pub precisions: Option<Vec<String>>,
    pub build_timeout_secs: Option<u64>,
    pub score_threshold: Option<f32>,
    pub max_batch: Option<u32>,
    pub model_name: Option<String>,
    /// Push policy and the model's description: read by [`super::BundleConfig`].
    pub canary_plants: Option<Vec<String>>,
    pub confirm_after_secs: Option<u64>,
    pub resend_secs: Option<u64>,
    pub class_names: Option<Vec<String>>,
    pub architecture: Option<fedinspect_common::arch::ArchConfig>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub compute_capability: Option<String>,
    pub tensorrt_version: Option<String>,
}

/// Where trtexec comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TrtexecChoice {
    /// The first `trtexec` on the PATH, if any.
    Auto,
    /// Never build engines here.
    Off,
    /// This file, which must exist.
    Path(PathBuf),
}

/// Resolved settings.
#[derive(Clone, Debug, PartialEq)]
pub struct BundleSettings {
    pub trtexec: TrtexecChoice,
    pub targets: Vec<EngineTarget>,
    pub precisions: Vec<EnginePrecision>,
    pub build_timeout: Duration,
    pub score_threshold: f32,
    pub max_batch: u32,
    pub model_name: String,
    /// `<data_dir>/bundles`: built bundles and their archives.
    pub root: PathBuf,
    /// `<data_dir>/engine-cache`.
    pub engine_cache: PathBuf,
}

impl BundleSettings {
    /// Resolves `raw` (paths relative to `base`, the config file's folder); every problem is
    /// listed, prefixed with its key.
    pub fn resolve(
        raw: RawBundleSettings,
        base: &Path,
        data_dir: &Path,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let trtexec = match raw.trtexec.as_deref() {
            None | Some("auto") => TrtexecChoice::Auto,
            Some("off") => TrtexecChoice::Off,
            Some(p) => TrtexecChoice::Path(resolve(base, Path::new(p))),
        };
        let targets = resolve_targets(raw.targets.unwrap_or_default(), &mut problems);
        let precisions = resolve_precisions(raw.precisions, &mut problems);
        let build_timeout = match raw.build_timeout_secs {
            None => DEFAULT_BUILD_TIMEOUT,
            Some(0) => {
                problems.push(
                    "bundles.build_timeout_secs: 0; give the seconds one engine build may take \
                     (e.g. 1800)"
                        .into(),
                );
                DEFAULT_BUILD_TIMEOUT
            }
            Some(s) => Duration::from_secs(s),
        };
        let score_threshold = raw.score_threshold.unwrap_or(0.3);
        if !(0.0..=1.0).contains(&score_threshold) {
            problems.push(format!(
                "bundles.score_threshold: {score_threshold} is not in [0, 1]"
            ));
        }
        let max_batch = raw.max_batch.unwrap_or(8);
        if !(1..=1024).contains(&max_batch) {
            problems.push(format!("bundles.max_batch: {max_batch} is not in 1..=1024"));
        }
        let model_name = raw
            .model_name
            .unwrap_or_else(|| "fedinspect_detector".into());
        let name_ok = !model_name.is_empty()
            && model_name.len() <= 64
            && model_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            problems.push(format!(
                "bundles.model_name: '{model_name}' must be 1 to 64 characters from \
                 [A-Za-z0-9_-] (it becomes the Triton model name)"
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            trtexec,
            targets,
            precisions,
            build_timeout,
            score_threshold,
            max_batch,
            model_name,
            root: data_dir.join("bundles"),
            engine_cache: data_dir.join("engine-cache"),
        })
    }
}

fn resolve_targets(raw: Vec<RawTarget>, problems: &mut Vec<String>) -> Vec<EngineTarget> {
    let mut targets = Vec::new();
    for (i, t) in raw.into_iter().enumerate() {
        let at = format!("bundles.targets[{i}]");
        let (Some(cc), Some(trt)) = (t.compute_capability, t.tensorrt_version) else {
            problems.push(format!(
                "{at}: needs compute_capability (e.g. \"8.6\") and tensorrt_version \
                 (e.g. \"10.3.0\")"
            ));
            continue;
        };
        let Some(dotted) = dotted_tensorrt_version(&trt) else {
            problems.push(format!(
                "{at}.tensorrt_version: '{trt}' is neither dotted (10.3.0) nor a trtexec \
                 banner number (100300)"
            ));
            continue;
        };
        let target = EngineTarget {
            compute_capability: cc,
            tensorrt_version: dotted,
        };
        match target.validate() {
            Ok(()) if targets.contains(&target) => {
                problems.push(format!("{at}: {target} is listed twice"))
            }
            Ok(()) => targets.push(target),
            Err(why) => problems.push(format!("{at}: {why}")),
        }
    }
    targets
}

fn resolve_precisions(
    raw: Option<Vec<String>>,
    problems: &mut Vec<String>,
) -> Vec<EnginePrecision> {
    let raw = raw.unwrap_or_else(|| vec!["fp16".into(), "int8".into()]);
    let mut out = Vec::new();
    for p in raw {
        let precision = match p.as_str() {
            "fp16" => EnginePrecision::Fp16,
            "int8" => EnginePrecision::Int8,
            other => {
                problems.push(format!("bundles.precisions: '{other}' is not fp16 or int8"));
                continue;
            }
        };
        if !out.contains(&precision) {
            out.push(precision);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_str(text: &str) -> Result<BundleSettings, Vec<String>> {
        let raw: RawBundleSettings = toml::from_str(text).unwrap();
        BundleSettings::resolve(raw, Path::new("/c"), Path::new("/d"))
    }

    #[test]
    fn defaults() {
        let s = resolve_str("").unwrap();
        assert_eq!(s.trtexec, TrtexecChoice::Auto);
        assert_eq!(s.precisions, [EnginePrecision::Fp16, EnginePrecision::Int8]);
        assert_eq!(s.root, Path::new("/d/bundles"));
        assert_eq!(s.build_timeout, DEFAULT_BUILD_TIMEOUT);
        assert!(s.targets.is_empty());
    }

    #[test]
    fn paths_and_banner_versions_resolve() {
        let s = resolve_str(
            "trtexec = \"bin/trtexec\"\n[[targets]]\ncompute_capability = \"8.6\"\n\
             tensorrt_version = \"100300\"\n",
        )
        .unwrap();
        assert_eq!(s.trtexec, TrtexecChoice::Path("/c/bin/trtexec".into()));
        assert_eq!(s.targets[0].tensorrt_version, "10.3.0");
        assert_eq!(
            resolve_str("trtexec = \"off\"").unwrap().trtexec,
            TrtexecChoice::Off
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = resolve_str(
            r#"
            precisions = ["fp16", "fp8"]
            build_timeout_secs = 0
            score_threshold = 2.0
            model_name = "a b"
            [[targets]]
            compute_capability = "eight"
            tensorrt_version = "10.3.0"
            [[targets]]
            compute_capability = "8.9"
            "#,
        )
        .unwrap_err();
        let text = problems.join("\n");
        for expected in [
            "fp8",
            "build_timeout_secs",
            "score_threshold",
            "model_name",
            "targets[0]",
            "targets[1]",
        ] {
            assert!(text.contains(expected), "{expected} not in:\n{text}");
        }
        assert_eq!(problems.len(), 6, "{text}");
    }
}
