//! The agent's install task: download the bundle the coordinator names into the state folder,
//! install it with [`BundleInstaller`] on a blocking thread (signature with the pinned key,
//! every file's hash, the manifest hash the task names; the previous bundle kept for
//! rollback; an engine built here when the bundle has none for this GPU and trtexec is
//! found), and report the result with `ReportInstall`.
//!
//! A corrupt or truncated download and a refused bundle are reported as failures and leave
//! the running bundle as it was; a broken connection is not reported (the coordinator sends
//! the task again when the plant reconnects).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedinspect_common::bundle::EnginePrecision;
use tokio::sync::watch;

use super::rpc::{Connection, DownloadError};
use super::types::{InstallBundleTask, InstallOutcome};
use super::{stopped, Agent, AgentError, Event, Step};
use crate::bundle::{BundleInstaller, InstallOptions, LocalEngines};

/// Where downloads wait for their install, inside the state folder.
const DOWNLOADS: &str = "bundle-downloads";
/// Time limit of one engine build at the plant.
const ENGINE_BUILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// The plant's installer and, where trtexec and a GPU exist, its engine builder.
pub struct BundleSide {
    pub installer: Arc<BundleInstaller>,
    pub engines: Option<Arc<LocalEngines>>,
}

impl BundleSide {
    /// Opens `STATE/bundles` with the pinned key; looks for trtexec on the PATH when this
    /// plant has a GPU (`compute_capability` not empty). A trtexec that fails its probe is
    /// logged and engines are not built here.
    pub fn open(
        state_dir: &Path,
        key: fedinspect_common::signing::VerifyingKey,
        compute_capability: &str,
    ) -> Result<Self, crate::bundle::InstallError> {
        let installer = Arc::new(BundleInstaller::open(state_dir, key)?);
        let engines = if compute_capability.is_empty() {
            None
        } else {
            match LocalEngines::detect(
                None,
                compute_capability,
                &state_dir.join("engine-cache"),
                vec![EnginePrecision::Fp16, EnginePrecision::Int8],
                ENGINE_BUILD_TIMEOUT,
            ) {
                Ok(e) => e.map(Arc::new),
                Err(e) => {
                    tracing::warn!(error = %e, "trtexec found but unusable; bundles run from ONNX here");
                    None
                }
            }
        };
        Ok(Self { installer, engines })
    }
}

impl Agent {
    /// Carries out one install task and reports it.
    pub(super) async fn install_bundle(
        &mut self,
        conn: &mut Connection,
        task: InstallBundleTask,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Step, AgentError> {
        let dir = self.config.state_dir.join(DOWNLOADS);
        let archive = dir.join(format!("{}.tar", task.bundle_id));
        let downloaded = match std::fs::create_dir_all(&dir) {
            Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
            Ok(()) => tokio::select! {
                r = conn.download_bundle(&task.bundle_id, &archive) => match r {
                    Ok(bytes) => Ok(bytes),
                    Err(DownloadError::Rpc(e)) if e.is_transient() => {
                        let _ = std::fs::remove_file(&archive);
                        return Err(e.into());
                    }
                    Err(e) => Err(e.to_string()),
                },
                () = stopped(shutdown.clone()) => {
                    let _ = std::fs::remove_file(&archive);
                    return Ok(Step::Shutdown);
                }
            },
        };
        let outcome = match downloaded {
            Ok(bytes) => {
                tracing::info!(bundle = %task.bundle_id, bytes, "bundle downloaded");
                self.install_downloaded(&task, &archive).await
            }
            Err(why) => InstallOutcome {
                bundle_id: task.bundle_id.clone(),
                ok: false,
                message: format!("bundle refused, the running bundle stays: {why}"),
                engine_built_locally: false,
            },
        };
        let _ = std::fs::remove_file(&archive);
        if outcome.ok {
            tracing::info!(bundle = %task.bundle_id, message = %outcome.message, "bundle installed");
        } else {
            tracing::warn!(bundle = %task.bundle_id, message = %outcome.message, "bundle not installed");
        }
        conn.report_install(&outcome).await?;
        self.emit(Event::BundleInstall(outcome));
        Ok(Step::Done)
    }

    /// Installs the archive at `archive` on a blocking thread.
    async fn install_downloaded(&self, task: &InstallBundleTask, archive: &Path) -> InstallOutcome {
        let installer = self.bundles.installer.clone();
        let engines = self.bundles.engines.clone();
        let expected = task.manifest_sha256.clone();
        let path = archive.to_path_buf();
        let joined = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path)
                .map_err(|e| format!("cannot read the download {}: {e}", path.display()))?;
            let opts = InstallOptions {
                expected_manifest_sha256: Some(&expected),
                engines: engines.as_deref(),
                limits: Default::default(),
            };
            installer
                .install_archive(std::io::BufReader::new(file), &opts)
                .map_err(|e| e.to_string())
        })
        .await;
        let result = joined.unwrap_or_else(|e| Err(format!("the install thread failed: {e}")));
        match result {
            Ok(report) => InstallOutcome {
                bundle_id: task.bundle_id.clone(),
                ok: true,
                message: report.message,
                engine_built_locally: report.engine_built_locally,
            },
            Err(message) => InstallOutcome {
                bundle_id: task.bundle_id.clone(),
                ok: false,
                message,
                engine_built_locally: false,
            },
        }
    }
}
