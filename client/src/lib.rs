//! The plant client library: the detector built from its architecture description
//! ([`detector`]), datasets and augmentation ([`data`]), evaluation ([`eval`]).
//! The `client` binary wires these into `train`, `eval`, `detect` and `run`.

pub mod data;
pub mod detector;
pub mod eval;
