//! The fedinspect coordinator: runs federated rounds over mutual TLS, validates and stores
//! every plant update durably, aggregates them with the canonical FedAvg and keeps signed,
//! versioned models in sled.
//!
//! Reading order: `config` and `records` (the types), `storage` (sled and blobs, the only
//! module that knows sled), `versions` and `manifest` (model versions and their signatures),
//! `aggregation` (pure), `hub` (shared state), `intake` (one update's admission), `round` (the
//! driver), `gate` (promotion's evaluation gate), `admin_ops`, `rpc` (the only module that knows protobuf), `node` (build and run).

pub mod admin_ops;
pub mod aggregation;
pub mod bundle;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod gate;
pub mod hub;
pub mod intake;
pub mod malloc;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod records;
pub mod round;
pub mod rpc;
pub mod storage;
pub mod versions;

pub use config::Config;
pub use error::CoreError;
pub use node::{Coordinator, Running};
