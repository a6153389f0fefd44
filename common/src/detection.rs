//! The vocabulary of detection shared by data loading, the detector, evaluation and bundles:
//! boxes in pixel coordinates, ground-truth annotations, scored detections, and the letterbox
//! transform that maps between original image and network input coordinates.

use serde::{Deserialize, Serialize};

/// An axis-aligned box in pixel coordinates, corners `(x1, y1)` top-left and `(x2, y2)`
/// bottom-right, `x2 >= x1`, `y2 >= y1`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
}

impl BBox {
    pub fn new(x1: f32, y1: f32, x2: f32, y2: f32) -> Self {
        Self { x1, y1, x2, y2 }
    }

    pub fn width(&self) -> f32 {
        (self.x2 - self.x1).max(0.0)
    }

    pub fn height(&self) -> f32 {
        (self.y2 - self.y1).max(0.0)
    }

    pub fn area(&self) -> f32 {
        self.width() * self.height()
    }

    /// Intersection over union; 0 when either box is empty.
    pub fn iou(&self, other: &BBox) -> f32 {
        let iw = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let ih = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        let inter = iw * ih;
        let union = self.area() + other.area() - inter;
        if union <= 0.0 {
            0.0
        } else {
            inter / union
        }
    }
}

/// A ground-truth object: a box and a class index into the dataset's class names.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    pub bbox: BBox,
    pub class: u32,
}

/// A detector output: a box in original image coordinates, its class and score in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub bbox: BBox,
    pub class: u32,
    pub score: f32,
}

/// How an image of `orig_w x orig_h` was scaled by `scale` and padded by `(pad_x, pad_y)` to
/// fit the square network input; maps boxes both ways.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Letterbox {
    pub scale: f32,
    pub pad_x: f32,
    pub pad_y: f32,
    pub orig_w: u32,
    pub orig_h: u32,
}

impl Letterbox {
    /// The transform that fits `orig_w x orig_h` into `size x size`, keeping the aspect ratio
    /// and centring the image.
    pub fn fit(orig_w: u32, orig_h: u32, size: u32) -> Self {
        let scale = (size as f32 / orig_w as f32).min(size as f32 / orig_h as f32);
        let new_w = (orig_w as f32 * scale).round();
        let new_h = (orig_h as f32 * scale).round();
        Self {
            scale,
            pad_x: ((size as f32 - new_w) / 2.0).floor(),
            pad_y: ((size as f32 - new_h) / 2.0).floor(),
            orig_w,
            orig_h,
        }
    }

    /// The identity transform for an image already at network size.
    pub fn identity(w: u32, h: u32) -> Self {
        Self {
            scale: 1.0,
            pad_x: 0.0,
            pad_y: 0.0,
            orig_w: w,
            orig_h: h,
        }
    }

    /// Original image coordinates to network input coordinates.
    pub fn to_input(&self, b: &BBox) -> BBox {
        BBox {
            x1: b.x1 * self.scale + self.pad_x,
            y1: b.y1 * self.scale + self.pad_y,
            x2: b.x2 * self.scale + self.pad_x,
            y2: b.y2 * self.scale + self.pad_y,
        }
    }

    /// Network input coordinates back to original image coordinates, clipped to the image.
    pub fn to_original(&self, b: &BBox) -> BBox {
        let w = self.orig_w as f32;
        let h = self.orig_h as f32;
        BBox {
            x1: ((b.x1 - self.pad_x) / self.scale).clamp(0.0, w),
            y1: ((b.y1 - self.pad_y) / self.scale).clamp(0.0, h),
            x2: ((b.x2 - self.pad_x) / self.scale).clamp(0.0, w),
            y2: ((b.y2 - self.pad_y) / self.scale).clamp(0.0, h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_known_boxes() {
        let a = BBox::new(0.0, 0.0, 10.0, 10.0);
        assert_eq!(a.iou(&a), 1.0);
        let b = BBox::new(5.0, 0.0, 15.0, 10.0);
        assert!((a.iou(&b) - 50.0 / 150.0).abs() < 1e-6);
        assert_eq!(a.iou(&BBox::new(20.0, 20.0, 30.0, 30.0)), 0.0);
        assert_eq!(a.iou(&BBox::new(1.0, 1.0, 1.0, 5.0)), 0.0);
    }

    #[test]
    fn letterbox_round_trip() {
        let lb = Letterbox::fit(1280, 640, 640);
        assert_eq!(lb.scale, 0.5);
        assert_eq!(lb.pad_y, 160.0);
        let b = BBox::new(100.0, 50.0, 300.0, 250.0);
        let back = lb.to_original(&lb.to_input(&b));
        assert!((back.x1 - b.x1).abs() < 1e-3 && (back.y2 - b.y2).abs() < 1e-3);
    }
}
