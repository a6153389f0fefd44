//! Partitioners: which plant holds which image. Pure functions over item indices, so they
//! are tested without images: by board group (whole groups per plant, dealt round-robin in
//! name order), by a Dirichlet(alpha) draw per class over the plants (the usual non-IID
//! benchmark split; small alpha gives each plant few classes), or IID (shuffled, dealt out
//! evenly). Every item lands in exactly one plant; all draws come from the seed.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// Plant index -> the indices of its items, ascending.
pub type Partition = Vec<Vec<usize>>;

/// Share of each class going to each plant: `shares[class][plant]`, each row summing to 1.
pub type ClassShares = Vec<Vec<f64>>;

/// The fewest training items a plant may be left with (a batch and a shuffle need some).
pub const MIN_ITEMS: usize = 2;
/// Dirichlet draws tried before giving up on leaving every plant [`MIN_ITEMS`].
const DRAWS: usize = 200;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    #[error("{plants} plants need at least {plants} board groups but the data has {groups}; lower data.plants or use split = \"dirichlet\" or \"iid\"")]
    FewGroups { plants: usize, groups: usize },
    #[error("{items} images cannot give {plants} plants {MIN_ITEMS} each; use fewer plants or more data")]
    FewItems { items: usize, plants: usize },
    #[error("no Dirichlet(alpha = {alpha}) draw in {DRAWS} tries left every one of the {plants} plants {MIN_ITEMS} images; raise alpha or use fewer plants")]
    Degenerate { alpha: f64, plants: usize },
}

/// Whole groups per plant: the distinct groups sorted by name, group i to plant i mod plants.
/// Returns the partition and each plant's groups.
pub fn by_group(
    groups: &[String],
    plants: usize,
) -> Result<(Partition, Vec<Vec<String>>), PartitionError> {
    let mut names: Vec<&String> = groups.iter().collect();
    names.sort();
    names.dedup();
    if names.len() < plants {
        return Err(PartitionError::FewGroups {
            plants,
            groups: names.len(),
        });
    }
    let mut plant_groups = vec![Vec::new(); plants];
    for (i, g) in names.iter().enumerate() {
        plant_groups[i % plants].push((*g).clone());
    }
    let mut parts = vec![Vec::new(); plants];
    for (item, g) in groups.iter().enumerate() {
        let p = plant_groups
            .iter()
            .position(|gs| gs.contains(g))
            .expect("every group was dealt to a plant");
        parts[p].push(item);
    }
    Ok((parts, plant_groups))
}

/// Each class's items divided among `plants` by shares drawn from Dirichlet(alpha), redrawn
/// until every plant holds at least [`MIN_ITEMS`]. `classes[i]` is item i's class (its most
/// frequent defect type). Returns the partition and the shares, which
/// [`by_class_shares`] applies to the test items so each plant is tested on its own mix.
pub fn dirichlet(
    classes: &[usize],
    plants: usize,
    alpha: f64,
    seed: u64,
) -> Result<(Partition, ClassShares), PartitionError> {
    if classes.len() < plants * MIN_ITEMS {
        return Err(PartitionError::FewItems {
            items: classes.len(),
            plants,
        });
    }
    let num_classes = classes.iter().max().map_or(0, |m| m + 1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd112_1c41);
    let gamma = Gamma::new(alpha.max(1e-3), 1.0).expect("alpha is positive");
    for _ in 0..DRAWS {
        let shares: ClassShares = (0..num_classes)
            .map(|_| {
                let g: Vec<f64> = (0..plants)
                    .map(|_| gamma.sample(&mut rng).max(1e-300))
                    .collect();
                let total: f64 = g.iter().sum();
                g.into_iter().map(|x| x / total).collect()
            })
            .collect();
        let parts = by_class_shares(classes, &shares, &mut rng);
        if parts.iter().all(|p| p.len() >= MIN_ITEMS) {
            return Ok((parts, shares));
        }
    }
    Err(PartitionError::Degenerate { alpha, plants })
}

/// Divides each class's items (shuffled) into consecutive runs sized by `shares[class]`.
/// A class beyond `shares` goes evenly.
pub fn by_class_shares(classes: &[usize], shares: &ClassShares, rng: &mut ChaCha8Rng) -> Partition {
    let plants = shares.first().map_or(1, Vec::len);
    let num_classes = classes.iter().max().map_or(0, |m| m + 1);
    let mut parts = vec![Vec::new(); plants];
    for c in 0..num_classes {
        let mut items: Vec<usize> = (0..classes.len()).filter(|&i| classes[i] == c).collect();
        items.shuffle(rng);
        let even = vec![1.0 / plants as f64; plants];
        let row = shares.get(c).unwrap_or(&even);
        let mut start = 0;
        let mut acc = 0.0;
        for (p, share) in row.iter().enumerate() {
            acc += share;
            let end = if p + 1 == plants {
                items.len()
            } else {
                ((acc * items.len() as f64).round() as usize).clamp(start, items.len())
            };
            parts[p].extend_from_slice(&items[start..end]);
            start = end;
        }
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    parts
}

/// `items` indices shuffled and dealt out in turn: plant sizes differ by at most one.
pub fn iid(items: usize, plants: usize, seed: u64) -> Result<Partition, PartitionError> {
    if items < plants * MIN_ITEMS {
        return Err(PartitionError::FewItems { items, plants });
    }
    let mut order: Vec<usize> = (0..items).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x11d0_5eed));
    let mut parts = vec![Vec::new(); plants];
    for (i, item) in order.into_iter().enumerate() {
        parts[i % plants].push(item);
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    Ok(parts)
}

/// How far the plants' class mixes are from the overall mix: the mean over plants of the
/// total variation distance (0: every plant has the overall mix; near 1: disjoint classes).
pub fn class_skew(classes: &[usize], parts: &Partition) -> f64 {
    let k = classes.iter().max().map_or(0, |m| m + 1);
    let mix = |items: &mut dyn Iterator<Item = usize>| {
        let mut counts = vec![0.0; k];
        let mut n = 0.0;
        for i in items {
            counts[classes[i]] += 1.0;
            n += 1.0;
        }
        counts
            .iter()
            .map(|c| c / f64::max(n, 1.0))
            .collect::<Vec<f64>>()
    };
    let overall = mix(&mut (0..classes.len()));
    let tv: f64 = parts
        .iter()
        .map(|p| {
            let m = mix(&mut p.iter().copied());
            0.5 * m
                .iter()
                .zip(&overall)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
        })
        .sum();
    tv / parts.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 600 items over 6 classes, 100 each.
    fn classes() -> Vec<usize> {
        (0..600).map(|i| i % 6).collect()
    }

    /// Each item in exactly one plant; returns the plant sizes.
    fn assert_exact_cover(parts: &Partition, items: usize) -> Vec<usize> {
        let mut seen = vec![0u32; items];
        for p in parts {
            for &i in p {
                seen[i] += 1;
            }
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "an item is missing or repeated"
        );
        let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), items);
        sizes
    }

    #[test]
    fn dirichlet_covers_every_item_once_and_small_alpha_is_more_skewed() {
        let c = classes();
        let (skewed, shares) = dirichlet(&c, 5, 0.1, 7).unwrap();
        let (even, _) = dirichlet(&c, 5, 100.0, 7).unwrap();
        assert_exact_cover(&skewed, c.len());
        assert_exact_cover(&even, c.len());
        assert_eq!(shares.len(), 6);
        for row in &shares {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
        let (s, e) = (class_skew(&c, &skewed), class_skew(&c, &even));
        assert!(
            s > 0.4 && e < 0.1,
            "skew at alpha 0.1: {s}, at alpha 100: {e}"
        );
        for p in &skewed {
            assert!(p.len() >= MIN_ITEMS);
        }
    }

    #[test]
    fn dirichlet_is_deterministic_from_the_seed() {
        let c = classes();
        assert_eq!(dirichlet(&c, 4, 0.5, 3), dirichlet(&c, 4, 0.5, 3));
        assert_ne!(dirichlet(&c, 4, 0.5, 3), dirichlet(&c, 4, 0.5, 4));
    }

    #[test]
    fn iid_deals_evenly_and_keeps_the_overall_mix() {
        let c = classes();
        let parts = iid(c.len(), 7, 1).unwrap();
        let sizes = assert_exact_cover(&parts, c.len());
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        assert!(class_skew(&c, &parts) < 0.1);
        assert_eq!(
            iid(3, 2, 1),
            Err(PartitionError::FewItems {
                items: 3,
                plants: 2
            })
        );
    }

    #[test]
    fn groups_go_whole_to_plants_round_robin() {
        let groups: Vec<String> = ["b", "a", "c", "a", "d", "b", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (parts, names) = by_group(&groups, 3).unwrap();
        assert_exact_cover(&parts, groups.len());
        assert_eq!(names, vec![vec!["a", "d"], vec!["b"], vec!["c"]]);
        assert_eq!(parts, vec![vec![1, 3, 4], vec![0, 5], vec![2, 6]]);
        assert_eq!(
            by_group(&groups, 5).unwrap_err(),
            PartitionError::FewGroups {
                plants: 5,
                groups: 4
            }
        );
    }
}
