//! The files of a federation on this machine, in one folder: a development PKI (kept across
//! runs), the initial model, `coordinator.toml`, and per plant a `plant.toml` naming its own
//! data (DeepPCB board groups, synthetic plants in DeepPCB layout, or a COCO folder of
//! [`crate::coco_layout`] as `data.coco`) and its state folder.
//! [`Site::create`] replaces everything of an earlier run but the PKI and the data.
//!
//! ```text
//! ROOT/
//!   pki/                    CA, coordinator, admin and plant certificates, signing keys
//!   initial.safetensors     version 1, stored by `coordinator init-model`
//!   coordinator/            coordinator.toml, data/ (sled db/ and blobs/)
//!   plants/<id>/            plant.toml, state/ (model cache, pending update, residual)
//!   logs/                   one log file per process
//!   models/                 versions exported through the Admin service
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fedinspect_client::data::deeppcb::CLASS_NAMES;
use fedinspect_client::detector::Detector;
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::delta::Codec;
use fedinspect_common::fsutil;
use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use toml::{Table, Value};

use crate::coco_layout;
use crate::coordinator_support::ConfigEntry;

/// Folders of an earlier run that a new run replaces.
const RUN_FOLDERS: [&str; 4] = ["coordinator", "plants", "logs", "models"];

/// One plant: its certificate name and its local data.
#[derive(Clone, Debug)]
pub struct PlantSpec {
    pub id: String,
    /// A folder in DeepPCB layout (holding `trainval.txt`) or a COCO folder
    /// ([`coco_layout`]: `train.json` and an `images` link).
    pub data_root: PathBuf,
    /// The board groups that are this plant's data.
    pub groups: Vec<String>,
    /// Share of its items held out to report local mAP before and after each round.
    pub validation_fraction: f64,
    pub seed: u64,
}

/// The round policy written into `coordinator.toml`.
#[derive(Clone, Debug)]
pub struct RoundSpec {
    /// `max_rounds`: the coordinator opens no round after this many.
    pub rounds: u64,
    /// `hold`: the coordinator opens no round at all (a baselines-only run).
    pub hold: bool,
    pub min_participants: u32,
    pub target_participants: u32,
    pub deadline_secs: u64,
    pub local_epochs: u32,
    pub learning_rate: f64,
    pub fedprox_mu: f64,
    pub batch_size: u32,
    /// `lr_cycle_rounds`: rounds sharing one learning-rate cosine (0: a cosine per round).
    pub lr_cycle_rounds: u64,
    pub codec: Codec,
}

/// Everything a site is made of.
#[derive(Clone, Debug)]
pub struct SiteSpec {
    pub root: PathBuf,
    pub plants: Vec<PlantSpec>,
    /// The detector; channels and classes are DeepPCB's (grey image + template, 6 classes),
    /// or a COCO source's (RGB, its categories: `PreparedData::arch`).
    pub arch: ArchConfig,
    /// Training crop of the plants, a multiple of 32 no larger than the input size.
    pub crop_size: u32,
    pub round: RoundSpec,
    /// `training.device` of the plants: auto, cpu or cuda.
    pub device: String,
    /// LibTorch CPU threads per plant process.
    pub plant_threads: u32,
    /// Warmup steps of the first round's training.
    pub warmup_steps: u64,
    /// Seeds the initial model.
    pub seed: u64,
    /// Further `coordinator.toml` settings (knobs only some coordinators have, see
    /// [`crate::coordinator_support`]).
    pub coordinator_extra: Vec<ConfigEntry>,
}

/// A site's files, written.
#[derive(Clone, Debug)]
pub struct Site {
    pub spec: SiteSpec,
    pub pki: PkiLayout,
    /// Where the coordinator listens: 127.0.0.1 and a port that was free.
    pub listen: SocketAddr,
    /// `https://127.0.0.1:<port>`, what plants and admins connect to.
    pub address: String,
}

impl SiteSpec {
    /// DeepPCB's two-channel input (image and template) and its six classes.
    pub fn deeppcb_arch(input_size: u32, width: f64) -> ArchConfig {
        ArchConfig {
            in_channels: 2,
            num_classes: CLASS_NAMES.len() as u32,
            input_size,
            width,
            ..ArchConfig::default()
        }
    }
}

impl Site {
    /// Writes the site into `spec.root`: replaces the folders of an earlier run, keeps (or
    /// creates) the PKI, writes the initial model and the config files.
    pub fn create(spec: SiteSpec) -> Result<Self> {
        let root = &spec.root;
        fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
        for dir in RUN_FOLDERS {
            let path = root.join(dir);
            if path.exists() {
                fs::remove_dir_all(&path).with_context(|| {
                    format!(
                        "cannot remove {} of the previous run; is a coordinator or client of it still running?",
                        path.display()
                    )
                })?;
            }
        }
        let pki = pki_for(&root.join("pki"), &spec.plants)?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let site = Site {
            address: format!("https://{listen}"),
            listen,
            pki,
            spec,
        };
        site.write_initial_model()?;
        write_toml(&site.coordinator_config(), &site.coordinator_toml())?;
        for plant in &site.spec.plants {
            site.write_plant_config(&plant.id, &site.address)?;
        }
        Ok(site)
    }

    pub fn root(&self) -> &Path {
        &self.spec.root
    }

    pub fn plant_ids(&self) -> Vec<String> {
        self.spec.plants.iter().map(|p| p.id.clone()).collect()
    }

    pub fn initial_model(&self) -> PathBuf {
        self.root().join("initial.safetensors")
    }

    pub fn coordinator_config(&self) -> PathBuf {
        self.root().join("coordinator/coordinator.toml")
    }

    /// The coordinator's `data_dir` (sled `db/` and `blobs/`).
    pub fn coordinator_data(&self) -> PathBuf {
        self.root().join("coordinator/data")
    }

    pub fn plant_dir(&self, id: &str) -> PathBuf {
        self.root().join("plants").join(id)
    }

    pub fn plant_config(&self, id: &str) -> PathBuf {
        self.plant_dir(id).join("plant.toml")
    }

    pub fn plant_state(&self, id: &str) -> PathBuf {
        self.plant_dir(id).join("state")
    }

    pub fn logs(&self) -> PathBuf {
        self.root().join("logs")
    }

    pub fn models(&self) -> PathBuf {
        self.root().join("models")
    }

    /// (Re)writes plant `id`'s `plant.toml` with the coordinator at `address` (a test points
    /// one plant at a relay this way).
    pub fn write_plant_config(&self, id: &str, address: &str) -> Result<PathBuf> {
        let plant = self
            .spec
            .plants
            .iter()
            .find(|p| p.id == id)
            .with_context(|| format!("no plant '{id}' in this site"))?;
        let path = self.plant_config(id);
        write_toml(&path, &self.plant_toml(plant, address))?;
        Ok(path)
    }

    /// Writes plant `id`'s config for its data from round `from_round` on (drift):
    /// `plants/<id>/plant-from-round-<r>.toml`, the same plant and state folder reading
    /// `data_root`.
    pub fn write_drift_config(
        &self,
        id: &str,
        from_round: u64,
        data_root: &Path,
    ) -> Result<PathBuf> {
        let mut plant = self
            .spec
            .plants
            .iter()
            .find(|p| p.id == id)
            .with_context(|| format!("no plant '{id}' in this site"))?
            .clone();
        plant.data_root = data_root.to_path_buf();
        let path = self
            .plant_dir(id)
            .join(format!("plant-from-round-{from_round}.toml"));
        write_toml(&path, &self.plant_toml(&plant, &self.address))?;
        Ok(path)
    }

    fn write_initial_model(&self) -> Result<()> {
        // Names are not part of the weights; only their number must match the architecture.
        let classes = self.spec.arch.num_classes as usize;
        let names = if classes == CLASS_NAMES.len() {
            CLASS_NAMES.iter().map(|s| s.to_string()).collect()
        } else {
            (0..classes).map(|i| format!("class-{i}")).collect()
        };
        let model = Detector::seeded(
            self.spec.arch.clone(),
            names,
            tch::Device::Cpu,
            self.spec.seed,
        )
        .context("cannot build the initial detector")?
        .state()?;
        model
            .save_safetensors(&self.initial_model(), &BTreeMap::new())
            .context("cannot write the initial model")?;
        Ok(())
    }

    fn coordinator_toml(&self) -> Table {
        let r = &self.spec.round;
        let files = self.pki.coordinator_files();
        let (codec, q8_block) = match r.codec {
            Codec::F32 => ("f32", None),
            Codec::F16 => ("f16", None),
            Codec::Q8 { block } => ("q8", Some(block)),
        };
        let mut round = table([
            ("min_participants", int(r.min_participants)),
            ("target_participants", int(r.target_participants)),
            ("deadline_secs", int(r.deadline_secs)),
            ("local_epochs", int(r.local_epochs)),
            ("learning_rate", Value::Float(r.learning_rate)),
            ("fedprox_mu", Value::Float(r.fedprox_mu)),
            ("batch_size", int(r.batch_size)),
            ("codec", text(codec)),
            ("max_rounds", int(r.rounds)),
        ]);
        if let Some(block) = q8_block {
            round.insert("q8_block".into(), int(block));
        }
        if r.lr_cycle_rounds > 0 {
            round.insert("lr_cycle_rounds".into(), int(r.lr_cycle_rounds));
        }
        if r.hold {
            round.insert("hold".into(), Value::Boolean(true));
        }
        let mut config = table([
            ("listen", text(&self.listen.to_string())),
            ("data_dir", text("data")),
            ("signing_key", path(&self.pki.coordinator_signing_key())),
            (
                "tls",
                Value::Table(table([
                    ("ca", path(&files.ca_cert)),
                    ("cert", path(&files.cert)),
                    ("key", path(&files.key)),
                ])),
            ),
            ("round", Value::Table(round)),
        ]);
        for e in &self.spec.coordinator_extra {
            if let Value::Table(t) = config
                .entry(e.table)
                .or_insert_with(|| Value::Table(Table::new()))
            {
                t.insert(e.key.to_string(), e.value.clone());
            }
        }
        config
    }

    fn plant_toml(&self, p: &PlantSpec, address: &str) -> Table {
        let files = self.pki.plant_files(&p.id);
        let a = &self.spec.arch;
        table([
            (
                "coordinator",
                Value::Table(table([
                    ("address", text(address)),
                    ("public_key", path(&self.pki.coordinator_verifying_key())),
                ])),
            ),
            (
                "tls",
                Value::Table(table([
                    ("ca", path(&files.ca_cert)),
                    ("cert", path(&files.cert)),
                    ("key", path(&files.key)),
                ])),
            ),
            ("state", Value::Table(table([("dir", text("state"))]))),
            ("data", Value::Table(data_toml(p))),
            (
                "model",
                Value::Table(table([
                    ("input_size", int(a.input_size)),
                    ("width", Value::Float(a.width)),
                    ("depth", Value::Float(a.depth)),
                    ("attention", Value::Boolean(a.attention)),
                    ("fpn_width", int(a.fpn_width)),
                    ("head_width", int(a.head_width)),
                ])),
            ),
            (
                "training",
                Value::Table(table([
                    ("device", text(&self.spec.device)),
                    ("threads", int(self.spec.plant_threads)),
                    ("crop_size", int(self.spec.crop_size)),
                    ("warmup_steps", int(self.spec.warmup_steps)),
                    ("seed", int(p.seed)),
                ])),
            ),
            (
                "agent",
                // Quick reconnection: the coordinator is on this machine.
                Value::Table(table([
                    ("backoff_initial_ms", int(200u32)),
                    ("backoff_max_secs", int(2u32)),
                ])),
            ),
        ])
    }
}

/// A plant's `[data]`: its DeepPCB-layout folder and groups, or its COCO folder's
/// `train.json` with the source's image root (`coco_images`).
fn data_toml(p: &PlantSpec) -> Table {
    let validation = ("validation_fraction", Value::Float(p.validation_fraction));
    if coco_layout::is_coco_folder(&p.data_root) {
        return table([
            ("coco", path(&p.data_root.join(coco_layout::TRAIN_JSON))),
            ("coco_images", path(&coco_layout::image_root(&p.data_root))),
            ("channels", text(coco_layout::CHANNELS_NAME)),
            validation,
        ]);
    }
    let groups = p.groups.iter().map(|g| text(g)).collect();
    table([
        ("deeppcb", path(&p.data_root)),
        ("groups", Value::Array(groups)),
        validation,
    ])
}

/// The PKI in `dir`: reused when it exists (enrolling plants it lacks), else created.
fn pki_for(dir: &Path, plants: &[PlantSpec]) -> Result<PkiLayout> {
    let layout = PkiLayout::new(dir);
    if !layout.ca_cert().exists() {
        let opts = InitOptions {
            plants: plants.iter().map(|p| p.id.clone()).collect(),
            ..InitOptions::default()
        };
        return pki::init(dir, &opts)
            .with_context(|| format!("cannot create a development PKI in {}", dir.display()));
    }
    for p in plants {
        if !layout.plant_cert(&p.id).exists() {
            pki::enrol_plant(dir, &p.id)
                .with_context(|| format!("cannot enrol plant {} in {}", p.id, dir.display()))?;
        }
    }
    Ok(layout)
}

/// A port on 127.0.0.1 that is free now (the coordinator binds it a moment later).
fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn write_toml(path: &Path, table: &Table) -> Result<()> {
    let body = toml::to_string(table).context("cannot render a config file")?;
    let text = format!(
        "# Written by `simulate` for a federation on this machine; every setting is explained in\n\
         # coordinator/coordinator.example.toml and client/plant.example.toml.\n\n{body}"
    );
    fsutil::write_bytes_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Table {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn text(s: &str) -> Value {
    Value::String(s.to_string())
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

fn int(n: impl Into<u64>) -> Value {
    Value::Integer(i64::try_from(n.into()).unwrap_or(i64::MAX))
}
