//! `cargo xtask bench-table FILE --svg OUT`: the README's two bench tables
//! as one SVG picture. One band per kernel, one row per queues/fio jobs and
//! job (the tables' rows, in their order); on the left our IOPS divided by
//! null_blk's and by libublk's best mode (bars from 1.0, log scale), on the
//! right CPU time per I/O of null_blk, ours and libublk's best mode.
//!
//! Drawn with plotters' SVG backend alone: text goes into the SVG as
//! `<text>` elements and is laid out by whoever shows the picture, so no
//! font files or font libraries are needed to draw it.

use std::ops::Range;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::bench::Point;

const NULL_BLK: RGBColor = RGBColor(140, 140, 140);
const OURS: RGBColor = RGBColor(31, 119, 180);
const LIBUBLK: RGBColor = RGBColor(255, 127, 14);
const FONT: &str = "sans-serif";

/// Pixels per table row, above the title, below each band's plot (x axis).
const ROW_H: u32 = 22;
const HEAD_H: u32 = 100;
const AXIS_H: u32 = 44;
const CAPTION_H: u32 = 30;
const WIDTH: u32 = 1100;
/// The row labels, left of the first column.
const LABEL_W: u32 = 190;

/// The rows of one band as a y axis: row 0 at the top, each row one unit
/// high and centred on its index.
struct Rows(usize);

impl Ranged for Rows {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    /// `limit` is (bottom, top) in pixels.
    fn map(&self, v: &f64, (bottom, top): (i32, i32)) -> i32 {
        let f = (v + 0.5) / self.0 as f64;
        (top as f64 + (bottom - top) as f64 * f).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _: H) -> Vec<f64> {
        (0..self.0).map(|i| i as f64).collect()
    }

    fn range(&self) -> Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}

/// The 1-2-5 steps from `lo` to `hi` (both already steps): the x axes' labels.
fn steps(lo: f64, hi: f64) -> Vec<f64> {
    let mut v = vec![];
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi * 1.001 {
        for m in [1.0, 2.0, 5.0] {
            let x = decade * m;
            if x >= lo * 0.999 && x <= hi * 1.001 {
                v.push(x);
            }
        }
        decade *= 10.0;
    }
    v
}

/// The 1-2-5 step at or below `x` (`down`) or at or above it.
fn step(x: f64, down: bool) -> f64 {
    let decade = 10f64.powf(x.log10().floor());
    let ms = [1.0, 2.0, 5.0, 10.0];
    if down {
        ms.iter().rev().map(|m| m * decade).find(|s| *s <= x * 1.0001).unwrap_or(decade)
    } else {
        ms.iter().map(|m| m * decade).find(|s| *s >= x * 0.9999).unwrap_or(10.0 * decade)
    }
}

/// "1" for 1.0, "0.5", "20": an axis label.
fn num(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0).then(|| a / b)
}

/// Range of a log axis holding `vals` with room around them (for the value
/// labels at the bars' ends), always including 1.0 when `one`.
fn log_range(vals: impl Iterator<Item = f64>, room: f64, one: bool, default: (f64, f64)) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in vals.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return default;
    }
    if one {
        lo = lo.min(1.0);
        hi = hi.max(1.0);
    }
    (step(lo / room, true), step(hi * room, false))
}

type Err = Box<dyn std::error::Error + Send + Sync>;

fn e<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow!("drawing the bench picture: {err}")
}

/// The picture of `points` (the tables' rows) as an SVG document;
/// `title` names the record it shows.
pub fn render(points: &[Point], title: &str) -> Result<String> {
    if points.is_empty() {
        anyhow::bail!("no bench rows to draw");
    }
    // Bands: one per kernel, rows in the tables' order.
    let mut bands: Vec<(&str, Vec<&Point>)> = vec![];
    for p in points {
        match bands.last_mut() {
            Some((k, rows)) if *k == p.kernel => rows.push(p),
            _ => bands.push((&p.kernel, vec![p])),
        }
    }
    let band_h = |n: usize| CAPTION_H + AXIS_H + ROW_H * n as u32;
    let height = HEAD_H + bands.iter().map(|(_, r)| band_h(r.len())).sum::<u32>() + 10;

    let ratios = points.iter().flat_map(|p| [ratio(p.iops_ours, p.iops_null_blk), ratio(p.iops_ours, p.iops_libublk)]).flatten();
    let (r_lo, r_hi) = log_range(ratios, 2.2, true, (0.5, 2.0));
    let cpus = points.iter().flat_map(|p| [p.cpu_null_blk, p.cpu_ours, p.cpu_libublk]).flatten();
    let has_cpu = points.iter().any(|p| p.cpu_ours.is_some() || p.cpu_null_blk.is_some() || p.cpu_libublk.is_some());
    let (c_lo, c_hi) = log_range(cpus, 1.15, false, (1.0, 10.0));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let (head, mut body) = root.split_vertically(HEAD_H);
        head_and_legend(&head, title, has_cpu).map_err(e)?;
        for (kernel, rows) in &bands {
            let (band, rest) = body.split_vertically(band_h(rows.len()));
            body = rest;
            if has_cpu {
                let (left, right) = band.split_horizontally(LABEL_W + (WIDTH - LABEL_W) / 2);
                ratio_panel(&left, kernel, rows, (r_lo, r_hi)).map_err(e)?;
                cpu_panel(&right, kernel, rows, (c_lo, c_hi)).map_err(e)?;
            } else {
                ratio_panel(&band, kernel, rows, (r_lo, r_hi)).map_err(e)?;
            }
        }
        root.present().map_err(e)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn head_and_legend(head: &Area, title: &str, has_cpu: bool) -> Result<(), Err> {
    let left = TextStyle::from((FONT, 20).into_font()).pos(Pos::new(HPos::Left, VPos::Top));
    head.draw(&Text::new(format!("ublk-null (ours) against null_blk and libublk, by kernel: {title}"), (12, 8), left))?;
    let small = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let y = 48;
    let mut x = 12;
    for (color, name) in [
        (NULL_BLK, "null_blk (the kernel's own, the upper bound)"),
        (OURS, "ublk-null (ours)"),
        (LIBUBLK, "libublk (its faster mode, sync or async)"),
    ] {
        head.draw(&Rectangle::new([(x, y - 7), (x + 14, y + 7)], color.filled()))?;
        head.draw(&Text::new(name, (x + 20, y), small.clone()))?;
        x += 20 + (name.chars().count() as i32) * 8 + 30;
    }
    let how = "our IOPS divided by the reference of the bar's colour (right of 1× = ours faster)";
    let how = if has_cpu { format!("Left: {how}. Right: CPU time per I/O of each (shorter = cheaper).") } else { format!("Bars: {how}.") };
    head.draw(&Text::new(how, (12, 78), small))?;
    Ok(())
}

fn label(p: &Point) -> String {
    format!("{}q/{}j  {}", p.queues, p.fio_jobs, p.job)
}

/// Thin lines between the queues/fio jobs blocks of a band.
fn separators(rows: &[&Point]) -> Vec<f64> {
    (1..rows.len())
        .filter(|&i| (rows[i].queues, rows[i].fio_jobs) != (rows[i - 1].queues, rows[i - 1].fio_jobs))
        .map(|i| i as f64 - 0.5)
        .collect()
}

fn ratio_panel(area: &Area, kernel: &str, rows: &[&Point], (lo, hi): (f64, f64)) -> Result<(), Err> {
    let n = rows.len();
    let mut chart = ChartBuilder::on(area)
        .margin_right(14)
        .margin_top(4)
        .caption(format!("{kernel}: our IOPS ÷ theirs (right of 1 = ours faster)"), (FONT, 16).into_font())
        .x_label_area_size(AXIS_H - 4)
        .y_label_area_size(LABEL_W)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(steps(lo, hi)), Rows(n))?;
    let labels: Vec<String> = rows.iter().map(|p| label(p)).collect();
    let ylab = |v: &f64| labels.get(v.round() as usize).cloned().unwrap_or_default();
    let xlab = |v: &f64| format!("{}×", num(*v));
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .y_label_formatter(&ylab)
        .x_label_formatter(&xlab)
        .label_style((FONT, 13))
        .x_desc("ours / null_blk, ours / libublk best (IOPS medians, log scale)")
        .axis_desc_style((FONT, 13))
        .draw()?;
    for y in separators(rows) {
        chart.draw_series(std::iter::once(PathElement::new(vec![(lo, y), (hi, y)], RGBColor(190, 190, 190))))?;
    }
    let value =
        |x: f64| TextStyle::from((FONT, 11).into_font()).pos(Pos::new(if x >= 1.0 { HPos::Left } else { HPos::Right }, VPos::Center));
    for (i, p) in rows.iter().enumerate() {
        let y = i as f64;
        for (j, (r, color)) in
            [(ratio(p.iops_ours, p.iops_null_blk), NULL_BLK), (ratio(p.iops_ours, p.iops_libublk), LIBUBLK)].into_iter().enumerate()
        {
            let Some(r) = r else { continue };
            let (y0, y1) = (y - 0.4 + 0.4 * j as f64, y - 0.4 + 0.4 * (j + 1) as f64 - 0.04);
            let end = r.clamp(lo, hi);
            chart.draw_series(std::iter::once(Rectangle::new([(1.0, y0), (end, y1)], color.filled())))?;
            let at = if r >= 1.0 { end * 1.03 } else { end / 1.03 };
            chart.draw_series(std::iter::once(Text::new(format!("{r:.2}"), (at, (y0 + y1) / 2.0), value(r))))?;
        }
    }
    chart.draw_series(std::iter::once(PathElement::new(vec![(1.0, -0.5), (1.0, n as f64 - 0.5)], BLACK.stroke_width(2))))?;
    Ok(())
}

fn cpu_panel(area: &Area, kernel: &str, rows: &[&Point], (lo, hi): (f64, f64)) -> Result<(), Err> {
    let n = rows.len();
    let mut chart = ChartBuilder::on(area)
        .margin_right(20)
        .margin_left(16)
        .margin_top(4)
        .caption(format!("{kernel}: CPU time per I/O (shorter is better)"), (FONT, 16).into_font())
        .x_label_area_size(AXIS_H - 4)
        .y_label_area_size(4)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(steps(lo, hi)), Rows(n))?;
    let none = |_: &f64| String::new();
    let xlab = |v: &f64| num(*v);
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .y_label_formatter(&none)
        .x_label_formatter(&xlab)
        .label_style((FONT, 13))
        .x_desc("µs of CPU per I/O: fio, kernel and server together (medians, log scale)")
        .axis_desc_style((FONT, 13))
        .draw()?;
    for y in separators(rows) {
        chart.draw_series(std::iter::once(PathElement::new(vec![(lo, y), (hi, y)], RGBColor(190, 190, 190))))?;
    }
    for (i, p) in rows.iter().enumerate() {
        let y = i as f64;
        for (j, (us, color)) in [(p.cpu_null_blk, NULL_BLK), (p.cpu_ours, OURS), (p.cpu_libublk, LIBUBLK)].into_iter().enumerate() {
            let Some(us) = us else { continue };
            let h = 0.8 / 3.0;
            let (y0, y1) = (y - 0.4 + h * j as f64, y - 0.4 + h * (j + 1) as f64 - 0.03);
            chart.draw_series(std::iter::once(Rectangle::new([(lo, y0), (us.clamp(lo, hi), y1)], color.filled())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two kernels, one row each with every target, one row without
    /// libublk, one without CPU samples.
    const RECORD: &str = r#"{"records":[
{"kernel":"6.1.187","target":"null_blk","queues":1,"job":"randread-4k-qd1","fio_jobs":1,"iops":[56000,57000,58000],"cpu":[0.97,0.97,0.98]},
{"kernel":"6.1.187","target":"ublk-null","queues":1,"job":"randread-4k-qd1","fio_jobs":1,"iops":[11000,12000,13000],"cpu":[1.2,1.2,1.2]},
{"kernel":"6.1.187","target":"libublk-sync","queues":1,"job":"randread-4k-qd1","fio_jobs":1,"iops":[8000],"cpu":[0.66]},
{"kernel":"6.1.187","target":"libublk-async","queues":1,"job":"randread-4k-qd1","fio_jobs":1,"iops":[7000],"cpu":[0.65]},
{"kernel":"6.1.187","target":"null_blk","queues":2,"job":"randwrite-4k-qd64","fio_jobs":2,"iops":[110000],"cpu":[1.77]},
{"kernel":"6.1.187","target":"ublk-null","queues":2,"job":"randwrite-4k-qd64","fio_jobs":2,"iops":[68000],"cpu":[1.77]},
{"kernel":"7.3.4+","target":"null_blk","queues":1,"job":"read-128k-qd16","fio_jobs":1,"iops":[31000]},
{"kernel":"7.3.4+","target":"ublk-null","queues":1,"job":"read-128k-qd16","fio_jobs":1,"iops":[36000]},
{"kernel":"7.3.4+","target":"libublk-async","queues":1,"job":"read-128k-qd16","fio_jobs":1,"iops":[4100]}
],"meta":[],"commands":{}}"#;

    /// Start and end tags balance, in order, and attributes are quoted.
    fn well_formed(svg: &str) {
        let mut stack: Vec<String> = vec![];
        let mut rest = svg;
        while let Some(at) = rest.find('<') {
            let end = rest[at..].find('>').expect("unclosed tag") + at;
            let tag = &rest[at + 1..end];
            rest = &rest[end + 1..];
            if tag.starts_with('?') || tag.starts_with('!') {
                continue;
            }
            assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in <{tag}>");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap_or("").to_string());
            }
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    #[test]
    fn renders_a_record() {
        let points = crate::bench::points_from_json(RECORD).unwrap();
        assert_eq!(points.len(), 3);
        assert_eq!(points[0].iops_libublk, 8000.0, "libublk's best mode is the faster one");
        assert_eq!(points[2].kernel, "7.3.4", "kernel names lose their + suffix");
        assert_eq!(points[2].cpu_ours, None);
        let svg = render(&points, "synthetic").unwrap();
        assert!(svg.trim_start().starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        well_formed(&svg);
        for text in [
            "6.1.187: our IOPS",
            "7.3.4: CPU time per I/O",
            "1q/1j  randread-4k-qd1",
            "2q/2j  randwrite-4k-qd64",
            "1q/1j  read-128k-qd16",
            "ublk-null (ours)",
            "null_blk",
            "libublk",
            "synthetic",
            "µs of CPU per I/O",
            // ours / null_blk and ours / libublk best of the first row
            "\n0.21\n",
            "\n1.50\n",
        ] {
            assert!(svg.contains(text), "no {text:?} in the picture");
        }
        assert!(svg.matches("<text").count() > 20);
        assert!(svg.matches("<rect").count() >= 8, "one bar per value");
    }

    #[test]
    fn axis_steps() {
        assert_eq!(steps(0.05, 20.0), vec![0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert_eq!(step(0.12 / 2.2, true), 0.05);
        assert_eq!(step(8.97 * 2.2, false), 20.0);
        assert_eq!(step(10.0, false), 10.0);
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(20.0), "20");
        assert!(render(&[], "x").is_err());
    }
}
