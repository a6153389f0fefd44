//! `client bundle install|rollback|show|triton` and the `--bundle` source of `client detect`:
//! a plant engineer's hands on the installed inference bundles, with the same installer and
//! the same pinned coordinator key as the agent. Every bundle is verified (signature, hashes)
//! before it is installed, laid out for Triton, or run.
//!
//! The state folder and the key come from the plant's `plant.toml` (`--config`), or from
//! `--state` and `--coordinator-key` on a line machine without a training setup.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fedinspect_common::bundle::{verify_bundle, EnginePrecision, EngineTarget, FileRole};
use fedinspect_common::signing::VerifyingKey;
use serde_json::json;

use crate::bundle::{
    layout_triton, BundleInstaller, InstallOptions, InstalledBundle, TritonFormat, TritonRequest,
};

/// Where the installed bundles are and the key that signs them.
#[derive(Clone, Debug, Default, Args)]
pub struct BundlePlace {
    /// The plant.toml: its state folder and coordinator.public_key.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The plant's state folder (instead of --config).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// The coordinator's public key file, coordinator-signing.pub (instead of --config).
    #[arg(long)]
    pub coordinator_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(flatten)]
    pub place: BundlePlace,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: BundleCommand,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Verify and install a bundle archive (.tar, as DownloadBundle sends it) or folder; the
    /// running bundle is kept for rollback.
    Install { source: PathBuf },
    /// Make the previous bundle current again.
    Rollback,
    /// The current and previous bundles, verified again.
    Show,
    /// Lay the current bundle out as a version of a Triton model repository.
    Triton {
        repo: PathBuf,
        /// auto, onnx-fp32, onnx-int8, plan-fp16 or plan-int8.
        #[arg(long, default_value = "auto")]
        format: String,
        /// This GPU's compute capability, e.g. 8.6 (to pick an engine).
        #[arg(long)]
        compute_capability: Option<String>,
        /// This machine's TensorRT version, e.g. 10.3.0 (to pick an engine).
        #[arg(long)]
        tensorrt_version: Option<String>,
        #[arg(long)]
        model_name: Option<String>,
        #[arg(long)]
        version: Option<u64>,
    },
}

impl BundlePlace {
    /// The state folder and the pinned key.
    pub fn resolve(&self) -> Result<(PathBuf, VerifyingKey)> {
        if let Some(config) = &self.config {
            if self.state.is_some() || self.coordinator_key.is_some() {
                bail!("pass either --config or --state with --coordinator-key, not both");
            }
            let c = crate::config::Config::load(config)?;
            return Ok((c.state_dir, c.coordinator.public_key));
        }
        let (Some(state), Some(key)) = (&self.state, &self.coordinator_key) else {
            bail!(
                "say where the bundles are: --config plant.toml, or --state <plant state folder> \
                 with --coordinator-key <coordinator-signing.pub>"
            );
        };
        let key = VerifyingKey::load(key)
            .with_context(|| format!("--coordinator-key {}", key.display()))?;
        Ok((state.clone(), key))
    }

    fn installer(&self) -> Result<BundleInstaller> {
        let (state, key) = self.resolve()?;
        Ok(BundleInstaller::open(&state, key)?)
    }
}

/// Runs `client bundle ...`; prints what it did.
pub fn run(a: &BundleArgs) -> Result<()> {
    let installer = a.place.installer()?;
    let value = match &a.command {
        BundleCommand::Install { source } => install(&installer, source)?,
        BundleCommand::Rollback => {
            let slot = installer.rollback()?;
            json!({
                "current": slot.id,
                "model_version": slot.model_version,
                "message": format!("rolled back to bundle {} (model version {})", slot.id, slot.model_version),
            })
        }
        BundleCommand::Show => show(&installer)?,
        BundleCommand::Triton {
            repo,
            format,
            compute_capability,
            tensorrt_version,
            model_name,
            version,
        } => {
            let current = current(&installer)?;
            let target = match (compute_capability, tensorrt_version) {
                (Some(cc), Some(trt)) => Some(EngineTarget {
                    compute_capability: cc.clone(),
                    tensorrt_version: trt.clone(),
                }),
                (None, None) => None,
                _ => bail!("give both --compute-capability and --tensorrt-version, or neither"),
            };
            let layout = layout_triton(
                &current,
                &TritonRequest {
                    repo,
                    model_name: model_name.as_deref(),
                    version: *version,
                    target: target.as_ref(),
                    format: triton_format(format)?,
                },
            )?;
            json!({
                "bundle": current.id,
                "model_file": layout.model_file,
                "config": layout.config,
                "platform": layout.platform,
                "unchanged": layout.unchanged,
            })
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if let Some(message) = value.get("message").and_then(|m| m.as_str()) {
        println!("{message}");
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

fn install(installer: &BundleInstaller, source: &Path) -> Result<serde_json::Value> {
    let opts = InstallOptions::default();
    let report = if source.is_dir() {
        installer.install_dir(source, &opts)?
    } else {
        let file = fs::File::open(source)
            .with_context(|| format!("cannot open bundle archive {}", source.display()))?;
        installer.install_archive(std::io::BufReader::new(file), &opts)?
    };
    Ok(json!({
        "id": report.id,
        "model_version": report.model_version,
        "manifest_sha256": report.manifest_sha256,
        "previous": report.previous,
        "already_current": report.already_current,
        "engine_built_locally": report.engine_built_locally,
        "message": report.message,
    }))
}

fn show(installer: &BundleInstaller) -> Result<serde_json::Value> {
    let pointer = installer.pointer()?;
    let describe = |id: &str| match installer.open_installed(id) {
        Ok(b) => {
            let m = &b.bundle.manifest;
            json!({
                "id": b.id,
                "model_version": m.model_version,
                "model_hash": m.model_hash,
                "built_at": m.built_at,
                "class_names": m.class_names,
                "score_threshold": m.score_threshold,
                "files": m.files.iter().map(|f| &f.name).collect::<Vec<_>>(),
                "engines": m.engines.iter().map(|e| format!("{} {}", e.precision, e.target)).collect::<Vec<_>>(),
                "local_engines": b.local_engines.iter().map(|(l, _)| format!("{} {}", l.entry.precision, l.entry.target)).collect::<Vec<_>>(),
                "verified": true,
            })
        }
        Err(e) => json!({ "id": id, "verified": false, "problem": e.to_string() }),
    };
    let current = pointer.current.as_ref().map(|s| describe(&s.id));
    let previous = pointer.previous.as_ref().map(|s| describe(&s.id));
    let message = match (&pointer.current, &pointer.previous) {
        (None, _) => "no bundle installed".to_string(),
        (Some(c), p) => format!(
            "current: {} (model version {}, installed {}){}",
            c.id,
            c.model_version,
            c.installed_at,
            p.as_ref().map_or(String::new(), |p| format!(
                "; previous: {} (model version {})",
                p.id, p.model_version
            ))
        ),
    };
    Ok(json!({ "current": current, "previous": previous, "summary": message }))
}

fn current(installer: &BundleInstaller) -> Result<InstalledBundle> {
    installer.current()?.context(
        "no bundle is installed; install one with `client bundle install <archive>` or let the agent install the coordinator's",
    )
}

fn triton_format(s: &str) -> Result<TritonFormat> {
    Ok(match s {
        "auto" => TritonFormat::Auto,
        "onnx-fp32" => TritonFormat::OnnxFp32,
        "onnx-int8" => TritonFormat::OnnxInt8,
        "plan-fp16" => TritonFormat::Plan(EnginePrecision::Fp16),
        "plan-int8" => TritonFormat::Plan(EnginePrecision::Int8),
        other => bail!("--format {other}: use auto, onnx-fp32, onnx-int8, plan-fp16 or plan-int8"),
    })
}

/// `client detect --bundle`: the installed bundle (`installed`), an installed bundle id, or a
/// bundle folder, verified with the pinned key.
#[derive(Clone, Debug, Default, Args)]
pub struct DetectBundle {
    /// Run a bundle's model instead of --checkpoint: `installed` (the current bundle), an
    /// installed bundle id, or a bundle folder; needs --config or --state/--coordinator-key.
    #[arg(long)]
    pub bundle: Option<String>,
    #[command(flatten)]
    pub place: BundlePlace,
}

/// The verified bundle's weights file (a detector checkpoint) and its score threshold.
#[derive(Clone, Debug)]
pub struct BundleWeights {
    pub id: String,
    pub model_version: u64,
    pub weights: PathBuf,
    pub score_threshold: f32,
}

impl DetectBundle {
    /// The weights to run, verified; `None` when no --bundle was given.
    pub fn weights(&self) -> Result<Option<BundleWeights>> {
        let Some(spec) = &self.bundle else {
            return Ok(None);
        };
        let (state, key) = self.place.resolve()?;
        let path = Path::new(spec);
        let bundle = if path.is_dir() {
            let dir = if path.join("bundle").is_dir() {
                path.join("bundle")
            } else {
                path.to_path_buf()
            };
            verify_bundle(&dir, &key)
                .map_err(|e| anyhow::anyhow!("--bundle {spec}: refused, not run: {e}"))?
        } else {
            let installer = BundleInstaller::open(&state, key)?;
            let installed = if spec == "installed" {
                current(&installer)?
            } else {
                installer.open_installed(spec).with_context(|| {
                    format!(
                        "--bundle {spec}: not a folder, `installed`, nor an installed bundle id"
                    )
                })?
            };
            installed.bundle
        };
        let m = &bundle.manifest;
        let weights = m
            .file_with_role(FileRole::WeightsSafetensors)
            .context("the bundle lists no weights file; it cannot be run with tch")?;
        Ok(Some(BundleWeights {
            id: fedinspect_common::bundle::bundle_id(m.model_version, &bundle.manifest_sha256),
            model_version: m.model_version,
            weights: bundle.path(&weights.name),
            score_threshold: m.score_threshold,
        }))
    }
}

/// What `detect` runs: `--checkpoint`, or the weights of `--bundle` (announced on stderr).
pub fn detect_checkpoint(checkpoint: Option<&Path>, bundle: &DetectBundle) -> Result<PathBuf> {
    match (checkpoint, bundle.weights()?) {
        (Some(c), None) => Ok(c.to_path_buf()),
        (None, Some(b)) => {
            eprintln!(
                "running bundle {} (model version {}), verified with the coordinator key",
                b.id, b.model_version
            );
            Ok(b.weights)
        }
        (Some(_), Some(_)) => bail!("pass --checkpoint or --bundle, not both"),
        (None, None) => bail!("pass --checkpoint <file> or --bundle <installed|id|folder>"),
    }
}
