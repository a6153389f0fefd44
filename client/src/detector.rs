//! The detector: the tch network built from its [`ArchConfig`] (see
//! `fedinspect_common::arch` for the graph and the parameter names), with CenterNet targets
//! ([`targets`]), losses ([`loss`]), decoding to detections ([`decode`]), checkpoints
//! ([`checkpoint`]) and the training loop ([`train`]).
//!
//! A [`Detector`] owns its VarStore; its [`ModelState`] (every variable, BatchNorm running
//! statistics included) is what the federation averages.

pub mod checkpoint;
pub mod decode;
pub mod loss;
pub mod module;
pub mod synthetic;
pub mod targets;
pub mod train;

use crate::varstore::{load_state_into_var_store, state_from_var_store, TorchError};
use fedinspect_common::arch::{ArchConfig, ArchError, MAX_STRIDE};
use fedinspect_common::detection::Detection;
use fedinspect_common::{ModelError, ModelState};
use tch::{nn, Device, Kind, TchError, Tensor};

use crate::data::Batch;

pub use checkpoint::CheckpointInfo;
pub use decode::DecodeParams;
pub use module::{GraphModule, Precision};
pub use train::{
    train, AdamWState, BatchSource, CheckpointPolicy, FedProx, FinalWrite, FixedBatches, LossScale,
    Plan, Progress, Resume, Stop, StopReason, TrainConfig, TrainError, TrainReport,
    TrainingPosition, TrainingState,
};

/// CUDA when LibTorch sees a GPU, the CPU otherwise.
pub fn auto_device() -> Device {
    Device::cuda_if_available()
}

/// Everything that can go wrong building, running or loading a detector.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error("the model has {names} class names but its architecture has {arch} classes; pass one name per class")]
    ClassCount { names: usize, arch: u32 },
    #[error("batch does not fit the network: {0}")]
    Batch(String),
    #[error("annotation of class {class} in image {image} of the batch, but the model has {classes} classes; check the dataset's class list")]
    AnnotationClass {
        image: usize,
        class: u32,
        classes: u32,
    },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Torch(#[from] TorchError),
    #[error("libtorch: {0}")]
    Tch(#[from] TchError),
}

/// Raw head outputs: class logits `[N, classes, H/4, W/4]` and box regression
/// `[N, 4, H/4, W/4]` (width, height in output cells; centre offset inside the cell).
pub struct HeadOutput {
    pub heatmap: Tensor,
    pub boxes: Tensor,
}

/// A network, its variables and what it detects. `Send`, so training can own it on its own
/// thread.
pub struct Detector {
    arch: ArchConfig,
    class_names: Vec<String>,
    vs: nn::VarStore,
    module: GraphModule,
    /// The module with BatchNorm folded into convolutions, once
    /// [`Detector::fold_batchnorm_for_inference`] was called; inference then uses it.
    inference: Option<GraphModule>,
}

impl Detector {
    /// A freshly initialised detector on `device`; call `tch::manual_seed` first for
    /// reproducible weights.
    pub fn new(
        arch: ArchConfig,
        class_names: Vec<String>,
        device: Device,
    ) -> Result<Self, DetectorError> {
        let graph = arch.graph()?;
        if class_names.len() != arch.num_classes as usize {
            return Err(DetectorError::ClassCount {
                names: class_names.len(),
                arch: arch.num_classes,
            });
        }
        let vs = nn::VarStore::new(device);
        let module = GraphModule::new(&vs.root(), &graph)?;
        Ok(Self {
            arch,
            class_names,
            vs,
            module,
            inference: None,
        })
    }

    /// [`Detector::new`] with LibTorch's generator seeded first, so the initial weights are a
    /// function of `seed` (on the CPU; CUDA kernels may add nondeterminism later).
    pub fn seeded(
        arch: ArchConfig,
        class_names: Vec<String>,
        device: Device,
        seed: u64,
    ) -> Result<Self, DetectorError> {
        tch::manual_seed(seed as i64);
        Self::new(arch, class_names, device)
    }

    /// A detector holding `state`'s weights (e.g. a global model from the coordinator).
    pub fn from_state(
        arch: ArchConfig,
        class_names: Vec<String>,
        state: &ModelState,
        device: Device,
    ) -> Result<Self, DetectorError> {
        let mut det = Self::new(arch, class_names, device)?;
        det.load_state(state)?;
        Ok(det)
    }

    pub fn arch(&self) -> &ArchConfig {
        &self.arch
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The variables, for optimisers.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The variables training updates (BatchNorm running statistics excluded), with their
    /// names, in name order.
    pub fn trainable_variables(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Every variable, BatchNorm running statistics included.
    pub fn state(&self) -> Result<ModelState, DetectorError> {
        Ok(state_from_var_store(&self.vs)?)
    }

    /// Overwrites every variable; names and shapes must match this architecture exactly.
    pub fn load_state(&mut self, state: &ModelState) -> Result<(), DetectorError> {
        load_state_into_var_store(state, &mut self.vs)?;
        if self.inference.is_some() {
            self.inference = Some(self.module.folded()?);
        }
        Ok(())
    }

    /// Makes this an inference-only detector: BatchNorm folded into the convolutions before
    /// it (one memory pass less per convolution; outputs equal within float rounding). Loading
    /// weights refolds; training is refused from then on, since it would not reach the folded
    /// copies. For `eval`, `detect`, benchmarks and installed bundles.
    pub fn fold_batchnorm_for_inference(&mut self) -> Result<(), DetectorError> {
        self.inference = Some(self.module.folded()?);
        Ok(())
    }

    /// Runs the network on `images` (`[N, in_channels, H, W]` on this detector's device,
    /// sides multiples of 32). `train` puts BatchNorm in training mode.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<HeadOutput, DetectorError> {
        self.forward_in(images, train, Precision::Float32)
    }

    /// [`Detector::forward`] in `precision` (float16 on CUDA for mixed precision; see
    /// [`module`]); the outputs are float32 either way.
    pub fn forward_in(
        &self,
        images: &Tensor,
        train: bool,
        precision: Precision,
    ) -> Result<HeadOutput, DetectorError> {
        let module = match (&self.inference, train) {
            (None, _) => &self.module,
            (Some(folded), false) => folded,
            (Some(_), true) => {
                return Err(DetectorError::Batch(
                    "this detector was folded for inference and cannot train; load the model \
                     into a new detector to train it"
                        .into(),
                ))
            }
        };
        let mut outs = module.forward_in(images, train, precision)?.into_iter();
        match (outs.next(), outs.next()) {
            (Some(heatmap), Some(boxes)) => Ok(HeadOutput { heatmap, boxes }),
            _ => Err(DetectorError::Batch(
                "the graph has fewer than two outputs".into(),
            )),
        }
    }

    /// The batch's images as a `[N, C, H, W]` tensor on this detector's device, after checking
    /// that they fit the network.
    pub fn images_tensor(&self, batch: &Batch) -> Result<Tensor, DetectorError> {
        let dims = [batch.batch, batch.channels, batch.height, batch.width];
        let expected = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(batch.images.len()) {
            return Err(DetectorError::Batch(format!(
                "{} values for shape {dims:?}",
                batch.images.len()
            )));
        }
        if batch.channels != self.arch.in_channels as usize {
            return Err(DetectorError::Batch(format!(
                "{} channels, the model takes {}",
                batch.channels, self.arch.in_channels
            )));
        }
        let stride = MAX_STRIDE as usize;
        if batch.batch == 0
            || batch.height == 0
            || batch.width == 0
            || batch.height % stride != 0
            || batch.width % stride != 0
        {
            return Err(DetectorError::Batch(format!(
                "{}x{} images in a batch of {}; sides must be non-zero multiples of {stride}",
                batch.height, batch.width, batch.batch
            )));
        }
        if batch.letterboxes.len() != batch.batch || batch.annotations.len() != batch.batch {
            return Err(DetectorError::Batch(format!(
                "{} images but {} letterboxes and {} annotation lists",
                batch.batch,
                batch.letterboxes.len(),
                batch.annotations.len()
            )));
        }
        let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        if self.device() == Device::Cpu {
            // The tensor must own its values (training keeps it past this batch): one copy.
            return Ok(Tensor::f_from_slice(&batch.images)?.f_view(shape.as_slice())?);
        }
        // On CUDA the host values are only a source for the device copy: wrap them without a
        // host copy (the GPU check measured that extra copy as batch-8 inference 2x slower
        // than PyTorch's) and copy once to the device.
        let strides = contiguous_strides(&shape);
        // SAFETY: `batch.images` holds exactly `shape`'s product of f32 values (checked above),
        // it outlives `host`, and `host` is dropped at the end of this function, after
        // `f_to_device` returned a tensor with its own (device) storage; a pageable host to
        // device copy is synchronous, so nothing reads the slice later.
        let host = unsafe {
            Tensor::f_from_blob(
                batch.images.as_ptr().cast::<u8>(),
                &shape,
                &strides,
                Kind::Float,
                Device::Cpu,
            )?
        };
        Ok(host.f_to_device(self.device())?)
    }

    /// Detections per image of `batch`, in original image coordinates (through each image's
    /// letterbox), best first.
    pub fn detect(
        &self,
        batch: &Batch,
        params: &DecodeParams,
    ) -> Result<Vec<Vec<Detection>>, DetectorError> {
        let _guard = tch::no_grad_guard();
        let images = self.images_tensor(batch)?;
        let precision = if self.device().is_cuda() {
            Precision::Float16
        } else {
            Precision::Float32
        };
        let out = self.forward_in(&images, false, precision)?;
        decode::decode(
            &out.heatmap.f_to_kind(Kind::Float)?,
            &out.boxes.f_to_kind(Kind::Float)?,
            &batch.letterboxes,
            params,
        )
    }
}

/// Row-major strides (in elements) of a contiguous tensor of `shape`.
fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

// Training runs on its own thread: the detector must move there.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Detector>();
};
