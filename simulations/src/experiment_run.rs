//! One run of an experiment, end to end: the plants' data ([`plant_data`]), the real
//! federation (coordinator and plant processes over mutual TLS, [`Site`] and [`Federation`])
//! followed through the Admin service with every published version exported and checked,
//! then every version scored on every test set ([`EvalSets`]), then the two baselines with
//! the same budget ([`BaselineTrainer`]), and the run's metrics and report written into its
//! folder.
//!
//! ```text
//! OUT/runs/<label>/   settings.toml, metrics.json, *.csv, *.png, *.svg, report.md
//!                     plant-data/ (each plant's split files), site/ (PKI, coordinator, logs, models)
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use fedinspect_client::detector::auto_device;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::fsutil;
use fedinspect_common::signing::VerifyingKey;
use fedinspect_common::ModelState;
use tch::Device;

use crate::baselines::BaselineTrainer;
use crate::coordinator_support::coordinator_entries;
use crate::eval_sets::{EvalSets, ModelScores};
use crate::experiment::{participants, Settings};
use crate::federation::{Federation, REGISTER_WAIT, STOP_GRACE};
use crate::interrupt::Interrupt;
use crate::plant_data::{self, PreparedData};
use crate::process_memory::{current_rss, peak_rss, InProcessMemory, ProcessMemory, RoundMemory};
use crate::processes::{describe, Binaries};
use crate::progress::{round_watcher, time_left, Clock};
use crate::report::RoundRow;
use crate::run_metrics::{
    mean, BaselineRound, FederatedRound, LocalOnlyRound, PlantSummary, RunMetrics, TailMean,
    TailMeans,
};
use crate::run_report::write_run_report;
use crate::site::{PlantSpec, RoundSpec, Site, SiteSpec};
use crate::sweep::Run;
use crate::tail_mean::{mean_of, TailWindow};
use crate::versions::export_version;

/// Runs `run` into `out/runs/<label>`, generated data cached in `out/data`.
pub fn run_one(
    run: &Run,
    out: &Path,
    bins: &Binaries,
    interrupt: &Interrupt,
    clock: &Clock,
) -> Result<RunMetrics> {
    let s = &run.settings;
    let dir = out.join("runs").join(&run.label);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fsutil::write_bytes_atomic(&dir.join("settings.toml"), s.to_toml().as_bytes())?;
    let data = plant_data::prepare(s, &out.join("data"), &dir)?;
    for p in &data.plants {
        clock.say(format!(
            "  {}: {} training and {} test images ({})",
            p.id,
            p.train_images,
            p.test_images,
            p.groups.join(", ")
        ));
    }
    let spec = site_spec(s, &dir, &data)?;
    let arch = spec.arch.clone();

    let fed_started = clock.seconds();
    let (rows, initial_version, memory) = federate(spec, &data, bins, interrupt, clock, s)?;
    let federation_seconds = clock.seconds() - fed_started;

    let device = device(&s.compute.device)?;
    tch::set_num_threads(i32::try_from(s.compute.threads).unwrap_or(1));
    let sets = EvalSets::load(&data, &arch, device, s.data.eval_limit, interrupt.clone())?;
    clock.say(format!(
        "scoring the published versions{} on the global test set ({} images{}) and each plant's own ({} of these sets scored from the global set's detections: their images are in it)",
        match s.data.eval_every {
            1 => String::new(),
            n => format!(" (one round in {n} and the last: data.eval_every)"),
        },
        sets.global_len(),
        sets.unseen_len()
            .map_or(String::new(), |n| format!(", unseen groups {n}")),
        sets.sets_in_global()
    ));
    let models = dir.join("site/models");
    let initial_scores = sets.score(&initial_version)?;
    let mut federated = Vec::new();
    let to_score = s.data.federated_rounds_scored(
        &rows
            .iter()
            .map(|r| (r.round, r.version.is_some()))
            .collect::<Vec<_>>(),
    );
    let published: Vec<(u64, u64)> = rows
        .iter()
        .filter_map(|r| Some((r.round, r.version?)))
        .collect();
    for row in rows {
        let scored = to_score.contains(&row.round);
        federated.push(score_round(&sets, row, scored, &models, clock)?);
    }
    let mut tail_mean = TailMeans {
        federated: federated_tail(s, &published, &models, &sets, clock)?,
        ..TailMeans::default()
    };

    let baseline_started = clock.seconds();
    let centralised = if s.baselines.centralised {
        let (rounds, tail) = centralised(
            s,
            &data,
            &arch,
            device,
            &initial_version,
            &sets,
            interrupt,
            clock,
        )?;
        tail_mean.centralised = tail;
        rounds
    } else {
        Vec::new()
    };
    let local_only = if s.baselines.local_only {
        let (rounds, tail) = local_only(
            s,
            &data,
            &arch,
            device,
            &initial_version,
            &sets,
            interrupt,
            clock,
        )?;
        tail_mean.local_only = tail;
        rounds
    } else {
        Vec::new()
    };
    // The rounds that ran: none when `federation.enabled = false`.
    let rounds_per_hour = federated.len() as f64 * 3600.0 / federation_seconds.max(1e-9);
    let metrics = RunMetrics {
        label: run.label.clone(),
        swept: run
            .swept
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        settings: s.clone(),
        plants: data
            .plants
            .iter()
            .map(|p| PlantSummary {
                id: p.id.clone(),
                groups: p.groups.clone(),
                train_images: p.train_images,
                test_images: p.test_images,
            })
            .collect(),
        class_skew: data.class_skew,
        global_test_images: sets.global_len(),
        unseen_test_images: sets.unseen_len(),
        initial: initial_scores,
        federated,
        centralised,
        local_only,
        tail_mean,
        federation_seconds,
        rounds_per_hour,
        memory,
        baseline_seconds: clock.seconds() - baseline_started,
    };
    metrics.write(&dir)?;
    write_run_report(&metrics, &dir)?;
    clock.say(format!("run {} written to {}", run.label, dir.display()));
    Ok(metrics)
}

/// The site of a run: one plant per prepared folder, the round plan of `s`, and the
/// coordinator settings only some coordinators support.
fn site_spec(s: &Settings, dir: &Path, data: &PreparedData) -> Result<SiteSpec> {
    let extra = coordinator_entries(s).map_err(|p| anyhow!(p.join("; ")))?;
    let plants: Vec<PlantSpec> = data
        .plants
        .iter()
        .enumerate()
        .map(|(i, p)| PlantSpec {
            id: p.id.clone(),
            data_root: p.root.clone(),
            // Empty: every group of the plant's own trainval.txt.
            groups: Vec::new(),
            validation_fraction: 0.0,
            seed: s.seed + i as u64,
        })
        .collect();
    let n = plants.len() as u32;
    let target = participants(n, s.federation.participation);
    let m = &s.model;
    let f = &s.federation;
    Ok(SiteSpec {
        root: dir.join("site"),
        plants,
        arch: ArchConfig {
            fpn_width: m.fpn_width,
            head_width: m.head_width,
            // DeepPCB's input and classes, or a COCO source's.
            ..data.arch(m.input_size, m.width)
        },
        crop_size: m.crop_size,
        round: RoundSpec {
            rounds: u64::from(f.rounds),
            // Baselines alone: plants register and fetch the initial model, no round opens.
            hold: !f.enabled,
            min_participants: target.min(2),
            target_participants: target,
            deadline_secs: f.deadline_secs,
            local_epochs: f.local_epochs,
            learning_rate: f.learning_rate,
            fedprox_mu: f.fedprox_mu,
            batch_size: f.batch_size,
            lr_cycle_rounds: f.lr_cycle_rounds,
            codec: s.codec(),
        },
        device: s.compute.device.clone(),
        plant_threads: s.compute.plant_threads,
        warmup_steps: f.warmup_steps,
        seed: s.seed,
        coordinator_extra: extra,
    })
}

/// Runs the federation's rounds (none when `federation.enabled = false`); returns each
/// round's figures, the initial model and the memory figures. Every published version is
/// exported into `site/models` and checked on the way. Plants are processes, or agents in
/// this process when `plants_in_process` is set.
fn federate(
    spec: SiteSpec,
    data: &PreparedData,
    bins: &Binaries,
    interrupt: &Interrupt,
    clock: &Clock,
    s: &Settings,
) -> Result<(Vec<RoundRow>, ModelState, ProcessMemory)> {
    let site = Site::create(spec)?;
    let pinned = VerifyingKey::load(&site.pki.coordinator_verifying_key())?;
    let models = site.models();
    let plant_count = site.spec.plants.len();
    let in_process = s.federation.plants_in_process;
    clock.say(format!(
        "starting the coordinator and {plant_count} plants{} on {} (mutual TLS); logs in {}",
        if in_process {
            format!(
                " in this process (at most {} training at once)",
                s.compute.concurrent_trainings
            )
        } else {
            String::new()
        },
        site.address,
        site.logs().display()
    ));
    let me = std::process::id();
    let mut baseline_rss = 0;
    let mut fed = if in_process {
        let mut drift: BTreeMap<String, Vec<(u64, std::path::PathBuf)>> = BTreeMap::new();
        for d in &data.drift {
            let config = site.write_drift_config(&d.plant_id, d.from_round.into(), &d.root)?;
            drift
                .entry(d.plant_id.clone())
                .or_default()
                .push((d.from_round.into(), config));
        }
        baseline_rss = current_rss(me).unwrap_or(0);
        Federation::start_in_process(
            site,
            bins.clone(),
            interrupt.clone(),
            &drift,
            s.compute.concurrent_trainings,
        )?
    } else {
        Federation::start(site, bins.clone(), interrupt.clone())?
    };
    fed.wait_for("the plants to register", REGISTER_WAIT, |f| {
        Ok((f.plants()?.len() >= plant_count).then_some(()))
    })?;
    clock.say("every plant registered");
    let initial = export_version(&mut fed, 1, &models, &pinned)?;
    let round_wait = Duration::from_secs(s.federation.deadline_secs + 120);
    let mut rows = Vec::new();
    let mut by_round = Vec::new();
    let rounds = if s.federation.enabled {
        u64::from(s.federation.rounds)
    } else {
        clock.say("federation.enabled = false: the coordinator holds (round.hold), the initial model is fetched, no round opens; the baselines follow");
        0
    };
    let rounds_started = clock.seconds();
    for round in 1..=rounds {
        let detail = fed.wait_for_round(round, round_wait, &mut round_watcher(round, clock))?;
        // In-process plants trained in this process: hand the free pages of their
        // activations back (training keeps them within a run, `keep_freed_memory`), so that
        // what is measured and kept between rounds is what is live.
        fedinspect_coordinator::malloc::release_free_memory();
        let memory = RoundMemory {
            round,
            simulate: current_rss(me),
            coordinator: current_rss(fed.coordinator_pid()),
        };
        let rss =
            |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
        if detail.round.state == "published" {
            let version = detail.round.published_version;
            export_version(&mut fed, version, &models, &pinned)?;
            clock.say(format!(
                "round {round} of {rounds}: version {version} published ({} participants); resident memory: simulate {}, coordinator {}{}",
                detail.round.participants,
                rss(memory.simulate),
                rss(memory.coordinator),
                left(clock.seconds() - rounds_started, round, rounds),
            ));
        } else {
            clock.say(format!(
                "round {round} of {rounds} failed: {}{}",
                detail.round.failure,
                left(clock.seconds() - rounds_started, round, rounds),
            ));
        }
        by_round.push(memory);
        // Only the round's figures are kept: its record lists every update (ids, hashes,
        // signatures, metrics), some 300 KiB a round at 256 plants, which would make this
        // process grow with rounds.
        rows.push(RoundRow::new(&detail, None, None));
    }
    if let Some(v) = fed.virtual_plants() {
        for (id, t) in v.tallies() {
            for why in t.refused.iter().chain(&t.failed) {
                clock.say(format!("warning: {id}: {why}"));
            }
        }
    }
    let memory = ProcessMemory {
        coordinator: peak_rss(fed.coordinator_pid()),
        plants: fed
            .site()
            .plant_ids()
            .into_iter()
            .filter_map(|id| Some((id.clone(), peak_rss(fed.plant_pid(&id)?)?)))
            .collect(),
        in_process: in_process.then(|| {
            let peak_rss = peak_rss(me).unwrap_or(0);
            InProcessMemory {
                plants: plant_count,
                baseline_rss,
                peak_rss,
                per_plant: peak_rss.saturating_sub(baseline_rss) / plant_count.max(1) as u64,
            }
        }),
        by_round,
    };
    for (id, why) in fed.stop_virtual_plants(STOP_GRACE) {
        clock.say(format!("warning: in-process plant {id}: {why}"));
    }
    for (name, status) in fed.stop(STOP_GRACE) {
        if !status.success() {
            clock.say(format!("warning: {name} ended with {}", describe(status)));
        }
    }
    Ok((rows, initial, memory))
}

/// The round's row with its version's scores, when `scored` (`data.eval_every`); the model
/// hash is recorded either way.
fn score_round(
    sets: &EvalSets,
    row: RoundRow,
    scored: bool,
    models: &Path,
    clock: &Clock,
) -> Result<FederatedRound> {
    let (hash, scores) = if let Some(version) = row.version {
        let path = models.join(format!("v{version:04}.safetensors"));
        let (model, _) = ModelState::load_safetensors(&path)?;
        let scores = if scored {
            let scores = sets.score(&model)?;
            clock.say(format!(
                "  federated round {}: global map_33 {:.3} map_50 {:.3}",
                row.round, scores.global.map_33, scores.global.map_50
            ));
            Some(scores)
        } else {
            None
        };
        (Some(model.content_hash().to_hex()), scores)
    } else {
        (None, None)
    };
    Ok(FederatedRound {
        round: row.round,
        version: row.version,
        model_hash: hash,
        participants: row.participants,
        bytes_up: row.bytes_up,
        bytes_down: row.bytes_down,
        seconds: row.seconds,
        train_seconds: row.train_seconds,
        scores,
        failure: row.failure,
    })
}

#[allow(clippy::too_many_arguments)]
fn centralised(
    s: &Settings,
    data: &PreparedData,
    arch: &ArchConfig,
    device: Device,
    initial: &ModelState,
    sets: &EvalSets,
    interrupt: &Interrupt,
    clock: &Clock,
) -> Result<(Vec<BaselineRound>, Option<TailMean>)> {
    let mut trainer = BaselineTrainer::new(
        &data.source,
        s,
        arch,
        device,
        s.seed,
        initial.clone(),
        interrupt.clone(),
    )?;
    clock.say(format!(
        "centralised baseline: {} training images (the union of the plants'), {} rounds of {} epoch(s)",
        trainer.num_samples(),
        s.federation.rounds,
        s.federation.local_epochs
    ));
    let mut out = Vec::new();
    let mut window = TailWindow::new(s.data.tail_mean);
    let rounds = u64::from(s.federation.rounds);
    let started = clock.seconds();
    for round in 1..=rounds {
        let model = trainer.round()?;
        window.push(round, model);
        if !s.data.scores_round(round, rounds) {
            clock.say(format!(
                "  centralised round {round} of {rounds} trained{}",
                left(clock.seconds() - started, round, rounds)
            ));
            continue;
        }
        let scores = sets.score(model)?;
        clock.say(format!(
            "  centralised round {round} of {rounds}: global map_33 {:.3} map_50 {:.3}{}",
            scores.global.map_33,
            scores.global.map_50,
            left(clock.seconds() - started, round, rounds)
        ));
        out.push(BaselineRound { round, scores });
    }
    let tail = match window.mean()? {
        Some(((first_round, last_round), model)) => {
            let scores = sets.score(&model)?;
            let tail = TailMean {
                first_round,
                last_round,
                models: window.len(),
                scores,
            };
            say_tail(clock, "centralised", &tail);
            Some(tail)
        }
        None => None,
    };
    Ok((out, tail))
}

/// The mean of the federation's last `data.tail_mean` published versions, scored.
fn federated_tail(
    s: &Settings,
    published: &[(u64, u64)],
    models: &Path,
    sets: &EvalSets,
    clock: &Clock,
) -> Result<Option<TailMean>> {
    let n = (s.data.tail_mean as usize).min(published.len());
    if n == 0 {
        return Ok(None);
    }
    let last = &published[published.len() - n..];
    let loaded = last
        .iter()
        .map(|(_, v)| {
            ModelState::load_safetensors(&models.join(format!("v{v:04}.safetensors")))
                .map(|(m, _)| m)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let model = mean_of(&loaded.iter().collect::<Vec<_>>())?;
    let tail = TailMean {
        first_round: last[0].0,
        last_round: last[n - 1].0,
        models: n,
        scores: sets.score(&model)?,
    };
    say_tail(clock, "federated", &tail);
    Ok(Some(tail))
}

fn say_tail(clock: &Clock, method: &str, t: &TailMean) {
    clock.say(format!(
        "  {method}: mean of the models of rounds {}-{} ({} models): global map_33 {:.3} map_50 {:.3}",
        t.first_round,
        t.last_round,
        t.models,
        t.scores.global.map_33,
        t.scores.global.map_50
    ));
}

#[allow(clippy::too_many_arguments)]
fn local_only(
    s: &Settings,
    data: &PreparedData,
    arch: &ArchConfig,
    device: Device,
    initial: &ModelState,
    sets: &EvalSets,
    interrupt: &Interrupt,
    clock: &Clock,
) -> Result<(Vec<LocalOnlyRound>, Option<TailMean>)> {
    let rounds = u64::from(s.federation.rounds);
    let scored: Vec<u64> = (1..=rounds)
        .filter(|&r| s.data.scores_round(r, rounds))
        .collect();
    let mut by_round: Vec<BTreeMap<String, ModelScores>> = vec![BTreeMap::new(); scored.len()];
    let mut tails: BTreeMap<String, ModelScores> = BTreeMap::new();
    let mut tail_rounds = None;
    let started = clock.seconds();
    for (i, p) in data.plants.iter().enumerate() {
        // The plant's own training seed, as in the federation.
        let mut trainer = BaselineTrainer::new(
            &p.root,
            s,
            arch,
            device,
            s.seed + i as u64,
            initial.clone(),
            interrupt.clone(),
        )?;
        let mut at = by_round.iter_mut();
        let mut window = TailWindow::new(s.data.tail_mean);
        for round in 1..=rounds {
            let model = trainer.round()?;
            window.push(round, model);
            let done = i as u64 * rounds + round;
            let total = data.plants.len() as u64 * rounds;
            let left = left(clock.seconds() - started, done, total);
            if s.data.scores_round(round, rounds) {
                let scores = sets.score_for_plant(model, &p.id)?;
                clock.say(format!(
                    "  local-only {} round {round} of {rounds}: global map_33 {:.3}, own {}{left}",
                    p.id,
                    scores.global.map_33,
                    scores
                        .plants
                        .get(&p.id)
                        .map_or("-".into(), |m| format!("{:.3}", m.map_33))
                ));
                if let Some(row) = at.next() {
                    row.insert(p.id.clone(), scores);
                }
            } else {
                clock.say(format!(
                    "  local-only {} round {round} of {rounds} trained{left}",
                    p.id
                ));
            }
        }
        if let Some((span, model)) = window.mean()? {
            tails.insert(p.id.clone(), sets.score_for_plant(&model, &p.id)?);
            tail_rounds = Some((span, window.len()));
        }
        let Some(last) = by_round.last().and_then(|r| r.get(&p.id)) else {
            continue;
        };
        clock.say(format!(
            "local-only {}: after {rounds} rounds global map_33 {:.3}, own {}",
            p.id,
            last.global.map_33,
            last.plants
                .get(&p.id)
                .map_or("-".into(), |m| format!("{:.3}", m.map_33))
        ));
    }
    let tail = tail_rounds.map(|((first_round, last_round), models)| {
        let t = local_only_round(last_round, tails);
        TailMean {
            first_round,
            last_round,
            models,
            scores: ModelScores {
                global: t.mean_global,
                unseen: t.mean_unseen,
                plants: t.own,
            },
        }
    });
    if let Some(t) = &tail {
        say_tail(
            clock,
            "local-only (each plant's own mean, scores averaged over the plants)",
            t,
        );
    }
    let rounds = by_round
        .into_iter()
        .zip(scored)
        .map(|(by_plant, round)| local_only_round(round, by_plant))
        .collect();
    Ok((rounds, tail))
}

/// The plants' local-only models after `round`: their scores averaged over the plants, and
/// each plant's on its own test data.
fn local_only_round(round: u64, by_plant: BTreeMap<String, ModelScores>) -> LocalOnlyRound {
    let globals: Vec<_> = by_plant.values().map(|s| s.global).collect();
    let unseen: Vec<_> = by_plant.values().filter_map(|s| s.unseen).collect();
    LocalOnlyRound {
        round,
        mean_global: mean(&globals),
        mean_unseen: (!unseen.is_empty()).then(|| mean(&unseen)),
        own: by_plant
            .iter()
            .filter_map(|(id, s)| Some((id.clone(), *s.plants.get(id)?)))
            .collect(),
        by_plant,
    }
}

/// `"; about N min left"` after `done` of `total` rounds took `elapsed` seconds, or nothing.
fn left(elapsed: f64, done: u64, total: u64) -> String {
    time_left(elapsed, done, total).map_or(String::new(), |t| format!("; {t}"))
}

fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => {
            return Err(anyhow!(
                "compute.device = \"cuda\" but LibTorch sees no CUDA device; use auto or cpu"
            ))
        }
        _ => auto_device(),
    })
}
