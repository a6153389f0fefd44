//! The model manifest the coordinator signs for every version. It lives in
//! `fedinspect_common::manifests` so a plant checks signatures without this crate; this module
//! keeps the coordinator's names for it.

pub use fedinspect_common::manifests::{sign_model, verify_model, ModelManifest, MODEL_KIND};
