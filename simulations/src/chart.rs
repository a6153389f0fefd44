//! Line charts of a run's report as data ([`Chart`]) and their geometry ([`Frame`]: the plot
//! area, value-to-pixel mapping, ticks and legend place), shared by the two renderers so the
//! PNG (`chart_png`, drawn with the client's raster primitives) and the SVG (`chart_svg`)
//! show the same thing.

use crate::report::human_bytes;

/// Default size of a chart, in pixels.
pub const WIDTH: u32 = 720;
pub const HEIGHT: u32 = 420;
/// Width of the legend to the right of the plot area.
const LEGEND: f64 = 170.0;

/// How tick labels of an axis are written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AxisFormat {
    Number,
    /// Byte counts as KiB / MiB.
    Bytes,
}

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (baselines) rather than solid (the federation).
    pub dashed: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_format: AxisFormat,
    /// The x range; `None`: from the data (from 0 for bytes).
    pub x_range: Option<(f64, f64)>,
    /// The y range; `None`: from the data.
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

/// The chart laid out on a `width x height` canvas.
pub struct Frame {
    pub width: f64,
    pub height: f64,
    pub left: f64,
    pub top: f64,
    pub right: f64,
    pub bottom: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Chart {
    pub fn frame(&self, width: u32, height: u32) -> Frame {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            if x.is_finite() && y.is_finite() {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if self.x_format == AxisFormat::Bytes {
            x0 = 0.0;
        }
        if let Some((lo, hi)) = self.x_range {
            (x0, x1) = (lo, hi);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        let (y0, y1) = self.y_range.unwrap_or(if y1 - y0 < 1e-12 {
            (y0 - 0.5, y1 + 0.5)
        } else {
            (y0, y1)
        });
        let (w, h) = (f64::from(width), f64::from(height));
        Frame {
            width: w,
            height: h,
            left: 64.0,
            top: 34.0,
            right: w - LEGEND,
            bottom: h - 46.0,
            x: (x0, x1),
            y: (y0, y1),
        }
    }
}

impl Frame {
    /// Pixel position of a data point.
    pub fn at(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0);
        (
            self.left + fx.clamp(0.0, 1.0) * (self.right - self.left),
            self.bottom - fy.clamp(0.0, 1.0) * (self.bottom - self.top),
        )
    }

    /// Five intervals on each axis: (pixel, label) pairs.
    pub fn x_ticks(&self, format: AxisFormat) -> Vec<(f64, String)> {
        let whole = self.x.0.fract() == 0.0 && self.x.1.fract() == 0.0;
        let values = if format == AxisFormat::Number && whole && self.x.1 - self.x.0 <= 12.0 {
            // Rounds: one tick per round.
            (self.x.0 as i64..=self.x.1 as i64)
                .map(|v| v as f64)
                .collect()
        } else {
            ticks(self.x)
        };
        values
            .into_iter()
            .map(|v| (self.at((v, self.y.0)).0, label(v, format)))
            .collect()
    }

    pub fn y_ticks(&self) -> Vec<(f64, String)> {
        ticks(self.y)
            .into_iter()
            .map(|v| (self.at((self.x.0, v)).1, label(v, AxisFormat::Number)))
            .collect()
    }

    /// Top-left corner of legend entry `i`.
    pub fn legend_entry(&self, i: usize) -> (f64, f64) {
        (self.right + 14.0, self.top + 4.0 + i as f64 * 16.0)
    }
}

fn ticks((lo, hi): (f64, f64)) -> Vec<f64> {
    (0..=5)
        .map(|k| lo + (hi - lo) * f64::from(k) / 5.0)
        .collect()
}

fn label(v: f64, format: AxisFormat) -> String {
    match format {
        AxisFormat::Bytes => human_bytes(v.max(0.0).round() as u64),
        AxisFormat::Number if (v - v.round()).abs() < 1e-9 => format!("{}", v.round()),
        AxisFormat::Number => format!("{v:.2}"),
    }
}

/// The highest y of any point of `series` (0 when there is none or all are below 0).
pub fn top_y(series: &[Series]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
}

/// Colour of series `i` (the client's palette).
pub fn color(i: usize) -> [u8; 3] {
    fedinspect_client::eval::draw::PALETTE[i % fedinspect_client::eval::draw::PALETTE.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_map_into_the_plot_area_with_the_y_range_given() {
        let c = Chart {
            title: "t".into(),
            x_label: "round".into(),
            y_label: "map".into(),
            x_format: AxisFormat::Number,
            x_range: None,
            y_range: Some((0.0, 1.0)),
            series: vec![Series {
                name: "a".into(),
                points: vec![(0.0, 0.0), (4.0, 0.5)],
                dashed: false,
            }],
        };
        let f = c.frame(WIDTH, HEIGHT);
        assert_eq!(f.at((0.0, 0.0)), (f.left, f.bottom));
        let (x, y) = f.at((4.0, 1.0));
        assert_eq!((x, y), (f.right, f.top));
        let ticks = f.x_ticks(AxisFormat::Number);
        let labels: Vec<&str> = ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(labels, ["0", "1", "2", "3", "4"], "one tick per round");
        assert_eq!(f.y_ticks().len(), 6);
    }
}
