//! Checks both FedAvg paths on the benchmark workload against its published canonical checksums.

use super::workload::{self, ModelSize};
use super::{aggregate_canonical, DeltaSource, PlantUpdate, StreamingFedAvg};
use crate::model::ModelState;

#[derive(Clone, Copy, Debug)]
enum Path {
    Canonical,
    /// Canonical, reading every delta through `DeltaSource::read` as a file would be.
    CanonicalGenerated,
    Streaming,
}

/// `rounds` rounds of the workload from G0; the table-order sha256 after each.
fn run(size: ModelSize, clients: u32, rounds: u32, path: Path) -> Vec<String> {
    let mut g = workload::initial_global(size);
    let mut out = Vec::new();
    for r in 1..=rounds {
        g = match path {
            Path::Canonical => {
                let deltas: Vec<ModelState> = (0..clients)
                    .map(|k| workload::client_delta(size, k, r))
                    .collect();
                let ups: Vec<PlantUpdate> = deltas
                    .iter()
                    .enumerate()
                    .map(|(k, d)| plant(k, d))
                    .collect();
                aggregate_canonical(&g, &ups).unwrap()
            }
            Path::CanonicalGenerated => {
                let deltas: Vec<workload::GeneratedDelta> = (0..clients)
                    .map(|k| workload::GeneratedDelta::new(size, k, r))
                    .collect();
                let ups: Vec<PlantUpdate> = deltas
                    .iter()
                    .enumerate()
                    .map(|(k, d)| plant(k, d))
                    .collect();
                aggregate_canonical(&g, &ups).unwrap()
            }
            Path::Streaming => {
                let mut acc = StreamingFedAvg::begin(&g);
                // Arrival order deliberately not the id order.
                for k in (0..clients).rev() {
                    let d = workload::client_delta(size, k, r);
                    acc.add(&plant_id(k as usize), &d, workload::num_samples(k))
                        .unwrap();
                }
                assert_eq!(acc.total_samples(), workload::total_samples(clients));
                acc.finish(&g).unwrap()
            }
        };
        out.push(workload::sha256_table_order(size, &g).unwrap());
    }
    out
}

fn plant_id(k: usize) -> String {
    format!("plant-{k:03}")
}

fn plant(k: usize, d: &dyn DeltaSource) -> PlantUpdate<'_> {
    let n = workload::num_samples(u32::try_from(k).unwrap());
    PlantUpdate::new(plant_id(k), n, d)
}

#[test]
fn workload_generator_matches_the_spec() {
    assert_eq!(ModelSize::Tiny.num_params(), 10_898);
    assert_eq!(ModelSize::M1.num_params(), 1_002_698);
    assert_eq!(ModelSize::M10.num_params(), 10_116_810);
    assert_eq!(workload::total_samples(4), 1000);
    assert_eq!(workload::total_samples(64), 50 * 64 * 65);
    let g0 = workload::initial_global(ModelSize::Tiny);
    assert!(g0
        .iter()
        .flat_map(|(_, t)| t.data())
        .all(|&v| (-0.25..0.25).contains(&v)));
    let mut d = vec![0f32; 4096];
    workload::delta_values(3, 2, 12345, &mut d);
    assert!(d.iter().all(|&v| v.abs() <= 1024.0 / 16_777_216.0));
    let gen = workload::GeneratedDelta::new(ModelSize::Tiny, 3, 2);
    let mem = workload::client_delta(ModelSize::Tiny, 3, 2);
    for (name, t) in mem.iter() {
        let mut buf = vec![0f32; t.numel() - 1];
        gen.read(name, 1, &mut buf).unwrap();
        assert_eq!(buf, t.data()[1..], "{name}");
    }
}

/// Pinned with a pure-Python reference written from WORKLOAD.md (no numpy), which also
/// reproduces the published `4x1M` round-1 checksum.
const TINY_PINNED: [(u32, u32, &str); 6] = [
    (
        4,
        1,
        "106a2cd8cc57f6a58854efe8ec9dd6ec2a00fb0020f5c4e6bc3091d72c71ecc5",
    ),
    (
        4,
        5,
        "83c338b318b4ee18168207111abc8a453b4a6c50b759d81e147cf8803b26bd3b",
    ),
    (
        1,
        5,
        "48075a4c8d28de75c4ed6e09c02c3ef2cf10963ead0d41d552e2d4be56072675",
    ),
    (
        3,
        5,
        "e9095fc8b3540d169b3576db02f4a4de6f6978c7d38f9297e218a5731263d499",
    ),
    (
        16,
        5,
        "c6edc72020267f968526e125a492f9a6206ca58edb998810dd1388663c955ee2",
    ),
    (
        64,
        5,
        "09d47b54d17ffafbe15509b049644f2103af8bcfc433a1d1971862256e37731a",
    ),
];

#[test]
fn workload_tiny_matches_pinned_reference() {
    for (clients, round, want) in TINY_PINNED {
        for path in [Path::Canonical, Path::CanonicalGenerated, Path::Streaming] {
            let got = run(ModelSize::Tiny, clients, round, path);
            assert_eq!(
                got[round as usize - 1],
                want,
                "K={clients} round {round} {path:?}"
            );
        }
    }
}

fn published() -> std::collections::BTreeMap<String, workload::CellChecksums> {
    let path = workload::checksums_path();
    workload::load_checksums(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the published checksums at {}: {e}; they come with the benchmark in \
             shared/bench/flower/results (regenerate with `bench/flower/reference.py checksums K P 5`)",
            path.display()
        )
    })
}

#[test]
fn workload_4x1m_matches_published_checksums() {
    let cells = published();
    let key = workload::cell_key(4, ModelSize::M1);
    let cell = cells
        .get(&key)
        .unwrap_or_else(|| panic!("the checksum file has no cell {key}"));
    assert_eq!(cell.num_params, ModelSize::M1.num_params());
    let want: Vec<&str> = cell.rounds.iter().map(|r| r.sha256.as_str()).collect();
    assert_eq!(want.len(), 5);
    for path in [Path::Canonical, Path::Streaming] {
        assert_eq!(run(ModelSize::M1, 4, 5, path), want, "{path:?}");
    }
    assert_eq!(
        run(ModelSize::M1, 4, 1, Path::CanonicalGenerated),
        want[..1]
    );
}

#[test]
fn workload_tiny_cells_match_published_checksums_if_any() {
    for cell in published().values().filter(|c| c.size == "tiny") {
        let rounds = u32::try_from(cell.rounds.len()).unwrap();
        let want: Vec<&str> = cell.rounds.iter().map(|r| r.sha256.as_str()).collect();
        let got = run(ModelSize::Tiny, cell.clients, rounds, Path::Canonical);
        assert_eq!(got, want, "K={} tiny", cell.clients);
    }
}
