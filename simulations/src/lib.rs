//! Simulated federations for researchers and the README's main job: synthetic plants
//! ([`synthetic`]), and federations of real `coordinator` and `client` processes on this
//! machine ([`site`] writes their files, [`processes`] runs them, [`federation`] drives them
//! through the Admin service), of which [`quickstart`] is the main job and [`simulate_run`]
//! the researchers' experiments (`simulate run experiment.toml`).
//!
//! Reading order: `synthetic`, `site`, `processes`, `interrupt`, `federation`, `versions`,
//! `evaluation`, `report`, `progress`, `evaluator`, `quickstart`; then for experiments:
//! `experiment` and `sweep` (the file), `coordinator_support`, `partition` and `plant_data`
//! (who holds which image; `coco_layout`, `coco_source`, `coco_data` for COCO sources),
//! `synthetic_styles` (plants' looks and drift), `process_memory`,
//! `virtual_plants` (in-process plants), `eval_sets`, `baselines`, `run_metrics`, `chart`,
//! `chart_svg`, `chart_png`, `run_report`, `experiment_run` (one run), `simulate_run` (the
//! command); `plot_csv` (`simulate plot`: runs' CSVs on one chart). `deploy/` (not Rust) holds the Helm chart and the Slurm script.

pub mod baselines;
pub mod chart;
pub mod chart_png;
pub mod chart_svg;
pub mod coco_data;
pub mod coco_layout;
pub mod coco_source;
pub mod coordinator_support;
pub mod eval_sets;
pub mod evaluation;
pub mod evaluator;
pub mod experiment;
pub mod experiment_run;
pub mod federation;
pub mod interrupt;
pub mod memory_report;
pub mod partition;
pub mod plant_data;
pub mod plot_csv;
pub mod process_memory;
pub mod processes;
pub mod progress;
pub mod quickstart;
pub mod report;
pub mod run_metrics;
pub mod run_report;
pub mod simulate_run;
pub mod site;
pub mod sweep;
pub mod synthetic;
pub mod synthetic_styles;
pub mod tail_mean;
pub mod versions;
pub mod virtual_plants;
