//! Geometric transforms of a square sample and its boxes, as augmentation applies them: the
//! stride-aligned crop (the baseline's rule for which boxes survive), horizontal and vertical
//! flips, and quarter turns. Pixels and box edges move by the same formula, so a box keeps
//! covering exactly the pixels it covered.

use fedinspect_common::detection::{Annotation, BBox};

use super::planes::Planes;

/// The `size x size` window at `(x0, y0)`; boxes shift, those whose centre falls outside are
/// dropped, the rest are clipped to the window (the baseline's rule).
pub fn crop(
    planes: &Planes,
    annotations: &[Annotation],
    x0: usize,
    y0: usize,
    size: usize,
) -> (Planes, Vec<Annotation>) {
    assert!(
        x0 + size <= planes.width && y0 + size <= planes.height,
        "crop inside image"
    );
    let mut out = Planes::filled(size, size, planes.channels, 0);
    for c in 0..planes.channels {
        let src = planes.plane(c);
        let dst = out.plane_mut(c);
        for y in 0..size {
            let s = (y0 + y) * planes.width + x0;
            dst[y * size..(y + 1) * size].copy_from_slice(&src[s..s + size]);
        }
    }
    let (fx, fy, fs) = (x0 as f32, y0 as f32, size as f32);
    let anns = annotations
        .iter()
        .filter_map(|a| {
            let b = &a.bbox;
            let (x1, y1, x2, y2) = (b.x1 - fx, b.y1 - fy, b.x2 - fx, b.y2 - fy);
            let (cx, cy) = ((x1 + x2) / 2.0, (y1 + y2) / 2.0);
            let inside = (0.0..fs).contains(&cx) && (0.0..fs).contains(&cy);
            inside.then(|| Annotation {
                bbox: BBox::new(
                    x1.clamp(0.0, fs),
                    y1.clamp(0.0, fs),
                    x2.clamp(0.0, fs),
                    y2.clamp(0.0, fs),
                ),
                class: a.class,
            })
        })
        .collect();
    (out, anns)
}

/// Mirrors left-right: pixel `x` goes to `w - 1 - x`, a box edge `x` to `w - x`.
pub fn flip_horizontal(planes: &mut Planes, annotations: &mut [Annotation]) {
    let w = planes.width;
    planes
        .data
        .chunks_exact_mut(w)
        .for_each(|row| row.reverse());
    let fw = w as f32;
    for a in annotations {
        let b = a.bbox;
        a.bbox = BBox::new(fw - b.x2, b.y1, fw - b.x1, b.y2);
    }
}

/// Mirrors top-bottom: row `y` goes to `h - 1 - y`, a box edge `y` to `h - y`.
pub fn flip_vertical(planes: &mut Planes, annotations: &mut [Annotation]) {
    let (w, h) = (planes.width, planes.height);
    for c in 0..planes.channels {
        let plane = planes.plane_mut(c);
        for y in 0..h / 2 {
            let (top, bottom) = plane.split_at_mut((h - 1 - y) * w);
            top[y * w..(y + 1) * w].swap_with_slice(&mut bottom[..w]);
        }
    }
    let fh = h as f32;
    for a in annotations {
        let b = a.bbox;
        a.bbox = BBox::new(b.x1, fh - b.y2, b.x2, fh - b.y1);
    }
}

/// A quarter turn clockwise: pixel `(x, y)` of an `h`-row image goes to `(h - 1 - y, x)`, a
/// point `(x, y)` to `(h - y, x)`; width and height swap.
pub fn rotate_clockwise(planes: &Planes, annotations: &[Annotation]) -> (Planes, Vec<Annotation>) {
    let (w, h) = (planes.width, planes.height);
    let mut out = Planes::filled(h, w, planes.channels, 0);
    for c in 0..planes.channels {
        let src = planes.plane(c);
        let dst = out.plane_mut(c);
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            let nx = h - 1 - y;
            for (x, &v) in row.iter().enumerate() {
                dst[x * h + nx] = v;
            }
        }
    }
    let fh = h as f32;
    let anns = annotations
        .iter()
        .map(|a| {
            let b = a.bbox;
            Annotation {
                bbox: BBox::new(fh - b.y2, b.x1, fh - b.y1, b.x2),
                class: a.class,
            }
        })
        .collect();
    (out, anns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(x1: f32, y1: f32, x2: f32, y2: f32) -> Annotation {
        Annotation {
            bbox: BBox::new(x1, y1, x2, y2),
            class: 0,
        }
    }

    #[test]
    fn crop_keeps_centred_boxes_and_clips() {
        let p = Planes::filled(16, 16, 1, 0);
        let anns = [
            ann(2.0, 2.0, 6.0, 6.0),
            ann(6.0, 6.0, 14.0, 10.0),
            ann(0.0, 0.0, 3.0, 3.0),
        ];
        let (c, kept) = crop(&p, &anns, 4, 4, 8);
        assert_eq!((c.width, c.height), (8, 8));
        // Centre (0, 0) is inside [0, 8): kept and clipped; centre (6, 4) inside; the third's
        // centre (-2.5, -2.5) is outside.
        assert_eq!(kept, vec![ann(0.0, 0.0, 2.0, 2.0), ann(2.0, 2.0, 8.0, 6.0)]);
    }

    #[test]
    fn rotation_four_times_is_identity() {
        let mut p = Planes::filled(4, 4, 2, 0);
        p.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u8);
        let anns = vec![ann(0.0, 1.0, 2.0, 4.0)];
        let (mut q, mut a) = (p.clone(), anns.clone());
        for _ in 0..4 {
            (q, a) = rotate_clockwise(&q, &a);
        }
        assert_eq!((q, a), (p, anns));
    }
}
