//! The bundle calls of the agent's gRPC edge: `DownloadBundle` into a file (chunks checked to
//! be contiguous, within the announced total, the whole matching the SHA-256 of the last
//! chunk), `ReportInstall`, and `ReportCalibration` (the INT8 ranges measured after training).

use std::io::Write;
use std::path::Path;

use fedinspect_proto::v1 as pb;
use fedinspect_proto::PROTOCOL_VERSION;

use super::{from_proto, Connection, RpcError};
use crate::agent::types::InstallOutcome;

/// Why a download is not the archive the coordinator meant to send.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The bytes arrived but are not whole or not what was announced: refuse, do not retry.
    #[error("the download of bundle {id} is corrupt or truncated ({reason})")]
    Corrupt { id: String, reason: String },
    #[error("cannot write the download to {path}: {source}; check the state folder's free space")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Connection {
    /// Downloads bundle `id`'s archive into `out` (created or truncated); returns its length.
    pub async fn download_bundle(&mut self, id: &str, out: &Path) -> Result<u64, DownloadError> {
        const CALL: &str = "DownloadBundle";
        let write_err = |source| DownloadError::Write {
            path: out.display().to_string(),
            source,
        };
        let req = pb::DownloadBundleRequest {
            protocol_version: PROTOCOL_VERSION,
            bundle_id: id.to_string(),
            offset: 0,
        };
        let client = &mut self.client;
        let mut stream = self
            .bounds
            .call(CALL, async {
                client
                    .download_bundle(req)
                    .await
                    .map_err(|s| RpcError::status(CALL, s))
            })
            .await?
            .into_inner();
        let mut file = std::io::BufWriter::new(std::fs::File::create(out).map_err(write_err)?);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut received = 0u64;
        let mut total = None;
        let mut digest = Vec::new();
        let corrupt = |reason: String| DownloadError::Corrupt {
            id: id.to_string(),
            reason,
        };
        while let Some(chunk) = self.bounds.next_chunk(CALL, &mut stream).await? {
            let chunk = from_proto::bundle_chunk(chunk, received, &mut total)
                .map_err(|e| corrupt(e.to_string()))?;
            ctx.update(&chunk.data);
            file.write_all(&chunk.data).map_err(write_err)?;
            received += chunk.data.len() as u64;
            digest = chunk.sha256;
        }
        file.flush().map_err(write_err)?;
        from_proto::stream_end(received, total, ctx.finish().as_ref(), &digest).map_err(corrupt)?;
        Ok(received)
    }

    /// Sends the activation ranges measured after training in `round`.
    pub async fn report_calibration(
        &mut self,
        round: u64,
        ranges: &fedinspect_common::onnx::ActivationRanges,
    ) -> Result<(), RpcError> {
        let req = pb::ReportCalibrationRequest {
            protocol_version: PROTOCOL_VERSION,
            round,
            ranges: ranges
                .iter()
                .map(|(node, r)| pb::ActivationRange {
                    node: node.clone(),
                    min: r.min,
                    max: r.max,
                })
                .collect(),
        };
        let client = &mut self.client;
        self.bounds
            .call("ReportCalibration", async {
                client
                    .report_calibration(req)
                    .await
                    .map_err(|s| RpcError::status("ReportCalibration", s))
            })
            .await?;
        Ok(())
    }

    /// Reports the result of an install task.
    pub async fn report_install(&mut self, outcome: &InstallOutcome) -> Result<(), RpcError> {
        let req = pb::ReportInstallRequest {
            protocol_version: PROTOCOL_VERSION,
            bundle_id: outcome.bundle_id.clone(),
            ok: outcome.ok,
            message: outcome.message.clone(),
            engine_built_locally: outcome.engine_built_locally,
        };
        let client = &mut self.client;
        self.bounds
            .call("ReportInstall", async {
                client
                    .report_install(req)
                    .await
                    .map_err(|s| RpcError::status("ReportInstall", s))
            })
            .await?;
        Ok(())
    }
}
