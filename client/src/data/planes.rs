//! Decoded images as planar u8 (channel-major), and the deterministic per-image steps done once
//! before any augmentation: decoding an item into the wanted channels, optional CLAHE, and the
//! letterbox resize to the square network input.

use std::path::{Path, PathBuf};

use fedinspect_common::detection::Letterbox;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageReader};

use super::augment::{Channels, Preprocess};
use super::clahe;
use super::Item;

/// Grey level of the letterbox padding: mid-grey, so padding looks neither like copper nor
/// like bare board (the YOLO convention).
pub const PAD_VALUE: u8 = 114;

/// A `channels x height x width` u8 image; `data[(c * height + y) * width + x]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planes {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open image {path}: {source}; check that the file exists and is readable")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode image {path}: {reason}; re-export it as an 8-bit jpg or png")]
    Decode { path: PathBuf, reason: String },
    #[error(
        "template {template} is {template_w}x{template_h} but its image is {image_w}x{image_h}; \
         templates must be aligned to their image at the same size"
    )]
    SizeMismatch {
        template: PathBuf,
        template_w: u32,
        template_h: u32,
        image_w: u32,
        image_h: u32,
    },
    #[error(
        "item {id} has no template but 2-channel input needs one; load the dataset with \
         templates or use 1 channel"
    )]
    NoTemplate { id: String },
}

impl Planes {
    /// A `channels x height x width` image filled with `value`.
    pub fn filled(width: usize, height: usize, channels: usize, value: u8) -> Self {
        Self {
            width,
            height,
            channels,
            data: vec![value; width * height * channels],
        }
    }

    pub fn plane(&self, c: usize) -> &[u8] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    pub fn plane_mut(&mut self, c: usize) -> &mut [u8] {
        let n = self.width * self.height;
        &mut self.data[c * n..(c + 1) * n]
    }

    pub fn get(&self, c: usize, x: usize, y: usize) -> u8 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// Width and height from the file header, without decoding the pixels.
pub fn read_dimensions(path: &Path) -> Result<(u32, u32), ImageError> {
    open_reader(path)?
        .into_dimensions()
        .map_err(|e| decode_error(path, e))
}

/// Decodes a whole file (used by deep validation and by [`decode_item`]).
pub fn decode_file(path: &Path) -> Result<DynamicImage, ImageError> {
    open_reader(path)?
        .decode()
        .map_err(|e| decode_error(path, e))
}

/// Decodes an item into `channels` planes at its original size: grey, grey + template, or RGB.
pub fn decode_item(item: &Item, channels: Channels) -> Result<Planes, ImageError> {
    let image = decode_file(&item.image)?;
    let (w, h) = (image.width(), image.height());
    let data = match channels {
        Channels::Gray => image.into_luma8().into_raw(),
        Channels::Rgb => rgb_planar(image),
        Channels::GrayTemplate => {
            let path = item
                .template
                .as_ref()
                .ok_or_else(|| ImageError::NoTemplate {
                    id: item.id.clone(),
                })?;
            let template = decode_file(path)?;
            if (template.width(), template.height()) != (w, h) {
                return Err(ImageError::SizeMismatch {
                    template: path.clone(),
                    template_w: template.width(),
                    template_h: template.height(),
                    image_w: w,
                    image_h: h,
                });
            }
            let mut data = image.into_luma8().into_raw();
            data.extend_from_slice(template.into_luma8().as_raw());
            data
        }
    };
    Ok(Planes {
        width: w as usize,
        height: h as usize,
        channels: channels.count(),
        data,
    })
}

/// Decodes an item and applies the deterministic preprocessing: CLAHE (on the original
/// pixels, so padding does not skew the histograms) then the letterbox to `input_size`.
pub fn prepare_item(item: &Item, pre: &Preprocess) -> Result<(Planes, Letterbox), ImageError> {
    let mut planes = decode_item(item, pre.channels)?;
    if let Some(cfg) = &pre.clahe {
        let (w, h) = (planes.width, planes.height);
        for c in 0..planes.channels {
            clahe::apply(planes.plane_mut(c), w, h, cfg);
        }
    }
    Ok(letterbox(&planes, pre.input_size))
}

/// Resizes (triangle filter, aspect ratio kept) and pads with [`PAD_VALUE`] to `size x size`.
pub fn letterbox(planes: &Planes, size: u32) -> (Planes, Letterbox) {
    let (w, h) = (planes.width as u32, planes.height as u32);
    let lb = Letterbox::fit(w, h, size);
    if w == size && h == size {
        return (planes.clone(), lb);
    }
    let new_w = ((w as f32 * lb.scale).round() as u32).clamp(1, size);
    let new_h = ((h as f32 * lb.scale).round() as u32).clamp(1, size);
    let (px, py) = (lb.pad_x as usize, lb.pad_y as usize);
    let s = size as usize;
    let mut out = Planes::filled(s, s, planes.channels, PAD_VALUE);
    for c in 0..planes.channels {
        let src = GrayImage::from_raw(w, h, planes.plane(c).to_vec())
            .expect("plane length matches its dimensions");
        let resized = image::imageops::resize(&src, new_w, new_h, FilterType::Triangle);
        let dst = out.plane_mut(c);
        for (y, row) in resized.as_raw().chunks_exact(new_w as usize).enumerate() {
            let start = (y + py) * s + px;
            dst[start..start + row.len()].copy_from_slice(row);
        }
    }
    (out, lb)
}

fn open_reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>, ImageError> {
    let open = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    ImageReader::open(path)
        .map_err(open)?
        .with_guessed_format()
        .map_err(open)
}

fn decode_error(path: &Path, e: image::ImageError) -> ImageError {
    ImageError::Decode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn rgb_planar(image: DynamicImage) -> Vec<u8> {
    let rgb = image.into_rgb8();
    let n = (rgb.width() * rgb.height()) as usize;
    let mut data = vec![0u8; 3 * n];
    for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
        data[i] = px[0];
        data[n + i] = px[1];
        data[2 * n + i] = px[2];
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_pads_and_keeps_content() {
        // A 4x2 white image into 8x8: scale 2, 8x4 content, 2 rows of padding above.
        let planes = Planes::filled(4, 2, 1, 255);
        let (out, lb) = letterbox(&planes, 8);
        assert_eq!((out.width, out.height), (8, 8));
        assert_eq!(lb.scale, 2.0);
        assert_eq!(lb.pad_y, 2.0);
        assert_eq!(out.get(0, 0, 0), PAD_VALUE);
        assert_eq!(out.get(0, 3, 3), 255);
        assert_eq!(out.get(0, 7, 6), PAD_VALUE);
    }

    #[test]
    fn same_size_is_untouched() {
        let mut planes = Planes::filled(8, 8, 2, 3);
        planes.data[5] = 200;
        let (out, lb) = letterbox(&planes, 8);
        assert_eq!(out, planes);
        assert_eq!(lb, Letterbox::identity(8, 8));
    }
}
