//! The plant client library: the detector built from its architecture description
//! ([`detector`]), datasets and augmentation ([`data`]), evaluation ([`eval`]), the plant's
//! configuration ([`config`]) and its federation agent ([`agent`]).
//! The `client` binary wires these into `train`, `eval`, `detect` and `run`; `bundle` (the
//! installed inference bundles) and `detect --bundle` live in [`cli::bundle`].

pub mod agent;
pub mod bench;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod data;
pub mod detector;
pub mod eval;
pub mod varstore;
