//! Preprocessing and training augmentation, deterministic from a seed: the preprocessing that
//! travels with a model (input size, channels, CLAHE), the random crop / flip / rotation that
//! moves boxes with the pixels, and the brightness / contrast / noise jitter applied while
//! normalising u8 pixels to f32 in `[0, 1]`.
//!
//! Geometric transforms act on every channel alike, so a template stays aligned with its
//! image. The photometric jitter draws one brightness and contrast per sample, shared by all
//! channels (the test image and template keep their relative contrast); noise is drawn per
//! pixel and channel.

use fedinspect_common::detection::{Annotation, Letterbox};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::clahe::Clahe;
use super::geometry::{crop, flip_horizontal, flip_vertical, rotate_clockwise};
use super::planes::Planes;

/// What the network sees per pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channels {
    /// One grey channel.
    Gray,
    /// Grey test image, then its grey defect-free template (DeepPCB, reference inspection).
    GrayTemplate,
    /// Red, green, blue.
    Rgb,
}

/// The deterministic preprocessing a model was trained with; save it with the weights and use
/// it unchanged for evaluation and inference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Side of the square network input after letterboxing; a multiple of 32.
    pub input_size: u32,
    pub channels: Channels,
    /// Contrast-limited adaptive histogram equalisation, applied to each channel before the
    /// letterbox (for RGB this equalises channels separately and can shift colours).
    pub clahe: Option<Clahe>,
}

/// Training-time randomness. [`Augment::default`] is the DeepPCB baseline's augmentation:
/// 320 crops, horizontal and vertical flips, nothing else.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Side of the square training crop; a multiple of 32, at most the input size. Crop
    /// offsets are multiples of 4 (the detector's finest stride), as in the baseline.
    pub crop_size: u32,
    pub hflip: bool,
    pub vflip: bool,
    /// Rotations by 0, 90, 180 or 270 degrees, equally likely.
    pub rot90: bool,
    /// Largest brightness shift, as a fraction of full scale (0.1 = up to 25 grey levels).
    pub brightness: f32,
    /// Largest contrast change: the factor is drawn from `[1 - contrast, 1 + contrast]` and
    /// applied around each channel's mean.
    pub contrast: f32,
    /// Largest Gaussian noise sigma, as a fraction of full scale; each sample draws its sigma
    /// uniformly from `[0, noise_std]`.
    pub noise_std: f32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AugmentError {
    #[error("input size {0} is not a positive multiple of 32; use e.g. 320, 640 or 1024")]
    InputSize(u32),
    #[error("crop size {crop} must be a positive multiple of 32 no larger than the input size {input}; use e.g. 320 for 640 inputs")]
    CropSize { crop: u32, input: u32 },
    #[error(
        "jitter amounts must be finite and in [0, 1]; check brightness, contrast and noise_std"
    )]
    Jitter,
}

/// The random choices for one training sample, drawn up front in a fixed order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    pub x0: usize,
    pub y0: usize,
    pub hflip: bool,
    pub vflip: bool,
    /// Quarter turns clockwise, 0..=3.
    pub quarter_turns: u8,
    /// Added to every normalised pixel.
    pub brightness: f32,
    pub contrast: f32,
    /// Noise sigma in normalised units.
    pub noise_std: f32,
}

impl Channels {
    pub fn count(self) -> usize {
        match self {
            Channels::Gray => 1,
            Channels::GrayTemplate => 2,
            Channels::Rgb => 3,
        }
    }

    /// 1 = grey, 2 = grey + template, 3 = RGB.
    pub fn from_count(n: usize) -> Option<Self> {
        match n {
            1 => Some(Channels::Gray),
            2 => Some(Channels::GrayTemplate),
            3 => Some(Channels::Rgb),
            _ => None,
        }
    }
}

impl Preprocess {
    /// DeepPCB as the baseline reads it: 640x640, test image + template, no CLAHE.
    pub fn deeppcb() -> Self {
        Self {
            input_size: 640,
            channels: Channels::GrayTemplate,
            clahe: None,
        }
    }

    pub fn check(&self) -> Result<(), AugmentError> {
        if self.input_size == 0 || self.input_size % 32 != 0 {
            return Err(AugmentError::InputSize(self.input_size));
        }
        Ok(())
    }
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            crop_size: 320,
            hflip: true,
            vflip: true,
            rot90: false,
            brightness: 0.0,
            contrast: 0.0,
            noise_std: 0.0,
        }
    }
}

impl Augment {
    /// No randomness: training samples are the whole `input_size` image, as in evaluation
    /// (also what an evaluation-only [`Loader`](super::loader::Loader) can be given).
    pub fn none(input_size: u32) -> Self {
        Self {
            crop_size: input_size,
            hflip: false,
            vflip: false,
            rot90: false,
            brightness: 0.0,
            contrast: 0.0,
            noise_std: 0.0,
        }
    }

    /// Checks the crop and jitter settings against `pre`.
    pub fn check(&self, pre: &Preprocess) -> Result<(), AugmentError> {
        pre.check()?;
        let crop = self.crop_size;
        if crop == 0 || crop % 32 != 0 || crop > pre.input_size {
            return Err(AugmentError::CropSize {
                crop,
                input: pre.input_size,
            });
        }
        let ok = |v: f32| v.is_finite() && (0.0..=1.0).contains(&v);
        if !(ok(self.brightness) && ok(self.contrast) && ok(self.noise_std)) {
            return Err(AugmentError::Jitter);
        }
        Ok(())
    }

    /// Draws the choices for one sample from an image of side `size`.
    pub fn draw(&self, size: usize, rng: &mut ChaCha8Rng) -> Draw {
        let steps = (size.saturating_sub(self.crop_size as usize)) / 4;
        let y0 = 4 * rng.gen_range(0..=steps);
        let x0 = 4 * rng.gen_range(0..=steps);
        let hflip = self.hflip && rng.gen_bool(0.5);
        let vflip = self.vflip && rng.gen_bool(0.5);
        let quarter_turns = if self.rot90 { rng.gen_range(0..4u8) } else { 0 };
        let mut symmetric = |amount: f32| {
            if amount > 0.0 {
                rng.gen_range(-amount..=amount)
            } else {
                0.0
            }
        };
        let brightness = symmetric(self.brightness);
        let contrast = 1.0 + symmetric(self.contrast);
        let noise_std = if self.noise_std > 0.0 {
            rng.gen_range(0.0..=self.noise_std)
        } else {
            0.0
        };
        Draw {
            x0,
            y0,
            hflip,
            vflip,
            quarter_turns,
            brightness,
            contrast,
            noise_std,
        }
    }
}

/// The generator for sample `position` of `epoch`: independent of thread timing and of the
/// other samples, so a batch is reproducible from `(seed, epoch, position)` alone.
pub fn sample_rng(seed: u64, epoch: u64, position: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&position.to_le_bytes());
    key[24..].copy_from_slice(b"fi-augmt");
    ChaCha8Rng::from_seed(key)
}

/// Applies the geometric part of `draw` to a letterboxed image and its input-coordinate
/// boxes: crop (keeping boxes whose centre is inside, clipped), flips, then rotation.
pub fn apply_geometry(
    planes: &Planes,
    annotations: &[Annotation],
    crop_size: usize,
    draw: &Draw,
) -> (Planes, Vec<Annotation>) {
    let (mut p, mut anns) = crop(planes, annotations, draw.x0, draw.y0, crop_size);
    if draw.hflip {
        flip_horizontal(&mut p, &mut anns);
    }
    if draw.vflip {
        flip_vertical(&mut p, &mut anns);
    }
    for _ in 0..draw.quarter_turns {
        (p, anns) = rotate_clockwise(&p, &anns);
    }
    (p, anns)
}

/// Writes `planes` as `pixel / 255` into `out` (same layout), applying the photometric part
/// of `draw` (contrast around each channel's mean, brightness, Gaussian noise) and clamping
/// to `[0, 1]`. With no jitter this is exactly `pixel / 255`.
pub fn normalise_into(planes: &Planes, draw: Option<(&Draw, &mut ChaCha8Rng)>, out: &mut [f32]) {
    assert_eq!(out.len(), planes.data.len(), "output matches the image");
    let Some((draw, rng)) = draw.filter(|(d, _)| has_jitter(d)) else {
        for (o, &v) in out.iter_mut().zip(&planes.data) {
            *o = f32::from(v) / 255.0;
        }
        return;
    };
    let n = planes.width * planes.height;
    for c in 0..planes.channels {
        let src = planes.plane(c);
        let mean =
            src.iter().map(|&v| u64::from(v)).sum::<u64>() as f32 / (n.max(1) as f32 * 255.0);
        let offset = mean * (1.0 - draw.contrast) + draw.brightness;
        let dst = &mut out[c * n..(c + 1) * n];
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = f32::from(v) / 255.0 * draw.contrast + offset;
        }
        if draw.noise_std > 0.0 {
            add_noise(dst, draw.noise_std, rng);
        }
        dst.iter_mut().for_each(|o| *o = o.clamp(0.0, 1.0));
    }
}

fn has_jitter(d: &Draw) -> bool {
    d.brightness != 0.0 || d.contrast != 1.0 || d.noise_std > 0.0
}

/// Box-Muller, two normal values per pair of uniforms.
fn add_noise(values: &mut [f32], sigma: f32, rng: &mut ChaCha8Rng) {
    for pair in values.chunks_mut(2) {
        let u1: f32 = rng.gen_range(f32::MIN_POSITIVE..1.0);
        let u2: f32 = rng.gen();
        let r = sigma * (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        pair[0] += r * c;
        if let Some(v) = pair.get_mut(1) {
            *v += r * s;
        }
    }
}

/// The letterbox recorded in a training [`Batch`]: the image's letterbox with the crop offset
/// as a negative pad (exact for unflipped, unrotated samples only).
///
/// [`Batch`]: super::Batch
pub fn crop_letterbox(lb: &Letterbox, draw: &Draw) -> Letterbox {
    Letterbox {
        pad_x: lb.pad_x - draw.x0 as f32,
        pad_y: lb.pad_y - draw.y0 as f32,
        ..*lb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_rejects_bad_sizes() {
        let pre = Preprocess::deeppcb();
        assert!(Augment::default().check(&pre).is_ok());
        let bad = Augment {
            crop_size: 300,
            ..Augment::default()
        };
        assert!(matches!(
            bad.check(&pre),
            Err(AugmentError::CropSize { .. })
        ));
        let pre_bad = Preprocess {
            input_size: 600,
            ..pre
        };
        assert_eq!(pre_bad.check(), Err(AugmentError::InputSize(600)));
    }

    #[test]
    fn plain_normalisation_is_divide_by_255() {
        let p = Planes {
            width: 2,
            height: 1,
            channels: 1,
            data: vec![0, 255],
        };
        let mut out = vec![9.0; 2];
        normalise_into(&p, None, &mut out);
        assert_eq!(out, vec![0.0, 1.0]);
    }
}
