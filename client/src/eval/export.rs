//! Evaluation outputs for people: detections as JSON (image ids, class names, scores,
//! corner boxes in original pixels) and images annotated with ground truth and detections.

use std::path::{Path, PathBuf};

use fedinspect_common::detection::{Annotation, BBox, Detection};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use super::draw;
use super::font;
use super::plot::{self, PlotError};

/// Colour of ground-truth boxes (detections use the class palette).
pub const GROUND_TRUTH_COLOR: Rgb<u8> = Rgb([0, 200, 0]);

/// The detections file: `{"class_names": [...], "images": [{"id", "detections": [...]}]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectionsFile {
    pub class_names: Vec<String>,
    pub images: Vec<ImageDetections>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageDetections {
    pub id: String,
    pub detections: Vec<DetectionRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectionRecord {
    pub class: u32,
    pub class_name: String,
    pub score: f32,
    /// `[x1, y1, x2, y2]` in original image pixels.
    pub bbox: [f32; 4],
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("got {ids} image ids but detections for {detections} images; pass one list per image")]
    LengthMismatch { ids: usize, detections: usize },
    #[error("cannot write {path}: {source}; check the folder exists and is writable")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialise detections: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Image(#[from] crate::data::planes::ImageError),
    #[error(transparent)]
    Png(#[from] PlotError),
}

/// Pairs image ids with their detections; unknown classes are named `class<N>`.
pub fn detections_file(
    ids: &[String],
    detections: &[Vec<Detection>],
    class_names: &[String],
) -> Result<DetectionsFile, ExportError> {
    if ids.len() != detections.len() {
        return Err(ExportError::LengthMismatch {
            ids: ids.len(),
            detections: detections.len(),
        });
    }
    let images = ids
        .iter()
        .zip(detections)
        .map(|(id, dets)| ImageDetections {
            id: id.clone(),
            detections: dets
                .iter()
                .map(|d| DetectionRecord {
                    class: d.class,
                    class_name: class_name(class_names, d.class),
                    score: d.score,
                    bbox: [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2],
                })
                .collect(),
        })
        .collect();
    Ok(DetectionsFile {
        class_names: class_names.to_vec(),
        images,
    })
}

/// Writes `file` as pretty JSON, atomically.
pub fn write_detections_json(path: &Path, file: &DetectionsFile) -> Result<(), ExportError> {
    let json = serde_json::to_vec_pretty(file)?;
    write(path, &json)
}

/// Draws ground truth (green, thin, name above the box) and the detections scoring at least
/// `min_score` (class colour, thicker, `name score` label) onto a copy of `image`.
pub fn annotate(
    image: &RgbImage,
    ground_truth: &[Annotation],
    detections: &[Detection],
    class_names: &[String],
    min_score: f32,
) -> RgbImage {
    let mut img = image.clone();
    // Text and lines scale with the image so labels stay legible on large captures.
    let scale = (img.width().max(img.height()) / 640).max(1);
    for a in ground_truth {
        let name = class_name(class_names, a.class);
        draw_box(&mut img, &a.bbox, GROUND_TRUTH_COLOR, scale, &name, false);
    }
    for d in detections.iter().filter(|d| d.score >= min_score) {
        let label = format!("{} {:.2}", class_name(class_names, d.class), d.score);
        draw_box(
            &mut img,
            &d.bbox,
            draw::class_color(d.class),
            2 * scale,
            &label,
            true,
        );
    }
    img
}

/// Reads `image` (any format the loader reads), annotates it, and writes a PNG to `out`.
pub fn save_annotated(
    image: &Path,
    ground_truth: &[Annotation],
    detections: &[Detection],
    class_names: &[String],
    min_score: f32,
    out: &Path,
) -> Result<(), ExportError> {
    let rgb = crate::data::planes::decode_file(image)?.into_rgb8();
    let png = plot::encode_png(&annotate(
        &rgb,
        ground_truth,
        detections,
        class_names,
        min_score,
    ))?;
    write(out, &png)
}

/// A rectangle with a label on a filled strip: above the box for ground truth, below it for
/// detections, so labels cover neither each other nor the defect.
fn draw_box(
    img: &mut RgbImage,
    b: &BBox,
    color: Rgb<u8>,
    thickness: u32,
    label: &str,
    below: bool,
) {
    let px = |v: f32| v.round() as i64;
    let (x0, y0, x1, y1) = (px(b.x1), px(b.y1), px(b.x2), px(b.y2));
    draw::rect_outline(img, x0, y0, x1, y1, i64::from(thickness), color);
    let scale = (thickness / 2).max(1);
    let lh = i64::from((font::GLYPH_H + 2) * scale);
    let lw = i64::from(font::text_width(label, scale) + 2 * scale);
    let ly = if below {
        y1.min(i64::from(img.height()) - lh)
    } else {
        (y0 - lh).max(0)
    };
    draw::fill_rect(img, x0, ly, x0 + lw, ly + lh, color);
    draw::text(
        img,
        x0 + i64::from(scale),
        ly + i64::from(scale),
        label,
        scale,
        Rgb([255, 255, 255]),
    );
}

fn class_name(class_names: &[String], class: u32) -> String {
    class_names
        .get(class as usize)
        .cloned()
        .unwrap_or_else(|| format!("class{class}"))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    fedinspect_common::fsutil::write_bytes_atomic(path, bytes).map_err(|source| {
        ExportError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}
