//! Synthetic plants: procedural PCB-like boards with the six DeepPCB defect classes, written as
//! a DeepPCB-layout folder (test image, defect-free template, annotation file, split files) so
//! that the very loaders a real plant uses read them. Deterministic from a seed.
//!
//! Each plant differs the way real lines do: lighting (brightness, contrast), sensor noise and
//! its mix of defect classes (Dirichlet over classes with concentration `alpha`; small alpha is
//! strongly non-IID); set per plant (an experiment's `[[data.style]]`), also optical blur, the
//! camera's scale and the size of its defects. Boxes are the bounding boxes of the pixels each
//! defect actually changed (grown by what blur and resampling spread), so labels are correct
//! by construction.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// DeepPCB's classes, in type order 1..6 (class index = type - 1).
pub const CLASS_NAMES: [&str; 6] = [
    "open",
    "short",
    "mousebite",
    "spur",
    "spurious_copper",
    "pin_hole",
];

const SUBSTRATE: f32 = 40.0;
const COPPER: f32 = 215.0;

/// How one synthetic plant's images look.
#[derive(Clone, Debug)]
pub struct PlantStyle {
    /// Multiplies intensities (lighting).
    pub gain: f32,
    /// Added to intensities.
    pub offset: f32,
    /// Standard deviation of Gaussian sensor noise, in grey levels.
    pub noise: f32,
    /// Probability of each defect class (sums to 1).
    pub class_mix: [f64; 6],
    /// Optical blur: Gaussian sigma in pixels (0: none).
    pub blur: f32,
    /// Camera scale: the board appears `scale` times larger (drawn on a canvas of
    /// size / scale pixels, then resampled); 1 draws at the image size.
    pub scale: f32,
    /// Multiplies the size of every defect (gaps, bridges, bites, blobs, holes).
    pub defect_scale: f32,
}

impl PlantStyle {
    /// A plant style drawn from `seed`: lighting and noise vary mildly, and the class mix is a
    /// Dirichlet(alpha) draw (alpha 0.1: nearly one class per plant; alpha 10: nearly uniform).
    pub fn sample(seed: u64, alpha: f64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_57e1);
        let gammas: Vec<f64> = (0..6)
            .map(|_| {
                rand_distr::Gamma::new(alpha.max(1e-3), 1.0)
                    .expect("alpha is positive")
                    .sample(&mut rng)
                    .max(1e-12)
            })
            .collect();
        let total: f64 = gammas.iter().sum();
        let mut class_mix = [0.0; 6];
        for (m, g) in class_mix.iter_mut().zip(&gammas) {
            *m = g / total;
        }
        Self {
            gain: rng.gen_range(0.8..1.15),
            offset: rng.gen_range(-15.0..15.0),
            noise: rng.gen_range(2.0..7.0),
            class_mix,
            blur: 0.0,
            scale: 1.0,
            defect_scale: 1.0,
        }
    }
}

/// One generated board: the defective image, its defect-free template, and the defect boxes
/// as `(x1, y1, x2, y2, class_index)`.
pub struct Board {
    pub size: u32,
    pub test: Vec<u8>,
    pub template: Vec<u8>,
    pub defects: Vec<(u32, u32, u32, u32, usize)>,
}

/// Generates one board of `size x size` pixels with 1..=`max_defects` defects.
pub fn generate_board(seed: u64, size: u32, style: &PlantStyle, max_defects: usize) -> Board {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // The canvas the board is drawn on: smaller than the image when the camera magnifies.
    let n = canvas_side(size, style.scale);
    let mut clean = vec![SUBSTRATE; n * n];
    let traces = draw_traces(&mut rng, &mut clean, n);
    let mut defective = clean.clone();
    let mut defects = Vec::new();
    let want = rng.gen_range(1..=max_defects.max(1));
    let mut attempts = 0;
    while defects.len() < want && attempts < want * 20 {
        attempts += 1;
        let class = pick_class(&mut rng, &style.class_mix);
        let before = defective.clone();
        if !draw_defect(
            &mut rng,
            &mut defective,
            n,
            &traces,
            class,
            style.defect_scale,
        ) {
            continue;
        }
        if let Some((x1, y1, x2, y2)) = changed_bbox(&before, &defective, n) {
            let overlaps = defects
                .iter()
                .any(|&(a, b, c, d, _)| x1 < c + 4 && a < x2 + 4 && y1 < d + 4 && b < y2 + 4);
            if overlaps {
                defective = before;
                continue;
            }
            defects.push((x1, y1, x2, y2, class));
        }
    }
    let (clean, defective, defects) = optics(clean, defective, defects, n, size, style.blur);
    let test = render(&defective, style, &mut rng);
    let template = render(&clean, style, &mut rng);
    Board {
        size,
        test,
        template,
        defects,
    }
}

/// A defect's box `(x1, y1, x2, y2, class_index)`.
type DefectBox = (u32, u32, u32, u32, usize);

/// Side of the canvas a board of `size` pixels is drawn on at camera `scale` (at least 32).
fn canvas_side(size: u32, scale: f32) -> usize {
    if (scale - 1.0).abs() < 1e-6 {
        return size as usize;
    }
    ((size as f32 / scale.max(1e-3)).round() as usize).max(32)
}

/// The camera: resamples the drawn canvas (`n` pixels a side) to the image `size`, then blurs;
/// boxes follow, grown by the pixels resampling and blur can reach.
fn optics(
    clean: Vec<f32>,
    defective: Vec<f32>,
    defects: Vec<DefectBox>,
    n: usize,
    size: u32,
    blur: f32,
) -> (Vec<f32>, Vec<f32>, Vec<DefectBox>) {
    let out = size as usize;
    let (mut clean, mut defective, mut defects) = if n == out {
        (clean, defective, defects)
    } else {
        let k = out as f64 / n as f64;
        let boxes = defects
            .into_iter()
            .map(|(x1, y1, x2, y2, c)| {
                let lo = |v: u32| ((f64::from(v) - 1.0) * k).floor().max(0.0) as u32;
                let hi = |v: u32| (((f64::from(v) + 1.0) * k).ceil() as u32).min(size);
                (lo(x1), lo(y1), hi(x2), hi(y2), c)
            })
            .collect();
        (
            resample(&clean, n, out),
            resample(&defective, n, out),
            boxes,
        )
    };
    if blur > 0.0 {
        let kernel = gaussian_kernel(blur);
        let r = (kernel.len() / 2) as u32;
        clean = blur_image(&clean, out, &kernel);
        defective = blur_image(&defective, out, &kernel);
        for b in &mut defects {
            *b = (
                b.0.saturating_sub(r),
                b.1.saturating_sub(r),
                (b.2 + r).min(size),
                (b.3 + r).min(size),
                b.4,
            );
        }
    }
    (clean, defective, defects)
}

/// Bilinear resampling of an `n`-pixel square image to `out` pixels (pixel centres aligned).
fn resample(img: &[f32], n: usize, out: usize) -> Vec<f32> {
    let k = n as f32 / out as f32;
    let coord = |d: usize| {
        let s = ((d as f32 + 0.5) * k - 0.5).clamp(0.0, (n - 1) as f32);
        let i = s.floor() as usize;
        (i, (i + 1).min(n - 1), s - i as f32)
    };
    let mut res = vec![0.0; out * out];
    for y in 0..out {
        let (y0, y1, fy) = coord(y);
        for x in 0..out {
            let (x0, x1, fx) = coord(x);
            let top = img[y0 * n + x0] * (1.0 - fx) + img[y0 * n + x1] * fx;
            let bottom = img[y1 * n + x0] * (1.0 - fx) + img[y1 * n + x1] * fx;
            res[y * out + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    res
}

/// A normalised Gaussian kernel of `sigma`, radius ceil(3 sigma).
fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil().max(1.0) as i32;
    let w: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = w.iter().sum();
    w.into_iter().map(|v| v / total).collect()
}

/// Separable blur with `kernel`, edges clamped.
fn blur_image(img: &[f32], n: usize, kernel: &[f32]) -> Vec<f32> {
    let r = (kernel.len() / 2) as isize;
    let at = |i: isize| i.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0.0; n * n];
    for y in 0..n {
        for x in 0..n {
            tmp[y * n + x] = kernel
                .iter()
                .enumerate()
                .map(|(j, w)| w * img[y * n + at(x as isize + j as isize - r)])
                .sum();
        }
    }
    let mut res = vec![0.0; n * n];
    for y in 0..n {
        for x in 0..n {
            res[y * n + x] = kernel
                .iter()
                .enumerate()
                .map(|(j, w)| w * tmp[at(y as isize + j as isize - r) * n + x])
                .sum();
        }
    }
    res
}

/// Writes `count` boards for plant `plant` into `root` in DeepPCB layout
/// (`groupG/G/NNNNNNNN_test.jpg`, `_temp.jpg`, `groupG/G_not/NNNNNNNN.txt`) and returns the
/// split lines (`groupG/G/NNNNNNNN.jpg groupG/G_not/NNNNNNNN.txt`).
pub fn write_plant(
    root: &Path,
    plant: u32,
    count: usize,
    size: u32,
    style: &PlantStyle,
    seed: u64,
) -> io::Result<Vec<String>> {
    let group = format!("{:05}", 90000 + plant);
    let img_dir = root.join(format!("group{group}")).join(&group);
    let ann_dir = root
        .join(format!("group{group}"))
        .join(format!("{group}_not"));
    fs::create_dir_all(&img_dir)?;
    fs::create_dir_all(&ann_dir)?;
    let mut lines = Vec::with_capacity(count);
    for i in 0..count {
        let stem = format!("{group}{i:03}");
        let board = generate_board(
            seed.wrapping_mul(1_000_003)
                .wrapping_add((plant as u64) << 20 | i as u64),
            size,
            style,
            4,
        );
        save_gray(&img_dir.join(format!("{stem}_test.jpg")), &board.test, size)?;
        save_gray(
            &img_dir.join(format!("{stem}_temp.jpg")),
            &board.template,
            size,
        )?;
        let mut txt = String::new();
        for (x1, y1, x2, y2, c) in &board.defects {
            let _ = writeln!(txt, "{x1} {y1} {x2} {y2} {}", c + 1);
        }
        fs::write(ann_dir.join(format!("{stem}.txt")), txt)?;
        lines.push(format!(
            "group{group}/{group}/{stem}.jpg group{group}/{group}_not/{stem}.txt"
        ));
    }
    Ok(lines)
}

/// The embedded default data: `plants` synthetic plants with `train` training and `test` test
/// boards each, written under `root` as one DeepPCB-layout data set whose `trainval.txt` and
/// `test.txt` name every plant's boards. Returns `root`.
pub fn write_default_dataset(
    root: &Path,
    plants: u32,
    train: usize,
    test: usize,
    size: u32,
    alpha: f64,
    seed: u64,
) -> io::Result<PathBuf> {
    let counts = vec![(train, test); plants as usize];
    write_dataset(root, &counts, size, alpha, seed)
}

/// Like [`write_default_dataset`] with plant p holding `counts[p]` = (training, test) boards;
/// plant p's boards are board group `group{90000 + p}`.
pub fn write_dataset(
    root: &Path,
    counts: &[(usize, usize)],
    size: u32,
    alpha: f64,
    seed: u64,
) -> io::Result<PathBuf> {
    let styles: Vec<PlantStyle> = (0..counts.len())
        .map(|p| PlantStyle::sample(seed.wrapping_add(p as u64), alpha))
        .collect();
    write_dataset_styled(root, counts, size, &styles, seed)
}

/// Like [`write_dataset`] with plant p's look given by `styles[p]` (see
/// [`PlantStyle::sample`] for the drawn ones).
pub fn write_dataset_styled(
    root: &Path,
    counts: &[(usize, usize)],
    size: u32,
    styles: &[PlantStyle],
    seed: u64,
) -> io::Result<PathBuf> {
    fs::create_dir_all(root)?;
    let mut trainval = String::new();
    let mut test_lines = String::new();
    for ((p, &(train, test)), style) in counts.iter().enumerate().zip(styles) {
        let p = p as u32;
        let lines = write_plant(root, p, train + test, size, style, seed)?;
        for (i, l) in lines.iter().enumerate() {
            let out = if i < train {
                &mut trainval
            } else {
                &mut test_lines
            };
            out.push_str(l);
            out.push('\n');
        }
    }
    fs::write(root.join("trainval.txt"), trainval)?;
    fs::write(root.join("test.txt"), test_lines)?;
    Ok(root.to_path_buf())
}

/// Boards per plant with a size skew: plant p gets a share proportional to
/// (p + 1)^-`skew` of `plants` x `per_plant` boards, at least `min` (0 skew: `per_plant` each).
pub fn skewed_counts(plants: u32, per_plant: usize, skew: f64, min: usize) -> Vec<usize> {
    let weights: Vec<f64> = (0..plants).map(|p| f64::from(p + 1).powf(-skew)).collect();
    let total: f64 = weights.iter().sum();
    let boards = per_plant as f64 * f64::from(plants);
    weights
        .iter()
        .map(|w| ((boards * w / total).round() as usize).max(min))
        .collect()
}

fn save_gray(path: &Path, pixels: &[u8], size: u32) -> io::Result<()> {
    let img = image::GrayImage::from_raw(size, size, pixels.to_vec())
        .ok_or_else(|| io::Error::other("image buffer has the wrong size"))?;
    let mut out = io::BufWriter::new(fs::File::create(path)?);
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
    img.write_with_encoder(enc).map_err(io::Error::other)
}

/// A straight copper trace: axis-aligned rectangle.
#[derive(Clone, Copy)]
struct Trace {
    x1: usize,
    y1: usize,
    x2: usize,
    y2: usize,
    horizontal: bool,
}

fn fill_rect(img: &mut [f32], n: usize, x1: usize, y1: usize, x2: usize, y2: usize, v: f32) {
    for y in y1.min(n)..y2.min(n) {
        for x in x1.min(n)..x2.min(n) {
            img[y * n + x] = v;
        }
    }
}

fn fill_disc(img: &mut [f32], n: usize, cx: f32, cy: f32, r: f32, v: f32) {
    let (x0, x1) = (
        (cx - r).floor().max(0.0) as usize,
        (cx + r).ceil() as usize + 1,
    );
    let (y0, y1) = (
        (cy - r).floor().max(0.0) as usize,
        (cy + r).ceil() as usize + 1,
    );
    for y in y0..y1.min(n) {
        for x in x0..x1.min(n) {
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            if dx * dx + dy * dy <= r * r {
                img[y * n + x] = v;
            }
        }
    }
}

fn draw_traces(rng: &mut ChaCha8Rng, img: &mut [f32], n: usize) -> Vec<Trace> {
    let mut traces = Vec::new();
    let count = rng.gen_range(6..12);
    for _ in 0..count {
        let w = rng.gen_range(4..10);
        let horizontal = rng.gen_bool(0.5);
        let pos = rng.gen_range(8..n - 8 - w);
        let a = rng.gen_range(0..n / 3);
        let b = rng.gen_range(2 * n / 3..n);
        let t = if horizontal {
            Trace {
                x1: a,
                y1: pos,
                x2: b,
                y2: pos + w,
                horizontal,
            }
        } else {
            Trace {
                x1: pos,
                y1: a,
                x2: pos + w,
                y2: b,
                horizontal,
            }
        };
        fill_rect(img, n, t.x1, t.y1, t.x2, t.y2, COPPER);
        // pads at both ends
        let r = w as f32 * 0.9 + 2.0;
        let (px, py, qx, qy) = if horizontal {
            let cy = (t.y1 + t.y2) as f32 / 2.0;
            (t.x1 as f32, cy, t.x2 as f32, cy)
        } else {
            let cx = (t.x1 + t.x2) as f32 / 2.0;
            (cx, t.y1 as f32, cx, t.y2 as f32)
        };
        fill_disc(img, n, px, py, r, COPPER);
        fill_disc(img, n, qx, qy, r, COPPER);
        traces.push(t);
    }
    traces
}

fn pick_class(rng: &mut ChaCha8Rng, mix: &[f64; 6]) -> usize {
    let u: f64 = rng.gen();
    let mut acc = 0.0;
    for (i, p) in mix.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    5
}

/// Draws one defect of `class`; returns false if no suitable place was found.
fn draw_defect(
    rng: &mut ChaCha8Rng,
    img: &mut [f32],
    n: usize,
    traces: &[Trace],
    class: usize,
    defect_scale: f32,
) -> bool {
    // Sizes are drawn as before, then scaled: scale 1 draws exactly the unscaled boards.
    let sz = |v: usize| ((v as f32 * defect_scale).round() as usize).max(1);
    let sf = |v: f32| v * defect_scale;
    if traces.is_empty() {
        return false;
    }
    let t = traces[rng.gen_range(0..traces.len())];
    let (len_lo, len_hi) = if t.horizontal {
        (t.x1 + 12, t.x2.saturating_sub(12))
    } else {
        (t.y1 + 12, t.y2.saturating_sub(12))
    };
    if len_hi <= len_lo + 2 {
        return false;
    }
    let along = rng.gen_range(len_lo..len_hi);
    let (cx, cy) = if t.horizontal {
        (along as f32, (t.y1 + t.y2) as f32 / 2.0)
    } else {
        ((t.x1 + t.x2) as f32 / 2.0, along as f32)
    };
    let half_w = if t.horizontal {
        (t.y2 - t.y1) as f32 / 2.0
    } else {
        (t.x2 - t.x1) as f32 / 2.0
    };
    match class {
        // open: a cut across the trace
        0 => {
            let gap = sz(rng.gen_range(3..7));
            if t.horizontal {
                fill_rect(img, n, along, t.y1, along + gap, t.y2, SUBSTRATE);
            } else {
                fill_rect(img, n, t.x1, along, t.x2, along + gap, SUBSTRATE);
            }
        }
        // short: a thin copper bridge leaving the trace sideways
        1 => {
            let len = sz(rng.gen_range(10..22));
            let thick = sz(rng.gen_range(2..4));
            if t.horizontal {
                let (y0, y1) = if rng.gen_bool(0.5) {
                    (t.y2, t.y2 + len)
                } else {
                    (t.y1.saturating_sub(len), t.y1)
                };
                fill_rect(img, n, along, y0, along + thick, y1, COPPER);
            } else {
                let (x0, x1) = if rng.gen_bool(0.5) {
                    (t.x2, t.x2 + len)
                } else {
                    (t.x1.saturating_sub(len), t.x1)
                };
                fill_rect(img, n, x0, along, x1, along + thick, COPPER);
            }
        }
        // mousebite: a bite out of the trace edge
        2 => {
            let r = sf(rng.gen_range(2.5..4.5));
            let side = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            let (bx, by) = if t.horizontal {
                (cx, cy + side * half_w)
            } else {
                (cx + side * half_w, cy)
            };
            fill_disc(img, n, bx, by, r, SUBSTRATE);
        }
        // spur: a short stub sticking out of the edge
        3 => {
            let r = sf(rng.gen_range(2.0..3.5));
            let side = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            let (bx, by) = if t.horizontal {
                (cx, cy + side * (half_w + r))
            } else {
                (cx + side * (half_w + r), cy)
            };
            fill_disc(img, n, bx, by, r, COPPER);
        }
        // spurious copper: an isolated blob on the substrate, away from traces
        4 => {
            for _ in 0..30 {
                let x = rng.gen_range(10..n - 10) as f32;
                let y = rng.gen_range(10..n - 10) as f32;
                let r = sf(rng.gen_range(3.0..6.0));
                let clear = traces.iter().all(|t| {
                    x + r + 3.0 < t.x1 as f32
                        || x - r - 3.0 > t.x2 as f32
                        || y + r + 3.0 < t.y1 as f32
                        || y - r - 3.0 > t.y2 as f32
                });
                if clear && img[y as usize * n + x as usize] == SUBSTRATE {
                    fill_disc(img, n, x, y, r, COPPER);
                    return true;
                }
            }
            return false;
        }
        // pin hole: a small hole inside the trace
        _ => {
            let r = sf((half_w * 0.5).clamp(1.2, 2.5));
            fill_disc(img, n, cx, cy, r, SUBSTRATE);
        }
    }
    true
}

fn changed_bbox(before: &[f32], after: &[f32], n: usize) -> Option<(u32, u32, u32, u32)> {
    let (mut x1, mut y1, mut x2, mut y2) = (usize::MAX, usize::MAX, 0, 0);
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a != b {
            let (x, y) = (i % n, i / n);
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x + 1);
            y2 = y2.max(y + 1);
        }
    }
    if x1 == usize::MAX {
        return None;
    }
    // pad by 2 pixels like human labels do, within the image
    let pad = 2;
    Some((
        x1.saturating_sub(pad) as u32,
        y1.saturating_sub(pad) as u32,
        (x2 + pad).min(n) as u32,
        (y2 + pad).min(n) as u32,
    ))
}

fn render(img: &[f32], style: &PlantStyle, rng: &mut ChaCha8Rng) -> Vec<u8> {
    // Noise 0 draws nothing: a noiseless style renders test and template alike.
    let noise = (style.noise > 0.0)
        .then(|| Normal::new(0.0f32, style.noise).expect("noise sigma is positive"));
    img.iter()
        .map(|&v| {
            let n = noise.as_ref().map_or(0.0, |d| d.sample(rng));
            let x = v * style.gain + style.offset + n;
            x.round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boards_are_deterministic_from_the_seed() {
        let style = PlantStyle::sample(3, 0.5);
        let a = generate_board(42, 128, &style, 4);
        let b = generate_board(42, 128, &style, 4);
        assert_eq!(a.test, b.test);
        assert_eq!(a.defects, b.defects);
        let c = generate_board(43, 128, &style, 4);
        assert_ne!(a.test, c.test);
    }

    /// A style rendered without noise, so the only differences are the defects.
    fn clean_style() -> PlantStyle {
        PlantStyle {
            gain: 1.0,
            offset: 0.0,
            noise: 0.0,
            class_mix: [1.0 / 6.0; 6],
            blur: 0.0,
            scale: 1.0,
            defect_scale: 1.0,
        }
    }

    /// Every pixel that differs from the template lies in a box and every box covers a change.
    fn assert_boxes_cover_changes(style: &PlantStyle, size: u32, seeds: std::ops::Range<u64>) {
        for seed in seeds {
            let b = generate_board(seed, size, style, 4);
            assert!(!b.defects.is_empty(), "seed {seed}: no defect drawn");
            let n = b.size as usize;
            for y in 0..n {
                for x in 0..n {
                    if b.test[y * n + x] != b.template[y * n + x] {
                        let inside = b.defects.iter().any(|&(x1, y1, x2, y2, _)| {
                            (x1 as usize..x2 as usize).contains(&x)
                                && (y1 as usize..y2 as usize).contains(&y)
                        });
                        assert!(
                            inside,
                            "seed {seed}, {style:?}: changed pixel ({x},{y}) outside every box"
                        );
                    }
                }
            }
            for &(x1, y1, x2, y2, c) in &b.defects {
                assert!(x2 > x1 && y2 > y1 && x2 <= size && y2 <= size && c < 6);
                let changed = (y1..y2).any(|y| {
                    (x1..x2).any(|x| {
                        let i = y as usize * n + x as usize;
                        b.test[i] != b.template[i]
                    })
                });
                assert!(changed, "seed {seed}, {style:?}: box covers no change");
            }
        }
    }

    fn mean_box_area(style: &PlantStyle, size: u32) -> f64 {
        let boxes: Vec<_> = (0..30)
            .flat_map(|seed| generate_board(seed, size, style, 4).defects)
            .collect();
        boxes
            .iter()
            .map(|&(x1, y1, x2, y2, _)| f64::from((x2 - x1) * (y2 - y1)))
            .sum::<f64>()
            / boxes.len() as f64
    }

    #[test]
    fn boxes_cover_exactly_the_pixels_that_differ_from_the_template() {
        assert_boxes_cover_changes(&clean_style(), 160, 0..40);
    }

    #[test]
    fn boxes_cover_the_defects_under_blur_camera_scale_and_defect_size() {
        let styles = [
            PlantStyle {
                blur: 1.2,
                ..clean_style()
            },
            PlantStyle {
                scale: 1.6,
                ..clean_style()
            },
            PlantStyle {
                scale: 0.6,
                ..clean_style()
            },
            PlantStyle {
                defect_scale: 2.0,
                ..clean_style()
            },
            PlantStyle {
                defect_scale: 0.6,
                blur: 0.8,
                scale: 1.3,
                ..clean_style()
            },
        ];
        for style in &styles {
            assert_boxes_cover_changes(style, 96, 0..12);
        }
    }

    #[test]
    fn defect_size_and_camera_scale_grow_the_boxes_and_blur_softens_edges() {
        let base = mean_box_area(&clean_style(), 128);
        let big = mean_box_area(
            &PlantStyle {
                defect_scale: 2.0,
                ..clean_style()
            },
            128,
        );
        let near = mean_box_area(
            &PlantStyle {
                scale: 1.8,
                ..clean_style()
            },
            128,
        );
        assert!(big > base * 1.5, "defect_scale 2: {big} vs {base}");
        assert!(near > base * 1.5, "scale 1.8: {near} vs {base}");
        let edges = |style: &PlantStyle| {
            let b = generate_board(5, 128, style, 4);
            b.template
                .windows(2)
                .map(|w| (i32::from(w[0]) - i32::from(w[1])).abs())
                .max()
                .unwrap_or(0)
        };
        let sharp = edges(&clean_style());
        let soft = edges(&PlantStyle {
            blur: 2.0,
            ..clean_style()
        });
        assert!(
            soft * 2 < sharp,
            "steepest step: blurred {soft}, sharp {sharp}"
        );
    }

    #[test]
    fn class_mix_follows_alpha() {
        let peaked = PlantStyle::sample(1, 0.05);
        let flat = PlantStyle::sample(1, 100.0);
        let max = |m: &[f64; 6]| m.iter().cloned().fold(0.0, f64::max);
        assert!(max(&peaked.class_mix) > 0.8, "{:?}", peaked.class_mix);
        assert!(max(&flat.class_mix) < 0.35, "{:?}", flat.class_mix);
        assert!((flat.class_mix.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn skewed_counts_follow_a_power_law() {
        assert_eq!(skewed_counts(3, 10, 0.0, 2), vec![10, 10, 10]);
        let c = skewed_counts(4, 100, 1.0, 2);
        assert!(c.windows(2).all(|w| w[0] > w[1]), "{c:?}");
        assert!((c.iter().sum::<usize>() as i64 - 400).abs() <= 2, "{c:?}");
        assert_eq!(c[0], 2 * c[1]);
        assert!(skewed_counts(8, 4, 3.0, 2).iter().all(|&n| n >= 2));
    }

    #[test]
    fn writes_a_deeppcb_layout_folder() {
        let dir = tempfile::tempdir().unwrap();
        write_default_dataset(dir.path(), 2, 3, 1, 96, 1.0, 7).unwrap();
        let trainval = fs::read_to_string(dir.path().join("trainval.txt")).unwrap();
        let test = fs::read_to_string(dir.path().join("test.txt")).unwrap();
        assert_eq!(trainval.lines().count(), 6);
        assert_eq!(test.lines().count(), 2);
        for line in trainval.lines().chain(test.lines()) {
            let (img, ann) = line.split_once(' ').unwrap();
            let stem = img.trim_end_matches(".jpg");
            assert!(dir.path().join(format!("{stem}_test.jpg")).exists());
            assert!(dir.path().join(format!("{stem}_temp.jpg")).exists());
            assert!(dir.path().join(ann).exists());
        }
    }
}
