//! Raster primitives on an RGB image for plots and annotated images: clipped rectangles,
//! thick lines, bitmap-font text, and the per-class colour palette.

use image::{Rgb, RgbImage};

use super::font;

/// Distinct, print-friendly colours (Tableau 10); class `c` uses `PALETTE[c % 10]`.
pub const PALETTE: [[u8; 3]; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

pub fn class_color(class: u32) -> Rgb<u8> {
    Rgb(PALETTE[class as usize % PALETTE.len()])
}

/// Fills the pixels `x0..x1, y0..y1` that lie inside the image.
pub fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, color: Rgb<u8>) {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(x as u32, y as u32, color);
        }
    }
}

/// The outline of `x0..x1, y0..y1`, `thickness` pixels wide, growing inwards.
pub fn rect_outline(
    img: &mut RgbImage,
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    thickness: i64,
    color: Rgb<u8>,
) {
    let t = thickness.max(1);
    fill_rect(img, x0, y0, x1, y0 + t, color);
    fill_rect(img, x0, y1 - t, x1, y1, color);
    fill_rect(img, x0, y0, x0 + t, y1, color);
    fill_rect(img, x1 - t, y0, x1, y1, color);
}

/// A line from `(x0, y0)` to `(x1, y1)` drawn with a `width x width` pen (Bresenham).
pub fn line(
    img: &mut RgbImage,
    (x0, y0): (i64, i64),
    (x1, y1): (i64, i64),
    width: i64,
    color: Rgb<u8>,
) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    let half = (width.max(1) - 1) / 2;
    loop {
        fill_rect(
            img,
            x - half,
            y - half,
            x - half + width.max(1),
            y - half + width.max(1),
            color,
        );
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, each font pixel `scale` image pixels.
pub fn text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let s = i64::from(scale.max(1));
    for (i, c) in text.chars().enumerate() {
        let g = font::glyph(c);
        let gx = x + i as i64 * i64::from(font::ADVANCE) * s;
        for fy in 0..font::GLYPH_H {
            for fx in 0..font::GLYPH_W {
                if font::is_set(&g, fx, fy) {
                    let (px, py) = (gx + i64::from(fx) * s, y + i64::from(fy) * s);
                    fill_rect(img, px, py, px + s, py + s, color);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_drawing_stays_in_bounds() {
        let mut img = RgbImage::new(10, 10);
        let red = Rgb([255, 0, 0]);
        fill_rect(&mut img, -5, -5, 3, 3, red);
        line(&mut img, (-20, 5), (30, 5), 3, red);
        text(&mut img, 8, 8, "W", 2, red);
        rect_outline(&mut img, 2, 2, 8, 8, 1, red);
        assert_eq!(*img.get_pixel(0, 0), red);
        assert_eq!(*img.get_pixel(9, 5), red);
        assert_eq!(*img.get_pixel(5, 2), red);
        assert_eq!(*img.get_pixel(5, 8), Rgb([0, 0, 0]));
    }
}
