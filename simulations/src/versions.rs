//! Published model versions taken out of a running federation through the Admin service:
//! exported to `vNNNN.safetensors` with the coordinator's metadata beside it as `vNNNN.json`,
//! and checked on the way (the content hash the coordinator recorded, its signature with the
//! pinned key), so every number a report shows is about a model the coordinator signed.

use std::path::Path;

use anyhow::{bail, Context, Result};
use fedinspect_common::manifests;
use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::{fsutil, ModelHash, ModelState};
use fedinspect_coordinator::rpc::admin_client::ModelView;

use crate::federation::Federation;

/// Exports `version` into `dir` as `vNNNN.safetensors` with its metadata as `vNNNN.json`,
/// and checks it: content hash as recorded, coordinator signature with the pinned key.
pub fn export_version(
    fed: &mut Federation,
    version: u64,
    dir: &Path,
    pinned: &VerifyingKey,
) -> Result<ModelState> {
    let path = dir.join(format!("v{version:04}.safetensors"));
    fed.export_model(version, &path)?;
    let info: ModelView = fed
        .model(version)
        .with_context(|| format!("version {version} is not listed by the coordinator"))?;
    let (model, _) = ModelState::load_safetensors(&path)?;
    let hash = model.content_hash();
    if hash.to_hex() != info.content_hash {
        bail!(
            "exported version {version} has content hash {} but the coordinator recorded {}",
            hash.to_hex(),
            info.content_hash
        );
    }
    verify_signature(pinned, version, &hash, &info.signature)?;
    fsutil::write_bytes_atomic(
        &dir.join(format!("v{version:04}.json")),
        &serde_json::to_vec_pretty(&info)?,
    )?;
    Ok(model)
}

fn verify_signature(
    key: &VerifyingKey,
    version: u64,
    hash: &ModelHash,
    hex_sig: &str,
) -> Result<()> {
    let sig = hex::decode(hex_sig).context("the version's signature is not hex")?;
    manifests::verify_model(key, version, hash, &sig).with_context(|| {
        format!("version {version}'s signature does not verify with the coordinator's public key")
    })
}
