//! Precision/recall curves as a PNG, drawn in pure Rust: axes with ticks and grid, one
//! coloured line per class, a legend with each class's AP to the right, a title on top.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use super::draw;
use super::font;
use super::map::PrCurve;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// Smallest plot that still has room for axes and a legend.
pub const MIN_WIDTH: u32 = 240;
pub const MIN_HEIGHT: u32 = 160;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot size {width}x{height} is too small; use at least {MIN_WIDTH}x{MIN_HEIGHT}")]
    TooSmall { width: u32, height: u32 },
    #[error("cannot encode the plot as png: {0}")]
    Encode(#[from] image::ImageError),
    #[error("cannot write {path}: {source}; check the folder exists and is writable")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Draws `curves` (one per class, named by `class_names[curve.class]`) into a
/// `width x height` image.
pub fn pr_plot(
    curves: &[PrCurve],
    class_names: &[String],
    title: &str,
    width: u32,
    height: u32,
) -> Result<RgbImage, PlotError> {
    if width < MIN_WIDTH || height < MIN_HEIGHT {
        return Err(PlotError::TooSmall { width, height });
    }
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    let labels: Vec<String> = curves
        .iter()
        .map(|c| {
            let name = class_names
                .get(c.class as usize)
                .map_or("?", String::as_str);
            format!("{name} {:.3}", c.ap)
        })
        .collect();
    let legend_w = labels
        .iter()
        .map(|l| font::text_width(l, 1))
        .max()
        .unwrap_or(0)
        + 24;
    let legend_w = legend_w.min(width / 2);
    let (w, h) = (i64::from(width), i64::from(height));
    // Plot area in pixels: left, top, right, bottom.
    let (l, t, r, b) = (44, 30, w - i64::from(legend_w) - 12, h - 30);
    draw::text(&mut img, l, 6, title, 1, BLACK);
    axes(&mut img, (l, t, r, b));
    for curve in curves {
        let color = draw::class_color(curve.class);
        let to_px = |rec: f64, prec: f64| {
            let x = l + ((r - l) as f64 * rec.clamp(0.0, 1.0)).round() as i64;
            let y = b - ((b - t) as f64 * prec.clamp(0.0, 1.0)).round() as i64;
            (x, y)
        };
        let points: Vec<(i64, i64)> = curve
            .recall
            .iter()
            .zip(&curve.precision)
            .map(|(&rec, &prec)| to_px(rec, prec))
            .collect();
        for pair in points.windows(2) {
            draw::line(&mut img, pair[0], pair[1], 2, color);
        }
        if let [only] = points.as_slice() {
            draw::fill_rect(
                &mut img,
                only.0 - 2,
                only.1 - 2,
                only.0 + 3,
                only.1 + 3,
                color,
            );
        }
    }
    for (i, (curve, label)) in curves.iter().zip(&labels).enumerate() {
        let y = t + 4 + i as i64 * 12;
        let x = r + 10;
        draw::fill_rect(
            &mut img,
            x,
            y + 1,
            x + 10,
            y + 6,
            draw::class_color(curve.class),
        );
        draw::text(&mut img, x + 14, y, label, 1, BLACK);
    }
    Ok(img)
}

/// [`pr_plot`] encoded as PNG bytes.
pub fn pr_plot_png(
    curves: &[PrCurve],
    class_names: &[String],
    title: &str,
    width: u32,
    height: u32,
) -> Result<Vec<u8>, PlotError> {
    encode_png(&pr_plot(curves, class_names, title, width, height)?)
}

/// [`pr_plot`] written atomically to `path` as PNG.
pub fn save_pr_plot(
    path: &Path,
    curves: &[PrCurve],
    class_names: &[String],
    title: &str,
    width: u32,
    height: u32,
) -> Result<(), PlotError> {
    let png = pr_plot_png(curves, class_names, title, width, height)?;
    fedinspect_common::fsutil::write_bytes_atomic(path, &png).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Encodes an RGB image as PNG bytes.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, PlotError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Frame, grid and tick labels 0.0..1.0 on both axes, and the axis names.
fn axes(img: &mut RgbImage, (l, t, r, b): (i64, i64, i64, i64)) {
    for k in 0..=5 {
        let f = f64::from(k) / 5.0;
        let x = l + ((r - l) as f64 * f).round() as i64;
        let y = b - ((b - t) as f64 * f).round() as i64;
        draw::line(img, (x, t), (x, b), 1, GRID);
        draw::line(img, (l, y), (r, y), 1, GRID);
        let label = format!("{f:.1}");
        let lw = i64::from(font::text_width(&label, 1));
        draw::text(img, x - lw / 2, b + 5, &label, 1, BLACK);
        draw::text(img, l - lw - 5, y - 3, &label, 1, BLACK);
    }
    draw::rect_outline(img, l, t, r + 1, b + 1, 1, BLACK);
    let name = "recall";
    let nw = i64::from(font::text_width(name, 1));
    draw::text(img, (l + r - nw) / 2, b + 16, name, 1, BLACK);
    draw::text(img, 2, t - 12, "precision", 1, BLACK);
}
