//! The whole `[bundles]` section resolved: how bundles are built ([`BundleSettings`]), how they
//! are pushed to the plants ([`PushPolicy`]: canary plants first, then everyone after an admin
//! confirms or a quiet delay), and what model they describe ([`BundleModel`]: the architecture
//! and class names, which model versions do not carry). Without a `[bundles]` section the
//! coordinator builds and pushes nothing.
//!
//! ```toml
//! [bundles]
//! canary_plants = ["plant-1"]   # installed first; [] pushes to every plant at once
//! confirm_after_secs = 3600     # then to all after this long without a failure; 0: admin only
//! resend_secs = 300             # a task without a report is sent again after this long
//! class_names = ["open", "short", "mousebite", "spur", "copper", "pin-hole"]
//! [bundles.architecture]        # the ArchConfig, as in a client checkpoint's fedinspect.arch
//! in_channels = 2
//! # ...
//! ```
//!
//! Without `architecture`, the architecture and class names are read from `initial_model` when
//! it is a client checkpoint (`fedinspect.arch`, `fedinspect.class_names`).

use std::path::Path;
use std::time::Duration;

use fedinspect_common::arch::ArchConfig;
use fedinspect_common::ModelState;

use super::settings::{BundleSettings, RawBundleSettings};

/// Default wait before a canary push goes to everyone without an admin: none (admin only).
pub const DEFAULT_CONFIRM_AFTER: Option<Duration> = None;
/// Default time after which an unanswered install task is sent again.
pub const DEFAULT_RESEND: Duration = Duration::from_secs(300);

/// What the bundles are of: the detector's architecture and class names.
#[derive(Clone, Debug, PartialEq)]
pub struct BundleModel {
    pub arch: ArchConfig,
    pub class_names: Vec<String>,
}

/// Who gets an install task, and when.
#[derive(Clone, Debug, PartialEq)]
pub struct PushPolicy {
    /// Plants that install a promoted version first; empty: everyone at once.
    pub canary_plants: Vec<String>,
    /// Push to everyone once this long has passed since the canary push, with at least one
    /// canary success and no failure; `None`: only `coordinator admin bundle confirm` does.
    pub confirm_after: Option<Duration>,
    /// An install task without a report is sent again after this long.
    pub resend_after: Duration,
}

/// The resolved `[bundles]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct BundleConfig {
    pub build: BundleSettings,
    pub push: PushPolicy,
    pub model: BundleModel,
}

impl BundleConfig {
    /// Resolves the section; `initial_model` is the config's, read for the architecture when
    /// the section does not give one. Every problem is listed, prefixed with its key.
    pub fn resolve(
        raw: RawBundleSettings,
        base: &Path,
        data_dir: &Path,
        initial_model: Option<&Path>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let push = push_policy(&raw, &mut problems);
        let model = model(&raw, initial_model, &mut problems);
        let build = BundleSettings::resolve(raw, base, data_dir);
        match (build, model) {
            (Ok(build), Some(model)) if problems.is_empty() => Ok(Self { build, push, model }),
            (build, _) => {
                problems.extend(build.err().unwrap_or_default());
                Err(problems)
            }
        }
    }
}

fn push_policy(raw: &RawBundleSettings, problems: &mut Vec<String>) -> PushPolicy {
    let canary_plants = raw.canary_plants.clone().unwrap_or_default();
    for (i, p) in canary_plants.iter().enumerate() {
        if p.is_empty() || canary_plants[..i].contains(p) {
            problems.push(format!(
                "bundles.canary_plants: '{p}' is empty or listed twice; list each plant id once"
            ));
        }
    }
    let confirm_after = match raw.confirm_after_secs {
        None | Some(0) => DEFAULT_CONFIRM_AFTER,
        Some(s) => Some(Duration::from_secs(s)),
    };
    let resend_after = match raw.resend_secs {
        None => DEFAULT_RESEND,
        Some(0) => {
            problems.push(
                "bundles.resend_secs: 0; give the seconds after which an unanswered install \
                 task is sent again (e.g. 300)"
                    .into(),
            );
            DEFAULT_RESEND
        }
        Some(s) => Duration::from_secs(s),
    };
    PushPolicy {
        canary_plants,
        confirm_after,
        resend_after,
    }
}

fn model(
    raw: &RawBundleSettings,
    initial_model: Option<&Path>,
    problems: &mut Vec<String>,
) -> Option<BundleModel> {
    let (arch, class_names) = match (&raw.architecture, initial_model) {
        (Some(arch), _) => (arch.clone(), raw.class_names.clone()),
        (None, Some(path)) => match from_checkpoint(path) {
            Ok((arch, names)) => (arch, raw.class_names.clone().or(names)),
            Err(why) => {
                problems.push(format!(
                    "bundles.architecture: not given, and {why}; add a [bundles.architecture] \
                     table (the detector's ArchConfig) and bundles.class_names"
                ));
                return None;
            }
        },
        (None, None) => {
            problems.push(
                "bundles.architecture: the coordinator needs the detector's architecture to \
                 export bundles; add a [bundles.architecture] table (the ArchConfig, as in a \
                 client checkpoint's fedinspect.arch) and bundles.class_names, or set \
                 initial_model to a checkpoint written by `client train`"
                    .into(),
            );
            return None;
        }
    };
    if let Err(e) = arch.graph() {
        problems.push(format!("bundles.architecture: {e}"));
        return None;
    }
    let class_names = class_names.unwrap_or_default();
    if class_names.len() != arch.num_classes as usize {
        problems.push(format!(
            "bundles.class_names: {} names for an architecture with {} classes; list one name \
             per heatmap channel, in order",
            class_names.len(),
            arch.num_classes
        ));
        return None;
    }
    Some(BundleModel { arch, class_names })
}

/// The architecture and class names in a client checkpoint's metadata.
fn from_checkpoint(path: &Path) -> Result<(ArchConfig, Option<Vec<String>>), String> {
    let (_, meta) = ModelState::load_safetensors(path)
        .map_err(|e| format!("initial_model {} cannot be read ({e})", path.display()))?;
    let arch = meta.get("fedinspect.arch").ok_or_else(|| {
        format!(
            "initial_model {} has no fedinspect.arch metadata",
            path.display()
        )
    })?;
    let arch: ArchConfig = serde_json::from_str(arch)
        .map_err(|e| format!("initial_model's fedinspect.arch is not an ArchConfig ({e})"))?;
    let names =
        match meta.get("fedinspect.class_names") {
            Some(n) => Some(serde_json::from_str(n).map_err(|e| {
                format!("initial_model's fedinspect.class_names is not a list ({e})")
            })?),
            None => None,
        };
    Ok((arch, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<BundleConfig, Vec<String>> {
        let raw: RawBundleSettings = toml::from_str(text).unwrap();
        BundleConfig::resolve(raw, Path::new("/c"), Path::new("/d"), None)
    }

    #[test]
    fn defaults_push_to_everyone_with_admin_confirmation_only() {
        let c = resolve(
            "class_names = [\"a\", \"b\"]\n[architecture]\nin_channels = 1\nnum_classes = 2\n\
             input_size = 64\nwidth = 0.25\ndepth = 1.0\nattention = false\nfpn_width = 16\n\
             head_width = 16\n",
        )
        .unwrap();
        assert!(c.push.canary_plants.is_empty());
        assert_eq!(c.push.confirm_after, None);
        assert_eq!(c.push.resend_after, DEFAULT_RESEND);
        assert_eq!(c.model.class_names, ["a", "b"]);
    }

    #[test]
    fn a_missing_architecture_and_bad_push_keys_are_reported_together() {
        let problems = resolve("canary_plants = [\"p\", \"p\"]\nresend_secs = 0\nmax_batch = 0\n")
            .unwrap_err();
        let text = problems.join("\n");
        for key in [
            "canary_plants",
            "resend_secs",
            "bundles.architecture",
            "max_batch",
        ] {
            assert!(text.contains(key), "{key} not in:\n{text}");
        }
    }
}
