//! The core that the coordinator, the plant client and the simulations share.
//!
//! Everything here is plain, synchronous Rust with no I/O beyond files the caller names:
//! model state and its safetensors form ([`model`]), weight deltas and their wire codecs
//! ([`delta`]), federated averaging ([`fedavg`]), Ed25519 signing ([`signing`]), mutual TLS
//! configuration ([`tls`]), the signed model and update manifests ([`manifests`]) and the
//! development PKI ([`pki`]). Nothing in this crate knows about gRPC, sled or images.

pub mod arch;
pub mod bundle;
pub mod config_problems;
pub mod delta;
pub mod detection;
pub mod fedavg;
pub mod fsutil;
/// Entry functions of the fuzz targets (`common/fuzz`) and their replay test; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod lr_cycle;
pub mod manifests;
pub mod model;
pub mod onnx;
pub mod pki;
pub mod signing;
pub mod tls;

pub use model::{ModelError, ModelHash, ModelState, Tensor};
