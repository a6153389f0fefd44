//! Contrast-limited adaptive histogram equalisation on one u8 plane: per-tile histograms
//! clipped at a limit with the excess spread evenly, equalised per tile, and bilinearly
//! blended between tile centres so no tile seams show. Useful when plants light boards
//! unevenly; off by default because DeepPCB images are already binarised-looking.

use serde::{Deserialize, Serialize};

/// CLAHE settings (OpenCV's meaning).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Clahe {
    /// Tiles per side (8 = an 8x8 grid); reduced for images smaller than the grid.
    pub tiles: u32,
    /// Histogram bins are clipped at `clip_limit` times the mean bin count (OpenCV's 2.0 is a
    /// good start; 1.0 or less does almost nothing).
    pub clip_limit: f32,
}

impl Default for Clahe {
    fn default() -> Self {
        Self {
            tiles: 8,
            clip_limit: 2.0,
        }
    }
}

/// Equalises `plane` (`width x height`, row-major) in place.
pub fn apply(plane: &mut [u8], width: usize, height: usize, cfg: &Clahe) {
    if width == 0 || height == 0 {
        return;
    }
    let tx = (cfg.tiles.max(1) as usize).min(width);
    let ty = (cfg.tiles.max(1) as usize).min(height);
    let bounds = |i: usize, n: usize, len: usize| (i * len / n, (i + 1) * len / n);
    let mut luts = vec![[0u8; 256]; tx * ty];
    for j in 0..ty {
        for i in 0..tx {
            let (x0, x1) = bounds(i, tx, width);
            let (y0, y1) = bounds(j, ty, height);
            let mut hist = [0u32; 256];
            for y in y0..y1 {
                for &v in &plane[y * width + x0..y * width + x1] {
                    hist[v as usize] += 1;
                }
            }
            let pixels = ((x1 - x0) * (y1 - y0)) as u32;
            luts[j * tx + i] = tile_lut(&mut hist, pixels, cfg.clip_limit);
        }
    }
    // Tile i's centre sits at (i + 0.5) * width / tx; a pixel blends the two nearest centres
    // per axis, clamped at the borders.
    let axis = |p: usize, n: usize, len: usize| {
        let f = (p as f32 + 0.5) * n as f32 / len as f32 - 0.5;
        let i0 = (f.floor().max(0.0) as usize).min(n - 1);
        let i1 = (i0 + 1).min(n - 1);
        let a = (f - i0 as f32).clamp(0.0, 1.0);
        (i0, i1, a)
    };
    let xs: Vec<_> = (0..width).map(|x| axis(x, tx, width)).collect();
    for y in 0..height {
        let (j0, j1, b) = axis(y, ty, height);
        for (x, &(i0, i1, a)) in xs.iter().enumerate() {
            let v = plane[y * width + x] as usize;
            let top =
                f32::from(luts[j0 * tx + i0][v]) * (1.0 - a) + f32::from(luts[j0 * tx + i1][v]) * a;
            let bot =
                f32::from(luts[j1 * tx + i0][v]) * (1.0 - a) + f32::from(luts[j1 * tx + i1][v]) * a;
            plane[y * width + x] = (top * (1.0 - b) + bot * b).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// Clips `hist`, spreads the excess over all bins, and returns the equalising lookup table.
fn tile_lut(hist: &mut [u32; 256], pixels: u32, clip_limit: f32) -> [u8; 256] {
    let limit = ((clip_limit.max(0.0) * pixels as f32 / 256.0) as u32).max(1);
    let mut excess = 0u32;
    for h in hist.iter_mut() {
        if *h > limit {
            excess += *h - limit;
            *h = limit;
        }
    }
    let (each, rest) = (excess / 256, (excess % 256) as usize);
    // The remainder goes to evenly spaced bins so no grey level is favoured (as OpenCV does).
    let step = 256usize.checked_div(rest).unwrap_or(0);
    for (k, h) in hist.iter_mut().enumerate() {
        let extra = step > 0 && k % step == 0 && k / step < rest;
        *h += each + u32::from(extra);
    }
    let total: u32 = hist.iter().sum();
    let mut lut = [0u8; 256];
    let mut cdf = 0u32;
    for (v, h) in hist.iter().enumerate() {
        cdf += h;
        lut[v] = (u64::from(cdf) * 255 / u64::from(total.max(1))) as u8;
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> Vec<u8> {
        // Grey levels 100..=131 across each row: a low-contrast image.
        (0..w * h).map(|i| 100 + (i % w) as u8).collect()
    }

    #[test]
    fn stretches_a_low_contrast_image() {
        let mut plane = ramp(32, 32);
        apply(
            &mut plane,
            32,
            32,
            &Clahe {
                tiles: 2,
                clip_limit: 40.0,
            },
        );
        let (lo, hi) = (plane.iter().min().unwrap(), plane.iter().max().unwrap());
        assert!(*hi - *lo > 150, "range {lo}..{hi} should widen");
        // With one tile it is plain histogram equalisation, which keeps the order of levels.
        let mut global = ramp(32, 32);
        apply(
            &mut global,
            32,
            32,
            &Clahe {
                tiles: 1,
                clip_limit: 40.0,
            },
        );
        assert!(global[..32].windows(2).all(|p| p[0] <= p[1]));
        assert_eq!(global[31], 255);
    }

    #[test]
    fn clip_limit_caps_the_stretch() {
        let before = ramp(32, 32);
        let mut plane = before.clone();
        apply(
            &mut plane,
            32,
            32,
            &Clahe {
                tiles: 2,
                clip_limit: 1.0,
            },
        );
        let worst = before
            .iter()
            .zip(&plane)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            worst <= 20,
            "clip 1.0 should stay close to the input, moved {worst}"
        );
    }

    #[test]
    fn flat_image_stays_flat() {
        let mut plane = vec![77u8; 64];
        apply(&mut plane, 8, 8, &Clahe::default());
        assert!(plane.iter().all(|&v| v == plane[0]));
    }
}
