//! Inference bundles on the coordinator: the `[bundles]` settings ([`settings`]), building the
//! signed bundle of a model version with TensorRT engines where `trtexec` exists
//! ([`builder`]), and the folder of built bundles with their tar archives that
//! `DownloadBundle` serves ([`store`]).
//!
//! On promotion [`push`] builds the version's bundle and pushes install tasks, canary plants
//! first ([`rollout`] is its record on disk, `<data_dir>/bundles/rollouts.json`); [`config`]
//! resolves the whole `[bundles]` section.
//!
//! The format, verification, archives and the trtexec runner are `fedinspect_common::bundle`;
//! this module holds the coordinator's policy around them. Everything here is blocking code:
//! the promote flow calls it through `spawn_blocking`.

pub mod builder;
pub mod config;
pub mod push;
pub mod rollout;
pub mod settings;
pub mod store;

pub use builder::{BuiltBundle, BundleBuilder, BundleSetupError, ModelForBundle};
pub use config::{BundleConfig, BundleModel, PushPolicy};
pub use push::{BundlePush, InstallResult};
pub use rollout::{PlantInstall, Rollout, RolloutReason, RolloutStage};
pub use settings::{BundleSettings, RawBundleSettings, TrtexecChoice};
pub use store::BundleStore;
