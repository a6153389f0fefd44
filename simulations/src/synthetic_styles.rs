//! The looks of an experiment's synthetic plants: each drawn from the seed
//! ([`PlantStyle::sample`]), then set where `[[data.style]]` says, and for `[[data.drift]]`
//! the look from a round on. Also the drifted copies of a plant's board group: the same boards
//! (same seeds, same defects and labels) rendered with the drifted look, in a folder of their
//! own beside the synthetic source, so the plant's data can switch between two rounds.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ring::digest::{digest, SHA256};

use crate::experiment::{PlantShift, Settings};
use crate::synthetic::{self, PlantStyle};

/// Plant p's (0-based) look at the start of the study.
pub fn initial_style(s: &Settings, p: u32) -> PlantStyle {
    let drawn = PlantStyle::sample(s.seed.wrapping_add(u64::from(p)), s.data.alpha);
    s.data
        .style
        .iter()
        .filter(|sh| sh.plant == p + 1)
        .fold(drawn, apply)
}

/// `style` with the knobs `shift` sets.
pub fn apply(style: PlantStyle, shift: &PlantShift) -> PlantStyle {
    PlantStyle {
        gain: shift.gain.unwrap_or(style.gain),
        offset: shift.offset.unwrap_or(style.offset),
        noise: shift.noise.unwrap_or(style.noise),
        blur: shift.blur.unwrap_or(style.blur),
        scale: shift.scale.unwrap_or(style.scale),
        defect_scale: shift.defect_scale.unwrap_or(style.defect_scale),
        class_mix: style.class_mix,
    }
}

/// A short tag naming a list of shifts, for cache folder names ("" when there are none).
pub fn tag(shifts: &[PlantShift]) -> String {
    if shifts.is_empty() {
        return String::new();
    }
    let text = toml::to_string(&Shifts { shift: shifts }).unwrap_or_default();
    format!("-{}", &hex::encode(digest(&SHA256, text.as_bytes()))[..12])
}

#[derive(serde::Serialize)]
struct Shifts<'a> {
    shift: &'a [PlantShift],
}

/// Plant p's (0-based) look from `drift.from_round` on: its look then, with every drift of
/// that plant up to that round applied in order.
pub fn drifted_style(s: &Settings, p: u32, from_round: u32) -> PlantStyle {
    s.data
        .drift
        .iter()
        .filter(|d| d.plant == p + 1 && d.from_round.is_some_and(|r| r <= from_round))
        .fold(initial_style(s, p), apply)
}

/// Writes plant p's board group (`boards` boards, as in the source) with its look from
/// `from_round` into `cache/<name>`, once; returns the folder (DeepPCB layout, one group).
pub fn write_drifted_group(
    s: &Settings,
    cache: &Path,
    source_name: &str,
    p: u32,
    from_round: u32,
    boards: usize,
) -> Result<PathBuf> {
    let root = cache.join(format!(
        "{source_name}-drift{}-plant{}-round{from_round}",
        tag(&s.data.drift),
        p + 1
    ));
    let done = root.join(".complete");
    if !done.exists() {
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        let style = drifted_style(s, p, from_round);
        synthetic::write_plant(&root, p, boards, s.data.image_size, &style, s.seed)
            .with_context(|| format!("cannot write drifted boards into {}", root.display()))?;
        fs::write(&done, b"")?;
    }
    Ok(fs::canonicalize(&root)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::Experiment;

    fn settings(text: &str) -> Settings {
        Experiment::parse(text, "t", None).unwrap().base
    }

    #[test]
    fn styles_set_only_the_knobs_they_name_and_drifts_accumulate() {
        let s = settings(
            "[data]\nplants = 3\n[[data.style]]\nplant = 2\nblur = 1.5\n\
             [federation]\nrounds = 6\nplants_in_process = true\n\
             [[data.drift]]\nplant = 2\nfrom_round = 3\ngain = 0.6\n\
             [[data.drift]]\nplant = 2\nfrom_round = 5\nnoise = 9.0\n",
        );
        let drawn = PlantStyle::sample(s.seed + 1, s.data.alpha);
        let start = initial_style(&s, 1);
        assert_eq!((start.blur, start.gain), (1.5, drawn.gain));
        assert_eq!(initial_style(&s, 0).blur, 0.0);
        let r3 = drifted_style(&s, 1, 3);
        assert_eq!((r3.gain, r3.blur, r3.noise), (0.6, 1.5, drawn.noise));
        let r5 = drifted_style(&s, 1, 5);
        assert_eq!((r5.gain, r5.noise), (0.6, 9.0));
        assert_ne!(tag(&s.data.drift), tag(&s.data.drift[..1]));
        assert_eq!(tag(&[]), "");
        // The run's settings.toml keeps them.
        let written = s.to_toml();
        assert!(
            written.contains("[[data.drift]]") && written.contains("from_round = 5"),
            "{written}"
        );
    }

    #[test]
    fn impossible_styles_and_drifts_are_all_reported() {
        let text = "[data]\nplants = 3\nsplit = \"iid\"\n\
                    [[data.style]]\nplant = 4\nblur = 9.0\nfrom_round = 2\n\
                    [[data.drift]]\nplant = 1\nscale = 3.0\n\
                    [[data.drift]]\nplant = 2\nfrom_round = 1\n\
                    [federation]\nrounds = 3\nplants_in_process = false\n";
        let problems = match Experiment::parse(text, "t", None) {
            Err(crate::experiment::ParseFailure::Invalid(p)) => p,
            other => panic!("{other:?}"),
        };
        for want in [
            "data.style[0].plant: 4",
            "data.style[0].blur: 9",
            "data.style[0].from_round",
            "data.drift[0].scale: 3",
            "data.drift[0].from_round: missing",
            "data.drift[1].from_round: 1",
            "needs split = \"group\"",
            "needs federation.plants_in_process = true",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "{want} not in {problems:#?}"
            );
        }
        let unknown = Experiment::parse("[[data.drift]]\nplant = 1\nlight = 2.0\n", "t", None);
        assert!(
            matches!(&unknown, Err(crate::experiment::ParseFailure::Toml(m)) if m.contains("light")),
            "{unknown:?}"
        );
    }

    #[test]
    fn many_plants_run_in_process_unless_the_file_says_otherwise() {
        let many = settings("[data]\nplants = 64\n");
        assert!(many.federation.plants_in_process);
        assert!(
            !settings("[data]\nplants = 3\n")
                .federation
                .plants_in_process
        );
        let forced = settings("[data]\nplants = 64\n[federation]\nplants_in_process = false\n");
        assert!(!forced.federation.plants_in_process);
        assert!(many.compute.concurrent_trainings >= 1);
    }
}
