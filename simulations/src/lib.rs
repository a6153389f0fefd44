//! Simulated federations for researchers: synthetic plants ([`synthetic`]) and the runs that
//! drive the real client and coordinator code over them.

pub mod quickstart;
pub mod synthetic;
