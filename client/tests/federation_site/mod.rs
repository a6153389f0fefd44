//! A federation site for agent tests: a fresh PKI and the initial model in a temporary folder,
//! a real coordinator on 127.0.0.1, and plants with tiny DeepPCB-layout data (64x64 boards with
//! drawn defects) and their `plant.toml`. Shared by the agent test files; each uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use fedinspect_client::agent::Event;
use fedinspect_client::config::Config;
use fedinspect_client::data::deeppcb::CLASS_NAMES;
use fedinspect_client::detector::Detector;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::Codec;
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::{Limits, RoundPolicy};
use fedinspect_coordinator::{Config as CoordinatorConfig, Coordinator, Running};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

pub const IMAGES_PER_PLANT: usize = 8;
/// How long a test waits for anything (an event, a published version, an agent to stop).
pub const WAIT: Duration = Duration::from_secs(90);

pub fn tiny_arch() -> ArchConfig {
    ArchConfig {
        in_channels: 2,
        num_classes: CLASS_NAMES.len() as u32,
        input_size: 64,
        width: 0.25,
        fpn_width: 16,
        head_width: 16,
        ..ArchConfig::default()
    }
}

/// A PKI and the initial model (version 1) in a temporary folder.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub pki: PkiLayout,
    pub initial: ModelState,
}

impl Site {
    pub fn new(plants: usize) -> Self {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let pki = pki::init(
            &dir.path().join("pki"),
            &InitOptions::with_plant_count(plants),
        )
        .unwrap();
        let names = CLASS_NAMES.iter().map(|s| s.to_string()).collect();
        let initial = Detector::seeded(tiny_arch(), names, tch::Device::Cpu, 7)
            .unwrap()
            .state()
            .unwrap();
        initial
            .save_safetensors(&dir.path().join("initial.safetensors"), &BTreeMap::new())
            .unwrap();
        Self { dir, pki, initial }
    }

    /// A coordinator on 127.0.0.1:0 with its own sled folder.
    pub async fn start(&self, round: RoundPolicy, limits: Limits) -> Running {
        let root = self.dir.path();
        let config = CoordinatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: root.join("coordinator"),
            tls: self.pki.coordinator_files(),
            signing_key: self.pki.coordinator_signing_key(),
            initial_model: Some(root.join("initial.safetensors")),
            round,
            limits,
            bundles: None,
            metrics_listen: None,
            storage: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Coordinator::build(&config)
            .unwrap()
            .spawn(listener)
            .unwrap()
    }

    pub fn address(&self, running: &Running) -> String {
        format!("https://127.0.0.1:{}", running.local_addr().port())
    }

    /// plant-`i`'s data and plant.toml (paths relative to its folder where they can be), with
    /// `agent` as the `[agent]` table; the config loaded from that file.
    pub fn plant(&self, i: usize, address: &str, agent: &str) -> Config {
        let plant_dir = self.dir.path().join(format!("plant-{i}"));
        if !plant_dir.join("PCBData").exists() {
            write_plant_data(&plant_dir.join("PCBData"), i);
        }
        let files = self.pki.plant_files(&format!("plant-{i}"));
        let agent = if agent.is_empty() {
            "backoff_initial_ms = 100\nbackoff_max_secs = 1\ndeadline_margin_secs = 1"
        } else {
            agent
        };
        let text = format!(
            r#"
[coordinator]
address = "{address}"
public_key = "{pub_key}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[state]
dir = "state"

[data]
deeppcb = "PCBData"
validation_fraction = 0.25

[model]
input_size = 64
width = 0.25
fpn_width = 16
head_width = 16

[training]
device = "cpu"
threads = 1
warmup_steps = 2
seed = {i}

[agent]
{agent}
"#,
            pub_key = self.pki.coordinator_verifying_key().display(),
            ca = files.ca_cert.display(),
            cert = files.cert.display(),
            key = files.key.display(),
        );
        let path = plant_dir.join("plant.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap()
    }
}

/// `plants` plants per round, q8, FedProx, one local epoch of batches of 3.
pub fn policy(plants: usize, deadline_secs: u64, max_rounds: u64) -> RoundPolicy {
    RoundPolicy {
        min_participants: plants as u32,
        target_participants: plants as u32,
        deadline: Duration::from_secs(deadline_secs),
        local_epochs: 1,
        learning_rate: 5e-3,
        fedprox_mu: 0.01,
        batch_size: 3,
        codec: Codec::q8(),
        max_rounds,
        ..RoundPolicy::default()
    }
}

/// The next event, within `WAIT`.
pub async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an event within the wait")
        .expect("the agent is running")
}

/// Eight 64x64 DeepPCB pairs for plant `plant`: a board with traces as the template, the
/// same board with bright and dark defect rectangles as the test image.
pub fn write_plant_data(root: &Path, plant: usize) {
    let group = format!("{:05}", plant);
    let mut rng = ChaCha8Rng::seed_from_u64(plant as u64);
    let mut split = String::new();
    for n in 0..IMAGES_PER_PLANT {
        let stem = format!("{group}{n:03}");
        let mut template = vec![60u8; 64 * 64];
        for y in (8..64).step_by(16) {
            for x in 0..64 {
                template[y * 64 + x] = 150;
                template[(y + 1) * 64 + x] = 150;
            }
        }
        let mut test = template.clone();
        let mut boxes = String::new();
        for _ in 0..rng.gen_range(1..=2) {
            let (w, h) = (rng.gen_range(6..14), rng.gen_range(6..14));
            let (x0, y0) = (rng.gen_range(0..64 - w), rng.gen_range(0..64 - h));
            let class = rng.gen_range(1..=6u32);
            let value = if class % 2 == 0 { 250 } else { 0 };
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    test[y * 64 + x] = value;
                }
            }
            boxes.push_str(&format!("{x0} {y0} {} {} {class}\n", x0 + w, y0 + h));
        }
        let images = root.join(format!("group{group}/{group}"));
        jpeg(&images.join(format!("{stem}_test.jpg")), &test);
        jpeg(&images.join(format!("{stem}_temp.jpg")), &template);
        let notes = root.join(format!("group{group}/{group}_not"));
        std::fs::create_dir_all(&notes).unwrap();
        std::fs::write(notes.join(format!("{stem}.txt")), boxes).unwrap();
        split.push_str(&format!(
            "group{group}/{group}/{stem}.jpg group{group}/{group}_not/{stem}.txt\n"
        ));
    }
    std::fs::write(root.join("trainval.txt"), split).unwrap();
}

pub fn jpeg(path: &Path, grey: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = std::fs::File::create(path).unwrap();
    JpegEncoder::new_with_quality(&mut file, 95)
        .encode(grey, 64, 64, ExtendedColorType::L8)
        .unwrap();
}

pub fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}
