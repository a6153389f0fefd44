//! Inference bundles on the coordinator: the `[bundles]` settings ([`settings`]), building the
//! signed bundle of a model version with TensorRT engines where `trtexec` exists
//! ([`builder`]), and the folder of built bundles with their tar archives that
//! `DownloadBundle` serves ([`store`]).
//!
//! The format, verification, archives and the trtexec runner are `fedinspect_common::bundle`;
//! this module holds the coordinator's policy around them. Everything here is blocking code:
//! the promote flow calls it through `spawn_blocking`.

pub mod builder;
pub mod settings;
pub mod store;

pub use builder::{BuiltBundle, BundleBuilder, BundleSetupError, ModelForBundle};
pub use settings::{BundleSettings, RawBundleSettings, TrtexecChoice};
pub use store::BundleStore;
