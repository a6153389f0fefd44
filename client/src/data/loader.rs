//! The prefetching batch loader: a background thread turns items into [`Batch`]es and keeps
//! up to `prefetch` of them ready in a bounded channel, so the model never waits on JPEG
//! decoding. Training epochs are shuffled and augmented from `(seed, epoch)`; evaluation
//! batches are whole letterboxed images in dataset order.
//!
//! Images are decoded once, on first use, and kept in memory as letterboxed u8 planes (DeepPCB
//! train at 640x640 with templates is about 820 MB); [`LoaderOptions::cache`] = false decodes
//! on every use instead. An item that fails to decode is logged once, listed in
//! [`Loader::skipped`], and replaced by the next item: an epoch never panics on a bad file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use fedinspect_common::detection::{Annotation, Letterbox};
use rand::seq::SliceRandom;

use super::augment::{self, Augment, AugmentError, Preprocess};
use super::planes::{self, Planes};
use super::{Batch, Dataset};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Batches kept ready ahead of the consumer.
    pub prefetch: usize,
    /// Seeds the shuffle and every augmentation draw.
    pub seed: u64,
    /// Keep decoded images in memory after first use.
    pub cache: bool,
}

/// An item that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Augment(#[from] AugmentError),
    #[error("batch size and prefetch depth must be at least 1")]
    Zero,
    #[error("the dataset has no items; check the data path and the validation report")]
    Empty,
}

/// A dataset ready to be served as batches. Cheap to clone; clones share the image cache.
#[derive(Clone)]
pub struct Loader {
    shared: Arc<Shared>,
}

/// Batches produced by a background thread; dropping it stops the thread.
pub struct Batches {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
}

type Prepared = Result<Arc<(Planes, Letterbox)>, String>;

struct Shared {
    dataset: Dataset,
    pre: Preprocess,
    augment: Augment,
    options: LoaderOptions,
    cache: Vec<OnceLock<Prepared>>,
    failed: Vec<AtomicBool>,
    skipped: Mutex<Vec<Skipped>>,
}

#[derive(Clone, Copy)]
enum Mode {
    Train { seed: u64, epoch: u64 },
    Eval,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            batch_size: 8,
            prefetch: 4,
            seed: 0,
            cache: true,
        }
    }
}

impl Loader {
    pub fn new(
        dataset: Dataset,
        pre: Preprocess,
        augment: Augment,
        options: LoaderOptions,
    ) -> Result<Self, LoaderError> {
        augment.check(&pre)?;
        if options.batch_size == 0 || options.prefetch == 0 {
            return Err(LoaderError::Zero);
        }
        if dataset.is_empty() {
            return Err(LoaderError::Empty);
        }
        let n = dataset.len();
        Ok(Self {
            shared: Arc::new(Shared {
                dataset,
                pre,
                augment,
                options,
                cache: (0..n).map(|_| OnceLock::new()).collect(),
                failed: (0..n).map(|_| AtomicBool::new(false)).collect(),
                skipped: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.shared.dataset
    }

    pub fn preprocess(&self) -> &Preprocess {
        &self.shared.pre
    }

    /// Full training batches per epoch (the last partial batch is dropped).
    pub fn batches_per_epoch(&self) -> usize {
        self.shared.dataset.len() / self.shared.options.batch_size
    }

    /// One training epoch: items shuffled from `(seed, epoch)`, each randomly cropped,
    /// flipped, rotated and jittered; only full batches. The same seed and epoch give
    /// bit-identical batches.
    pub fn train_epoch(&self, epoch: u64) -> Batches {
        self.train_epoch_with_seed(self.shared.options.seed, epoch)
    }

    /// [`Loader::train_epoch`] with a seed chosen by the caller instead of
    /// [`LoaderOptions::seed`] (for a trainer that owns the seed).
    pub fn train_epoch_with_seed(&self, seed: u64, epoch: u64) -> Batches {
        self.spawn(Mode::Train { seed, epoch })
    }

    /// Whole images, letterboxed, no augmentation, in dataset order; the last batch may be
    /// short. Skipped items are absent, so match results by `Batch::ids`.
    pub fn eval_batches(&self) -> Batches {
        self.spawn(Mode::Eval)
    }

    /// Items that failed to decode so far, each listed once.
    pub fn skipped(&self) -> Vec<Skipped> {
        self.shared
            .skipped
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn spawn(&self, mode: Mode) -> Batches {
        let (tx, rx) = mpsc::sync_channel(self.shared.options.prefetch);
        let shared = Arc::clone(&self.shared);
        let span = match mode {
            Mode::Train { seed, epoch } => {
                tracing::info_span!("data_loader", mode = "train", seed, epoch)
            }
            Mode::Eval => tracing::info_span!("data_loader", mode = "eval"),
        };
        let handle = std::thread::Builder::new()
            .name("data-loader".into())
            .spawn(move || span.in_scope(|| shared.produce(mode, &tx)))
            .ok();
        if handle.is_none() {
            tracing::error!("could not start the data loader thread; no batches will be produced");
        }
        Batches {
            rx: Some(rx),
            handle,
        }
    }
}

impl Shared {
    fn produce(&self, mode: Mode, tx: &SyncSender<Batch>) {
        let n = self.dataset.len();
        let bs = self.options.batch_size;
        let mut order: Vec<usize> = (0..n).collect();
        if let Mode::Train { seed, epoch } = mode {
            order.shuffle(&mut augment::sample_rng(seed, epoch, u64::MAX));
        }
        let mut builder = BatchBuilder::new(bs, self.channels(), self.side(mode));
        for (position, &index) in order.iter().enumerate() {
            let Some(prepared) = self.prepared(index) else {
                continue;
            };
            let (planes, lb) = &*prepared;
            let item = &self.dataset.items[index];
            let anns: Vec<Annotation> = item
                .annotations
                .iter()
                .map(|a| Annotation {
                    bbox: lb.to_input(&a.bbox),
                    class: a.class,
                })
                .collect();
            match mode {
                Mode::Eval => builder.push(planes, None, anns, *lb, &item.id),
                Mode::Train { seed, epoch } => {
                    let mut rng = augment::sample_rng(seed, epoch, position as u64);
                    let draw = self.augment.draw(planes.width, &mut rng);
                    let crop = self.augment.crop_size as usize;
                    let (p, a) = augment::apply_geometry(planes, &anns, crop, &draw);
                    let lb = augment::crop_letterbox(lb, &draw);
                    builder.push(&p, Some((&draw, &mut rng)), a, lb, &item.id);
                }
            }
            if builder.is_full() && tx.send(builder.take()).is_err() {
                return; // the consumer hung up
            }
        }
        if matches!(mode, Mode::Eval) && !builder.is_empty() {
            let _ = tx.send(builder.take());
        }
    }

    fn channels(&self) -> usize {
        self.pre.channels.count()
    }

    fn side(&self, mode: Mode) -> usize {
        match mode {
            Mode::Train { .. } => self.augment.crop_size as usize,
            Mode::Eval => self.pre.input_size as usize,
        }
    }

    /// The letterboxed image, from the cache or decoded now; `None` (logged once) if it fails.
    fn prepared(&self, index: usize) -> Option<Arc<(Planes, Letterbox)>> {
        let load = || {
            planes::prepare_item(&self.dataset.items[index], &self.pre)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        };
        let result = if self.options.cache {
            self.cache[index].get_or_init(load).clone()
        } else {
            load()
        };
        match result {
            Ok(p) => Some(p),
            Err(reason) => {
                if !self.failed[index].swap(true, Ordering::Relaxed) {
                    let id = self.dataset.items[index].id.clone();
                    tracing::warn!(item = %id, %reason, "skipping an image that cannot be decoded");
                    if let Ok(mut skipped) = self.skipped.lock() {
                        skipped.push(Skipped { id, reason });
                    }
                }
                None
            }
        }
    }
}

/// Accumulates samples into one batch buffer.
struct BatchBuilder {
    capacity: usize,
    channels: usize,
    side: usize,
    batch: Batch,
}

impl BatchBuilder {
    fn new(capacity: usize, channels: usize, side: usize) -> Self {
        Self {
            capacity,
            channels,
            side,
            batch: Self::empty(capacity, channels, side),
        }
    }

    fn empty(capacity: usize, channels: usize, side: usize) -> Batch {
        Batch {
            images: Vec::with_capacity(capacity * channels * side * side),
            batch: 0,
            channels,
            height: side,
            width: side,
            annotations: Vec::with_capacity(capacity),
            letterboxes: Vec::with_capacity(capacity),
            ids: Vec::with_capacity(capacity),
        }
    }

    fn push(
        &mut self,
        planes: &Planes,
        jitter: Option<(&augment::Draw, &mut rand_chacha::ChaCha8Rng)>,
        annotations: Vec<Annotation>,
        letterbox: Letterbox,
        id: &str,
    ) {
        let b = &mut self.batch;
        let start = b.images.len();
        b.images.resize(start + planes.data.len(), 0.0);
        augment::normalise_into(planes, jitter, &mut b.images[start..]);
        b.batch += 1;
        b.annotations.push(annotations);
        b.letterboxes.push(letterbox);
        b.ids.push(id.to_string());
    }

    fn is_full(&self) -> bool {
        self.batch.batch == self.capacity
    }

    fn is_empty(&self) -> bool {
        self.batch.batch == 0
    }

    fn take(&mut self) -> Batch {
        std::mem::replace(
            &mut self.batch,
            Self::empty(self.capacity, self.channels, self.side),
        )
    }
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Hanging up first unblocks a producer waiting on a full channel.
        drop(self.rx.take());
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("the data loader thread panicked");
            }
        }
    }
}
