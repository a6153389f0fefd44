//! The fuzz crate's shared code: the protocol target's entry function, which needs the
//! protocol and coordinator crates and so cannot live in `fedinspect_common::fuzzing` with the
//! other targets' entries.

pub mod proto;
