//! Each plant's data for one run, as the real client reads it: a DeepPCB-layout folder per
//! plant with its own `trainval.txt` and `test.txt` (its share of the source's split files,
//! chosen by a [`partition`] function) and links to the source's board-group folders, so no
//! image is copied. The source is a DeepPCB `PCBData` folder or generated synthetic plants
//! (cached under the output's `data/`, keyed by everything that shapes them); a COCO source
//! is prepared by [`crate::coco_data`] into COCO folders ([`crate::coco_layout`]) with the
//! same partitioners ([`partition_items`]).
//!
//! ```text
//! RUN/plant-data/<plant>/   trainval.txt, test.txt, groupNNNNN -> SOURCE/groupNNNNN
//! RUN/plant-data/unseen/    test.txt of the test boards of groups no plant trains on
//! RUN/plant-data/<plant>@round-<r>/   the plant's data from round r on ([[data.drift]])
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fedinspect_client::data::deeppcb::{parse_annotations, CLASS_NAMES};
use fedinspect_client::data::Channels;
use fedinspect_common::arch::ArchConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::experiment::{Settings, Source, SplitKind};
use crate::partition::{self, Partition};
use crate::synthetic;
use crate::synthetic_styles;

/// One line of a split file and what the partitioners need to know of it.
#[derive(Clone, Debug)]
pub struct SplitLine {
    pub line: String,
    /// The first path component, e.g. `group00041`.
    pub group: String,
    /// The image's most frequent defect class (0 when it has none).
    pub class: usize,
}

/// One plant's prepared data.
#[derive(Clone, Debug)]
pub struct PlantFolder {
    pub id: String,
    /// A DeepPCB-layout folder: the plant's `plant.toml` names it with every group.
    pub root: PathBuf,
    /// The board groups its images come from.
    pub groups: Vec<String>,
    pub train_images: usize,
    pub test_images: usize,
}

/// A run's data.
#[derive(Clone, Debug)]
pub struct PreparedData {
    /// The source folder: its `test.txt` is the held-out global test set and its
    /// `trainval.txt` the union of the plants' training data.
    pub source: PathBuf,
    pub plants: Vec<PlantFolder>,
    /// Test boards of groups no plant trains on (DeepPCB's four test-only boards).
    pub unseen_test: Option<PathBuf>,
    /// Mean total variation distance of the plants' class mixes from the overall mix.
    pub class_skew: f64,
    /// Plants whose data changes from a round on (`[[data.drift]]`), in plant and round order.
    pub drift: Vec<DriftFolder>,
    /// The classes, in class-index order: DeepPCB's six, or a COCO source's categories.
    pub class_names: Vec<String>,
    /// The detector's input: grey image and template (DeepPCB layout) or RGB (COCO).
    pub channels: Channels,
}

impl PreparedData {
    /// The detector for this data (its input channels and classes) at `input_size` and `width`.
    pub fn arch(&self, input_size: u32, width: f64) -> ArchConfig {
        ArchConfig {
            in_channels: self.channels.count() as u32,
            num_classes: u32::try_from(self.class_names.len()).unwrap_or(u32::MAX),
            input_size,
            width,
            ..ArchConfig::default()
        }
    }
}

/// A plant's data from a round on: the same boards and labels, another look.
#[derive(Clone, Debug)]
pub struct DriftFolder {
    pub plant_id: String,
    pub from_round: u32,
    /// A DeepPCB-layout folder with the plant's split files, its group linked to the
    /// drifted boards.
    pub root: PathBuf,
}

/// Prepares the source (`data_cache` holds generated synthetic data) and the plants'
/// folders under `run_dir/plant-data`.
pub fn prepare(s: &Settings, data_cache: &Path, run_dir: &Path) -> Result<PreparedData> {
    let source = match s.data.source {
        Source::Coco => return crate::coco_data::prepare(s, run_dir),
        Source::Deeppcb => {
            let root = s.data.path.as_ref().expect("checked when parsed");
            if !root.join("trainval.txt").is_file() || !root.join("test.txt").is_file() {
                bail!(
                    "{} is not a DeepPCB PCBData folder (no trainval.txt and test.txt); pass the folder that holds them",
                    root.display()
                );
            }
            fs::canonicalize(root)?
        }
        Source::Synthetic => synthetic_source(s, data_cache)?,
    };
    let train = read_split(&source, "trainval.txt")?;
    let test = read_split(&source, "test.txt")?;
    let plants = s.data.plants as usize;
    let train_groups: Vec<String> = train.iter().map(|l| l.group.clone()).collect();
    let classes: Vec<usize> = train.iter().map(|l| l.class).collect();
    let test_groups: Vec<String> = test.iter().map(|l| l.group.clone()).collect();
    let test_classes: Vec<usize> = test.iter().map(|l| l.class).collect();
    let (train_parts, test_parts) =
        partition_items(s, (&train_groups, &classes), (&test_groups, &test_classes))?;
    let class_skew = partition::class_skew(&classes, &train_parts);
    let base = run_dir.join("plant-data");
    if base.exists() {
        fs::remove_dir_all(&base)
            .with_context(|| format!("cannot remove {} of an earlier run", base.display()))?;
    }
    let width = plants.to_string().len().max(2);
    let mut folders = Vec::with_capacity(plants);
    for (p, (tr, te)) in train_parts.iter().zip(&test_parts).enumerate() {
        let id = format!("plant-{:0width$}", p + 1);
        let root = base.join(&id);
        let train_lines: Vec<&SplitLine> = tr.iter().map(|&i| &train[i]).collect();
        let test_lines: Vec<&SplitLine> = te.iter().map(|&i| &test[i]).collect();
        write_folder(&source, &root, &train_lines, &test_lines)?;
        let groups: BTreeSet<&String> = train_lines.iter().map(|l| &l.group).collect();
        folders.push(PlantFolder {
            id,
            root,
            groups: groups.into_iter().cloned().collect(),
            train_images: train_lines.len(),
            test_images: test_lines.len(),
        });
    }
    let trained: BTreeSet<&String> = train_groups.iter().collect();
    let unseen: Vec<&SplitLine> = test
        .iter()
        .filter(|l| !trained.contains(&l.group))
        .collect();
    let unseen_test = if unseen.is_empty() {
        None
    } else {
        let root = base.join("unseen");
        write_folder(&source, &root, &[], &unseen)?;
        Some(root)
    };
    let mut drift = Vec::new();
    for d in &s.data.drift {
        let (p, from_round) = (d.plant - 1, d.from_round.expect("checked when parsed"));
        let plant = &folders[p as usize];
        let (tr, te) = (&train_parts[p as usize], &test_parts[p as usize]);
        let source_name = source
            .file_name()
            .map_or("synthetic".into(), |n| n.to_string_lossy().into_owned());
        let boards = tr.len() + te.len();
        let drifted = synthetic_styles::write_drifted_group(
            s,
            data_cache,
            &source_name,
            p,
            from_round,
            boards,
        )?;
        let root = base.join(format!("{}@round-{from_round}", plant.id));
        let train_lines: Vec<&SplitLine> = tr.iter().map(|&i| &train[i]).collect();
        let test_lines: Vec<&SplitLine> = te.iter().map(|&i| &test[i]).collect();
        write_folder(&drifted, &root, &train_lines, &test_lines)?;
        drift.push(DriftFolder {
            plant_id: plant.id.clone(),
            from_round,
            root,
        });
    }
    Ok(PreparedData {
        source,
        plants: folders,
        unseen_test,
        class_skew,
        drift,
        class_names: CLASS_NAMES.iter().map(|c| c.to_string()).collect(),
        channels: Channels::GrayTemplate,
    })
}

/// Which plant holds which training and which test image, by `s.data.split`, from each
/// image's `(groups, classes)`: by group, the test images of a plant's groups; by Dirichlet,
/// the test images dealt with the plant's class shares; IID, an even share (none when there
/// are fewer than [`partition::MIN_ITEMS`] test images per plant).
pub fn partition_items(
    s: &Settings,
    (train_groups, classes): (&[String], &[usize]),
    (test_groups, test_classes): (&[String], &[usize]),
) -> Result<(Partition, Partition)> {
    let plants = s.data.plants as usize;
    Ok(match s.data.split {
        SplitKind::Group => {
            let (parts, names) = partition::by_group(train_groups, plants)?;
            let test_parts = names
                .iter()
                .map(|gs| {
                    (0..test_groups.len())
                        .filter(|&i| gs.contains(&test_groups[i]))
                        .collect()
                })
                .collect();
            (parts, test_parts)
        }
        SplitKind::Dirichlet => {
            let (parts, shares) = partition::dirichlet(classes, plants, s.data.alpha, s.seed)?;
            let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x7e57);
            let test_parts = partition::by_class_shares(test_classes, &shares, &mut rng);
            (parts, test_parts)
        }
        SplitKind::Iid => {
            let parts = partition::iid(classes.len(), plants, s.seed)?;
            let tests = test_classes.len();
            // `iid` leaves every plant MIN_ITEMS or refuses; with fewer test images the
            // plants get none rather than a refusal (an empty partition would drop every plant).
            let test_parts = partition::iid(tests, plants, s.seed ^ 0x7e57)
                .unwrap_or_else(|_| vec![Vec::new(); plants]);
            (parts, test_parts)
        }
    })
}

/// The synthetic plants of `s`, generated once into `cache` (a folder named by every
/// setting that shapes them).
fn synthetic_source(s: &Settings, cache: &Path) -> Result<PathBuf> {
    let d = &s.data;
    let root = cache.join(format!(
        "synthetic-{}plants-{}px-{}train-{}test-alpha{}-skew{}-seed{}{}",
        d.plants,
        d.image_size,
        d.train_per_plant,
        d.test_per_plant,
        d.alpha,
        d.size_skew,
        s.seed,
        synthetic_styles::tag(&d.style)
    ));
    let done = root.join(".complete");
    if done.exists() {
        return Ok(fs::canonicalize(&root)?);
    }
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    let train = synthetic::skewed_counts(
        d.plants,
        d.train_per_plant,
        d.size_skew,
        partition::MIN_ITEMS,
    );
    let counts: Vec<(usize, usize)> = train.into_iter().map(|t| (t, d.test_per_plant)).collect();
    println!(
        "generating {} synthetic plants ({} training boards in all, {} test boards each, {} px) in {}",
        d.plants,
        counts.iter().map(|c| c.0).sum::<usize>(),
        d.test_per_plant,
        d.image_size,
        root.display()
    );
    let styles: Vec<_> = (0..d.plants)
        .map(|p| synthetic_styles::initial_style(s, p))
        .collect();
    synthetic::write_dataset_styled(&root, &counts, d.image_size, &styles, s.seed)
        .with_context(|| format!("cannot write synthetic plants into {}", root.display()))?;
    fs::write(&done, b"")?;
    Ok(fs::canonicalize(&root)?)
}

/// The lines of `root/file` with each image's group and dominant class.
pub fn read_split(root: &Path, file: &str) -> Result<Vec<SplitLine>> {
    let path = root.join(file);
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(image), Some(ann)) = (parts.next(), parts.next()) else {
            bail!(
                "{}: '{line}' is not an 'image annotation' line",
                path.display()
            );
        };
        let group = image.split('/').next().unwrap_or(image).to_string();
        let ann_path = root.join(ann);
        let ann_text = fs::read_to_string(&ann_path).unwrap_or_default();
        let (annotations, _) = parse_annotations(&ann_text, &ann_path);
        let mut counts = [0usize; 6];
        for a in &annotations {
            if let Some(c) = counts.get_mut(a.class as usize) {
                *c += 1;
            }
        }
        let class = (0..counts.len())
            .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
            .filter(|&c| counts[c] > 0)
            .unwrap_or(0);
        out.push(SplitLine {
            line: line.trim().to_string(),
            group,
            class,
        });
    }
    Ok(out)
}

/// A DeepPCB-layout folder listing `train` and `test` with links to their groups' folders.
fn write_folder(
    source: &Path,
    root: &Path,
    train: &[&SplitLine],
    test: &[&SplitLine],
) -> Result<()> {
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let groups: BTreeSet<&String> = train.iter().chain(test).map(|l| &l.group).collect();
    for g in groups {
        std::os::unix::fs::symlink(source.join(g), root.join(g))
            .with_context(|| format!("cannot link {} into {}", g, root.display()))?;
    }
    let lines = |ls: &[&SplitLine]| {
        ls.iter()
            .map(|l| format!("{}\n", l.line))
            .collect::<String>()
    };
    fs::write(root.join("trainval.txt"), lines(train))?;
    fs::write(root.join("test.txt"), lines(test))?;
    Ok(())
}
