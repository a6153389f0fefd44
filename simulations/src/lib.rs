//! Simulated federations for researchers and the README's main job: synthetic plants
//! ([`synthetic`]), and federations of real `coordinator` and `client` processes on this
//! machine ([`site`] writes their files, [`processes`] runs them, [`federation`] drives them
//! through the Admin service), of which [`quickstart`] is the main job.
//!
//! Reading order: `synthetic`, `site`, `processes`, `interrupt`, `federation`, `evaluation`,
//! `report`, `evaluator`, `quickstart`.

pub mod evaluation;
pub mod evaluator;
pub mod federation;
pub mod interrupt;
pub mod processes;
pub mod quickstart;
pub mod report;
pub mod site;
pub mod synthetic;
