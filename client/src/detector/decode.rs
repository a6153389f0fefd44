//! From head outputs to detections: sigmoid, 3x3 max-pool peak extraction (CenterNet's
//! replacement for NMS), top-k over all classes and cells, a score threshold, and boxes mapped
//! from output cells to input pixels and then through each image's letterbox.

use fedinspect_common::arch::OUTPUT_STRIDE;
use fedinspect_common::detection::{BBox, Detection, Letterbox};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::DetectorError;

/// How many detections to keep per image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecodeParams {
    /// At most this many peaks per image (over all classes).
    pub top_k: usize,
    /// Peaks scoring below this are dropped.
    pub score_threshold: f32,
}

impl Default for DecodeParams {
    /// The baseline's: 100 peaks, score 0.03 (low, so that AP sees the whole PR curve).
    fn default() -> Self {
        Self {
            top_k: 100,
            score_threshold: 0.03,
        }
    }
}

/// Detections per image from float32 heatmap logits `[N, C, h, w]` and boxes `[N, 4, h, w]`,
/// best first. `letterboxes[i]` maps image `i`'s input pixels back to the original image.
pub fn decode(
    heatmap_logits: &Tensor,
    boxes: &Tensor,
    letterboxes: &[Letterbox],
    params: &DecodeParams,
) -> Result<Vec<Vec<Detection>>, DetectorError> {
    let (n, classes, h, w) = heatmap_logits.size4()?;
    let bsize = boxes.size4()?;
    if bsize != (n, 4, h, w) || letterboxes.len() as i64 != n {
        return Err(DetectorError::Batch(format!(
            "heatmap {:?}, boxes {bsize:?} and {} letterboxes do not match",
            (n, classes, h, w),
            letterboxes.len()
        )));
    }
    let plane = h * w;
    let k = (params.top_k as i64).min(classes * plane);
    if n == 0 || k == 0 {
        return Ok(vec![Vec::new(); letterboxes.len()]);
    }
    let hm = heatmap_logits.f_sigmoid()?;
    let peaks = hm.f_max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)?;
    let hm = hm.f_mul(&hm.f_eq_tensor(&peaks)?.f_to_kind(Kind::Float)?)?;
    let (scores, index) = hm.f_view([n, classes * plane])?.f_topk(k, 1, true, true)?;
    let cell = index.f_remainder(plane)?;
    let gather_index = cell.f_unsqueeze(1)?.f_expand([n, 4, k], false)?;
    let picked = boxes
        .f_view([n, 4, plane])?
        .f_gather(2, &gather_index, false)?;

    let scores = to_vec::<f32>(&scores)?;
    let index = to_vec::<i64>(&index)?;
    let picked = to_vec::<f32>(&picked)?;
    let (k, plane, w) = (k as usize, plane as usize, w as usize);
    let s = OUTPUT_STRIDE as f32;
    let mut out = Vec::with_capacity(letterboxes.len());
    for (i, lb) in letterboxes.iter().enumerate() {
        let mut dets = Vec::new();
        for j in 0..k {
            let score = scores[i * k + j];
            if score < params.score_threshold {
                break;
            }
            let flat = index[i * k + j] as usize;
            let (class, cell) = (flat / plane, flat % plane);
            let (y, x) = ((cell / w) as f32, (cell % w) as f32);
            let v = |c: usize| picked[(i * 4 + c) * k + j];
            let (bw, bh) = (v(0).max(0.0) * s, v(1).max(0.0) * s);
            let (cx, cy) = ((x + v(2)) * s, (y + v(3)) * s);
            let input_box = BBox::new(cx - bw / 2.0, cy - bh / 2.0, cx + bw / 2.0, cy + bh / 2.0);
            dets.push(Detection {
                bbox: lb.to_original(&input_box),
                class: class as u32,
                score,
            });
        }
        out.push(dets);
    }
    Ok(out)
}

fn to_vec<T: tch::kind::Element + Default + Clone>(t: &Tensor) -> Result<Vec<T>, DetectorError> {
    let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut v = vec![T::default(); numel];
    t.f_copy_data(&mut v, numel)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits that are -10 everywhere except the given (class, y, x, logit) peaks.
    fn heatmap(classes: usize, h: usize, w: usize, peaks: &[(usize, usize, usize, f32)]) -> Tensor {
        let mut v = vec![-10f32; classes * h * w];
        for &(c, y, x, logit) in peaks {
            v[(c * h + y) * w + x] = logit;
        }
        Tensor::from_slice(&v).view([1, classes as i64, h as i64, w as i64])
    }

    #[test]
    fn finds_hand_made_peaks_with_boxes_and_letterbox() {
        let (h, w) = (16, 16);
        // Two objects: class 1 at cell (y 3, x 4), class 0 at cell (10, 12); a weaker
        // neighbour of the first peak that max-pooling must suppress.
        let hm = heatmap(2, h, w, &[(1, 3, 4, 3.0), (1, 3, 5, 1.0), (0, 10, 12, 0.0)]);
        let mut b = vec![0f32; 4 * h * w];
        let set = |b: &mut Vec<f32>, y: usize, x: usize, vals: [f32; 4]| {
            for (c, v) in vals.into_iter().enumerate() {
                b[(c * h + y) * w + x] = v;
            }
        };
        set(&mut b, 3, 4, [2.0, 4.0, 0.5, 0.25]);
        set(&mut b, 10, 12, [1.0, 1.0, 0.0, 0.0]);
        let boxes = Tensor::from_slice(&b).view([1, 4, h as i64, w as i64]);
        // Input 64x64 is a 2x downscale of a 128x128 original.
        let lb = Letterbox::fit(128, 128, 64);
        let dets = decode(&hm, &boxes, &[lb], &DecodeParams::default()).unwrap();
        assert_eq!(dets[0].len(), 2, "{:?}", dets[0]);
        let first = dets[0][0];
        assert_eq!(first.class, 1);
        assert!((first.score - 1.0 / (1.0 + (-3f32).exp())).abs() < 1e-6);
        // Centre (4.5, 3.25) cells = (18, 13) px, size 8x16 px; doubled in the original.
        let want = BBox::new(28.0, 10.0, 44.0, 42.0);
        for (got, want) in [
            (first.bbox.x1, want.x1),
            (first.bbox.y1, want.y1),
            (first.bbox.x2, want.x2),
            (first.bbox.y2, want.y2),
        ] {
            assert!((got - want).abs() < 1e-4, "{:?}", first.bbox);
        }
        assert_eq!(dets[0][1].class, 0);
        assert!((dets[0][1].score - 0.5).abs() < 1e-6);
    }

    #[test]
    fn threshold_and_top_k_limit_the_output() {
        let hm = heatmap(1, 8, 8, &[(0, 1, 1, 2.0), (0, 5, 5, 1.0), (0, 7, 1, -2.0)]);
        let boxes = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
        let lb = [Letterbox::identity(32, 32)];
        let strict = DecodeParams {
            top_k: 100,
            score_threshold: 0.5,
        };
        assert_eq!(decode(&hm, &boxes, &lb, &strict).unwrap()[0].len(), 2);
        let one = DecodeParams {
            top_k: 1,
            score_threshold: 0.0,
        };
        assert_eq!(decode(&hm, &boxes, &lb, &one).unwrap()[0].len(), 1);
    }
}
