//! A [`Chart`] as an SVG document: plain text, no dependencies, readable in any browser and
//! in Markdown viewers that show images.

use std::fmt::Write as _;

use crate::chart::{color, Chart};

pub fn render(chart: &Chart, width: u32, height: u32) -> String {
    let f = chart.frame(width, height);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-size="14">{}</text>"#,
        f.left,
        escape(&chart.title)
    );
    for (x, label) in f.x_ticks(chart.x_format) {
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e1e1e1"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            f.top,
            f.bottom,
            f.bottom + 15.0,
            escape(&label)
        );
    }
    for (y, label) in f.y_ticks() {
        let _ = writeln!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e1e1e1"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            f.left,
            f.right,
            f.left - 6.0,
            y + 4.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="black"/>"#,
        f.left,
        f.top,
        f.right - f.left,
        f.bottom - f.top
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (f.left + f.right) / 2.0,
        f.bottom + 34.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        16.0,
        (f.top + f.bottom) / 2.0,
        16.0,
        (f.top + f.bottom) / 2.0,
        escape(&chart.y_label)
    );
    for (i, series) in chart.series.iter().enumerate() {
        let [r, g, b] = color(i);
        let stroke = format!("rgb({r},{g},{b})");
        let dash = if series.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let points: Vec<String> = series
            .points
            .iter()
            .map(|&p| {
                let (x, y) = f.at(p);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="2"{dash}/>"#,
            points.join(" ")
        );
        for &p in &series.points {
            let (x, y) = f.at(p);
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{stroke}"/>"#
            );
        }
        let (lx, ly) = f.legend_entry(i);
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly + 5.0,
            lx + 18.0,
            ly + 5.0,
            lx + 24.0,
            ly + 9.0,
            escape(&series.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
