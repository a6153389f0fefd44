//! Inference bundles at the plant: verified installation into the state folder with the
//! previous bundle kept for rollback ([`install`], the `current.json` pointer in [`pointer`]),
//! TensorRT engines built on install when the bundle has none for this GPU and trtexec exists
//! ([`local_engines`]), and the installed bundle laid out as a Triton Inference Server model
//! repository version ([`triton`]).
//!
//! ```text
//! STATE/bundles/
//!   current.json            which bundle runs, and the previous one (written atomically)
//!   <bundle id>/bundle/     the signed bundle as the coordinator built it, verified
//!   <bundle id>/local/      engines built here (local.json lists them with their hashes)
//!   .staging-*              installs in progress; removed when the folder is next opened
//! STATE/engine-cache/       engines built here, by ONNX hash, precision and target
//! ```
//!
//! The signature (pinned coordinator key) and every file's hash are checked before anything
//! replaces the running bundle; a refused install leaves `current.json` as it was.

pub mod install;
pub mod local_engines;
pub mod pointer;
pub mod triton;

pub use install::{BundleInstaller, InstallError, InstallOptions, InstallReport, InstalledBundle};
pub use local_engines::{LocalEngine, LocalEngines};
pub use triton::{layout_triton, TritonError, TritonFormat, TritonLayout, TritonRequest};
