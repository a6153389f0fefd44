//! CenterNet training targets from a batch's annotations, as the PyTorch baseline builds them:
//! per object a Gaussian bump on its class heatmap (sigma = max(0.5, min(w, h) / 6) in output
//! cells) with exactly 1 at the centre cell, and at that cell the box width and height in cells
//! and the centre's offset inside the cell.

use fedinspect_common::arch::{BOX_CHANNELS, OUTPUT_STRIDE};
use fedinspect_common::detection::Annotation;
use tch::{Device, Tensor};

use super::DetectorError;

/// Targets as flat row-major maps at output resolution `out_h x out_w`.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetMaps {
    pub batch: usize,
    pub classes: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// `[batch, classes, out_h, out_w]`.
    pub heatmap: Vec<f32>,
    /// `[batch, 4, out_h, out_w]`: w, h, dx, dy at object centres, 0 elsewhere.
    pub boxes: Vec<f32>,
    /// `[batch, 1, out_h, out_w]`: 1 at object centres.
    pub mask: Vec<f32>,
    /// Objects whose centre fell inside the image.
    pub objects: usize,
}

/// [`TargetMaps`] as tensors on a device.
pub struct Targets {
    pub heatmap: Tensor,
    pub boxes: Tensor,
    pub mask: Tensor,
}

/// Gaussians are evaluated within this many sigmas of the centre; beyond, they are below
/// exp(-12.5) and left at 0.
const GAUSS_RADIUS_SIGMAS: f32 = 5.0;

impl TargetMaps {
    /// Targets for `annotations[i]` (network input pixels) of images `height x width`.
    /// Objects whose centre lies outside the image are skipped; a class outside
    /// `0..classes` or a non-finite coordinate is an error.
    pub fn build(
        annotations: &[Vec<Annotation>],
        classes: usize,
        height: usize,
        width: usize,
    ) -> Result<Self, DetectorError> {
        let stride = OUTPUT_STRIDE as usize;
        let (out_h, out_w) = (height / stride, width / stride);
        let plane = out_h * out_w;
        let batch = annotations.len();
        let mut t = TargetMaps {
            batch,
            classes,
            out_h,
            out_w,
            heatmap: vec![0.0; batch * classes * plane],
            boxes: vec![0.0; batch * BOX_CHANNELS as usize * plane],
            mask: vec![0.0; batch * plane],
            objects: 0,
        };
        for (image, anns) in annotations.iter().enumerate() {
            for a in anns {
                let class = a.class as usize;
                if class >= classes {
                    return Err(DetectorError::AnnotationClass {
                        image,
                        class: a.class,
                        classes: classes as u32,
                    });
                }
                let b = a.bbox;
                if ![b.x1, b.y1, b.x2, b.y2].iter().all(|v| v.is_finite()) {
                    return Err(DetectorError::Batch(format!(
                        "image {image} has a box with non-finite coordinates {b:?}"
                    )));
                }
                t.add_object(image, class, a);
            }
        }
        Ok(t)
    }

    fn add_object(&mut self, image: usize, class: usize, a: &Annotation) {
        let s = OUTPUT_STRIDE as f32;
        let b = a.bbox;
        let (cx, cy) = ((b.x1 + b.x2) / 2.0 / s, (b.y1 + b.y2) / 2.0 / s);
        let (bw, bh) = (b.width() / s, b.height() / s);
        let (ix, iy) = (cx.floor(), cy.floor());
        if ix < 0.0 || iy < 0.0 || ix >= self.out_w as f32 || iy >= self.out_h as f32 {
            return;
        }
        let (ix, iy) = (ix as usize, iy as usize);
        let plane = self.out_h * self.out_w;
        let sigma = (bw.min(bh) / 6.0).max(0.5);
        let r = (GAUSS_RADIUS_SIGMAS * sigma).ceil() as usize;
        let hm = &mut self.heatmap[(image * self.classes + class) * plane..][..plane];
        for y in iy.saturating_sub(r)..(iy + r + 1).min(self.out_h) {
            // The cell centre is at (x + 0.5, y + 0.5) in cell units.
            let dy = y as f32 + 0.5 - cy;
            for x in ix.saturating_sub(r)..(ix + r + 1).min(self.out_w) {
                let dx = x as f32 + 0.5 - cx;
                let g = (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp();
                let v = &mut hm[y * self.out_w + x];
                *v = v.max(g);
            }
        }
        let cell = iy * self.out_w + ix;
        hm[cell] = 1.0;
        let values = [bw, bh, cx - ix as f32, cy - iy as f32];
        let boxes = &mut self.boxes[image * BOX_CHANNELS as usize * plane..];
        for (c, v) in values.into_iter().enumerate() {
            boxes[c * plane + cell] = v;
        }
        self.mask[image * plane + cell] = 1.0;
        self.objects += 1;
    }

    /// Copies the maps into tensors on `device`.
    pub fn to_tensors(&self, device: Device) -> Result<Targets, DetectorError> {
        let (b, h, w) = (self.batch as i64, self.out_h as i64, self.out_w as i64);
        let make = |data: &[f32], c: i64| -> Result<Tensor, DetectorError> {
            Ok(Tensor::f_from_slice(data)?
                .f_view([b, c, h, w])?
                .f_to_device(device)?)
        };
        Ok(Targets {
            heatmap: make(&self.heatmap, self.classes as i64)?,
            boxes: make(&self.boxes, i64::from(BOX_CHANNELS))?,
            mask: make(&self.mask, 1)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedinspect_common::detection::BBox;

    fn ann(x1: f32, y1: f32, x2: f32, y2: f32, class: u32) -> Annotation {
        Annotation {
            bbox: BBox::new(x1, y1, x2, y2),
            class,
        }
    }

    #[test]
    fn peaks_sizes_and_offsets_land_on_the_centre_cell() {
        // 64x64 input -> 16x16 cells. Box centre (22, 42) px = (5.5, 10.5) cells.
        let anns = vec![vec![], vec![ann(10.0, 30.0, 34.0, 54.0, 1)]];
        let t = TargetMaps::build(&anns, 2, 64, 64).unwrap();
        assert_eq!((t.out_h, t.out_w, t.objects), (16, 16, 1));
        let plane = 256;
        let hm1 = &t.heatmap[(2 + 1) * plane..][..plane];
        let peak = hm1.iter().position(|&v| v == 1.0).unwrap();
        assert_eq!((peak / 16, peak % 16), (10, 5));
        assert_eq!(hm1.iter().filter(|&&v| v == 1.0).count(), 1);
        assert!(hm1[10 * 16 + 6] > 0.5 && hm1[10 * 16 + 6] < 1.0);
        assert!(
            t.heatmap[..3 * plane].iter().all(|&v| v == 0.0),
            "other maps stay empty"
        );
        let boxes = &t.boxes[4 * plane..];
        let at = |c: usize| boxes[c * plane + peak];
        assert_eq!([at(0), at(1), at(2), at(3)], [6.0, 6.0, 0.5, 0.5]);
        assert_eq!(t.mask[plane + peak], 1.0);
        assert_eq!(t.mask.iter().sum::<f32>(), 1.0);
    }

    #[test]
    fn objects_centred_outside_are_skipped_and_bad_classes_refused() {
        let anns = vec![vec![ann(60.0, 60.0, 90.0, 90.0, 0)]];
        let t = TargetMaps::build(&anns, 1, 64, 64).unwrap();
        assert_eq!(t.objects, 0);
        let bad = vec![vec![ann(0.0, 0.0, 8.0, 8.0, 3)]];
        assert!(matches!(
            TargetMaps::build(&bad, 3, 64, 64),
            Err(DetectorError::AnnotationClass { class: 3, .. })
        ));
    }
}
