//! A [`Chart`] as a PNG, drawn with the client's raster primitives and bitmap font
//! (`fedinspect_client::eval::{draw, font}`, the ones its PR curves use).

use anyhow::Result;
use fedinspect_client::eval::plot::encode_png;
use fedinspect_client::eval::{draw, font};
use image::{Rgb, RgbImage};

use crate::chart::{color, Chart};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

pub fn render(chart: &Chart, width: u32, height: u32) -> Result<Vec<u8>> {
    let f = chart.frame(width, height);
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    let px = |v: f64| v.round() as i64;
    let (l, t, r, b) = (px(f.left), px(f.top), px(f.right), px(f.bottom));
    let title_scale = if i64::from(font::text_width(&chart.title, 2)) <= i64::from(width) - l {
        2
    } else {
        1
    };
    draw::text(&mut img, l, 10, &chart.title, title_scale, BLACK);
    for (x, label) in f.x_ticks(chart.x_format) {
        draw::line(&mut img, (px(x), t), (px(x), b), 1, GRID);
        let w = i64::from(font::text_width(&label, 1));
        draw::text(&mut img, px(x) - w / 2, b + 6, &label, 1, BLACK);
    }
    for (y, label) in f.y_ticks() {
        draw::line(&mut img, (l, px(y)), (r, px(y)), 1, GRID);
        let w = i64::from(font::text_width(&label, 1));
        draw::text(&mut img, l - w - 6, px(y) - 3, &label, 1, BLACK);
    }
    draw::rect_outline(&mut img, l, t, r + 1, b + 1, 1, BLACK);
    let xw = i64::from(font::text_width(&chart.x_label, 1));
    draw::text(
        &mut img,
        (l + r) / 2 - xw / 2,
        b + 24,
        &chart.x_label,
        1,
        BLACK,
    );
    // No rotated text in the bitmap font: the y label sits above the axis.
    draw::text(&mut img, 4, t - 12, &chart.y_label, 1, BLACK);
    for (i, series) in chart.series.iter().enumerate() {
        let c = Rgb(color(i));
        let pts: Vec<(i64, i64)> = series
            .points
            .iter()
            .map(|&p| {
                let (x, y) = f.at(p);
                (px(x), px(y))
            })
            .collect();
        for pair in pts.windows(2) {
            if series.dashed {
                dashed_line(&mut img, pair[0], pair[1], c);
            } else {
                draw::line(&mut img, pair[0], pair[1], 2, c);
            }
        }
        for &(x, y) in &pts {
            draw::fill_rect(&mut img, x - 2, y - 2, x + 3, y + 3, c);
        }
        let (lx, ly) = f.legend_entry(i);
        let (lx, ly) = (px(lx), px(ly));
        if series.dashed {
            dashed_line(&mut img, (lx, ly + 4), (lx + 18, ly + 4), c);
        } else {
            draw::line(&mut img, (lx, ly + 4), (lx + 18, ly + 4), 2, c);
        }
        draw::text(&mut img, lx + 24, ly + 1, &series.name, 1, BLACK);
    }
    Ok(encode_png(&img)?)
}

/// A 2-pixel line drawn as 6-pixel dashes with 4-pixel gaps.
fn dashed_line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let len = (((x1 - x0).pow(2) + (y1 - y0).pow(2)) as f64).sqrt();
    let steps = (len / 10.0).ceil().max(1.0) as i64;
    for k in 0..steps {
        let a = k as f64 * 10.0 / len;
        let e = ((k as f64 * 10.0 + 6.0) / len).min(1.0);
        let lerp = |f: f64| {
            (
                x0 + ((x1 - x0) as f64 * f).round() as i64,
                y0 + ((y1 - y0) as f64 * f).round() as i64,
            )
        };
        if a < 1.0 {
            draw::line(img, lerp(a), lerp(e), 2, c);
        }
    }
}
