//! Dependency-free SVG latency plots for `gyre-bench` reports.
//!
//! Owns the rendering of one SVG file with a shared legend and two stacked
//! panels: "Latency by percentile" (x: percentile on an HdrHistogram-style log
//! scale of 1/(1-q)) and "Latency over time" (x: seconds since the measured
//! start), each with optional horizontal limit lines of its own. Sampling
//! histograms and choosing what to plot (limits included) is the caller's
//! job; this module maps numbers to pixels and text.
//!
//! Invariant: `render_svg` returns a self-contained, valid SVG 1.1 document
//! for any input. Every piece of text is XML-escaped and every number written
//! is finite: non-finite or out-of-range inputs are dropped (a dropped point
//! breaks an over-time line), latencies are clamped to `0..=1e12` µs, and to a
//! floor of 1 µs on a log axis. Lines never leave their plot area.

use std::fmt::Write;

pub struct Series {
    pub label: String,
    /// (quantile in [0,1), latency in µs), ascending by quantile.
    pub percentiles: Vec<(f64, f64)>,
    /// (seconds since start, latency in µs or None for an interval with no samples).
    pub over_time: Vec<(f64, Option<f64>)>,
}

pub struct Plot<'a> {
    pub title: &'a str,
    /// Label of the over-time metric, e.g. "p99.9 per 1 s interval".
    pub over_time_label: &'a str,
    pub series: &'a [Series],
    /// Optional horizontal limit lines on the percentile panel: (label, µs),
    /// e.g. ("SLA p99.9 < 1 ms", 1000.0); only limits on what that panel
    /// shows (the caller's choice).
    pub percentile_limits: &'a [(String, f64)],
    /// The same on the over-time panel.
    pub over_time_limits: &'a [(String, f64)],
}

const W: f64 = 960.0;
const PANEL_H: f64 = 420.0;
const PALETTE: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const GRID: &str = r##"stroke="#e4e4e4""##;
const LOG_FLOOR_US: f64 = 1.0;
const MAX_US: f64 = 1e12;
/// The percentile axis stops at 99.9999999% (nine nines).
const MAX_NINES: f64 = 9.0;

/// The quantiles to sample a histogram at for panel 1, ascending.
pub fn percentile_points() -> Vec<f64> {
    vec![
        0.0, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.997, 0.999, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999,
    ]
}

/// Renders the whole document; see the module invariant.
pub fn render_svg(plot: &Plot<'_>) -> String {
    let mut out = String::new();
    // Shared legend under the title, wrapped into rows.
    let mut legend = String::new();
    let (mut lx, mut ly) = (20.0, 52.0);
    for (i, s) in plot.series.iter().enumerate() {
        let w = 34.0 + 7.0 * s.label.chars().count() as f64;
        if lx + w > W - 20.0 && lx > 20.0 {
            (lx, ly) = (20.0, ly + 20.0);
        }
        let c = PALETTE[i % PALETTE.len()];
        line(&mut legend, [lx, ly - 4.0, lx + 20.0, ly - 4.0], &format!(r#"stroke="{c}" stroke-width="3""#));
        text(&mut legend, lx + 26.0, ly, "start", "", &s.label);
        lx += w;
    }
    let top = ly + 16.0;
    let h = top + 2.0 * PANEL_H;
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#,
        w = num(W),
        h = num(h)
    );
    out.push_str("\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    text(&mut out, W / 2.0, 26.0, "middle", r#" font-size="18" font-weight="bold""#, plot.title);
    let _ = writeln!(out, "\n<g class=\"legend\">{legend}</g>");

    // Panel 1: x is log10(1/(1-q)), i.e. the number of nines.
    let nines = |q: f64| (-(1.0 - q).log10()).min(MAX_NINES);
    let valid_q = |q: f64| (0.0..1.0).contains(&q);
    let pct: Vec<Vec<Vec<(f64, f64)>>> = (plot.series.iter())
        .map(|s| {
            let pts = s.percentiles.iter().filter(|(q, v)| valid_q(*q) && v.is_finite());
            vec![pts.map(|&(q, v)| (nines(q), lat(v))).collect()]
        })
        .collect();
    let max_x = pct.iter().flatten().flatten().map(|p| p.0).fold(f64::NAN, f64::max);
    let k = if max_x.is_finite() { (max_x - 1e-6).ceil().clamp(1.0, MAX_NINES) } else { 5.0 };
    let x = Axis { lo: 0.0, hi: k, log: false, ticks: (0..=k as usize).map(|i| i as f64).collect() };
    let ys = pct.iter().flatten().flatten().map(|p| p.1);
    let y = Axis::latency(ys.chain(plot.percentile_limits.iter().map(|l| l.1)));
    let y_label = format!("Latency ({})", y.unit());
    let axes = [(&x, "Percentile", &nines_label as &dyn Fn(f64) -> String), (&y, &y_label, &fmt_us)];
    panel(&mut out, top, "Latency by percentile", axes, plot.percentile_limits, &pct, "pct");

    // Panel 2: over time; None or a non-finite value breaks the line.
    let time: Vec<Vec<Vec<(f64, f64)>>> = (plot.series.iter())
        .map(|s| {
            let mut segs = vec![Vec::new()];
            for &(t, v) in &s.over_time {
                match (v.filter(|v| v.is_finite() && t.is_finite()), segs.last_mut()) {
                    (Some(v), Some(g)) => g.push((t.clamp(-1e9, 1e9), lat(v))),
                    _ => segs.push(Vec::new()),
                }
            }
            segs.retain(|g| !g.is_empty());
            segs
        })
        .collect();
    let ts = || time.iter().flatten().flatten().map(|p| p.0);
    let (t0, t1) = (ts().fold(0.0, f64::min), ts().fold(f64::NAN, f64::max));
    let x = Axis::linear(t0, if t1.is_finite() { t1 } else { 1.0 }, 8);
    let ys = time.iter().flatten().flatten().map(|p| p.1);
    let y = Axis::latency(ys.chain(plot.over_time_limits.iter().map(|l| l.1)));
    let y_label = format!("{} ({})", plot.over_time_label, y.unit());
    let axes = [(&x, "Time since start (s)", &trim as &dyn Fn(f64) -> String), (&y, &y_label, &fmt_us)];
    panel(&mut out, top + PANEL_H, "Latency over time", axes, plot.over_time_limits, &time, "time");
    out.push_str("</svg>\n");
    out
}

/// One panel: frame, grid, ticks, limit lines and, per series, its segments
/// (data coordinates) as polylines with markers on percentile points and on
/// lone points.
fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    [(x, x_label, x_fmt), (y, y_label, y_fmt)]: [AxisSpec<'_>; 2],
    limits: &[(String, f64)],
    lines: &[Vec<Vec<(f64, f64)>>],
    class: &str,
) {
    let (x0, x1, y0, y1) = (84.0, W - 30.0, top + 40.0, top + PANEL_H - 52.0);
    let px = |v: f64| x0 + x.frac(v) * (x1 - x0);
    let py = |v: f64| y1 - y.frac(v) * (y1 - y0);
    out.push_str("<g>\n");
    text(out, W / 2.0, top + 24.0, "middle", r#" font-size="15" font-weight="bold""#, title);
    for &t in &x.ticks {
        line(out, [px(t), y0, px(t), y1 + 4.0], GRID);
        text(out, px(t), y1 + 18.0, "middle", "", &x_fmt(t));
    }
    for &t in &y.ticks {
        line(out, [x0 - 4.0, py(t), x1, py(t)], GRID);
        text(out, x0 - 7.0, py(t) + 4.0, "end", "", &y_fmt(t));
    }
    let _ = writeln!(
        out,
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        num(x0),
        num(y0),
        num(x1 - x0),
        num(y1 - y0)
    );
    text(out, (x0 + x1) / 2.0, y1 + 40.0, "middle", "", x_label);
    let (ly, lx) = ((y0 + y1) / 2.0, 20.0);
    let rot = format!(r#" transform="rotate(-90 {} {})""#, num(lx), num(ly));
    text(out, lx, ly, "middle", &rot, y_label);
    if lines.iter().flatten().all(|g| g.is_empty()) {
        text(out, (x0 + x1) / 2.0, ly, "middle", r##" fill="#888""##, "no data");
    }
    for (i, segs) in lines.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        for g in segs.iter().filter(|g| !g.is_empty()) {
            let pts: Vec<String> = g.iter().map(|&(a, b)| format!("{},{}", num(px(a)), num(py(b)))).collect();
            let _ = write!(
                out,
                r#"<polyline class="{class}" fill="none" stroke="{c}" stroke-width="1.8" stroke-linejoin="round" points="{}"/>"#,
                pts.join(" ")
            );
            for &(a, b) in g.iter().filter(|_| class == "pct" || g.len() == 1) {
                let _ = write!(out, r#"<circle cx="{}" cy="{}" r="2.5" fill="{c}"/>"#, num(px(a)), num(py(b)));
            }
            out.push('\n');
        }
    }
    for (label, v) in limits.iter().filter(|l| l.1.is_finite()) {
        let p = py(lat(*v));
        line(out, [x0, p, x1, p], r##"stroke="#222" stroke-width="1.2" stroke-dasharray="6 4""##);
        let ty = if p - y0 < 16.0 { p + 14.0 } else { p - 5.0 };
        text(out, x0 + 6.0, ty, "start", r##" fill="#222""##, label);
    }
    out.push_str("</g>\n");
}

/// An axis, its title and its tick label format.
type AxisSpec<'a> = (&'a Axis, &'a str, &'a dyn Fn(f64) -> String);

/// A value axis from `lo` to `hi` (log10 or linear) with its tick values.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl Axis {
    /// Linear, widened to whole steps of 1, 2 or 5 × 10^n, about `target` ticks.
    fn linear(lo: f64, hi: f64, target: usize) -> Axis {
        let hi = if hi > lo { hi } else { lo + 1.0 };
        let raw = (hi - lo) / target as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let step = mag * [1.0, 2.0, 5.0, 10.0].into_iter().find(|&m| m * mag >= raw).unwrap_or(10.0);
        let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
        let n = ((hi - lo) / step).round().clamp(1.0, 100.0) as usize;
        Axis { lo, hi, log: false, ticks: (0..=n).map(|i| lo + i as f64 * step).collect() }
    }

    /// Log10 over whole decades, with 2 and 5 ticks when at most three decades.
    fn log(lo: f64, hi: f64) -> Axis {
        let e0 = lo.max(LOG_FLOOR_US).log10().floor() as i32;
        let e1 = (hi.log10().ceil() as i32).max(e0 + 1);
        let mults: &[f64] = if e1 - e0 <= 3 { &[1.0, 2.0, 5.0] } else { &[1.0] };
        let ticks = (e0..e1).flat_map(|e| mults.iter().map(move |m| m * 10f64.powi(e)));
        let ticks = ticks.chain([10f64.powi(e1)]).collect();
        Axis { lo: 10f64.powi(e0), hi: 10f64.powi(e1), log: true, ticks }
    }

    /// A latency axis (µs) over `values`: log when max/min exceeds 100x
    /// (min floored at 1 µs), else linear from 0.
    fn latency(values: impl Iterator<Item = f64>) -> Axis {
        let vals = values.filter(|v| v.is_finite()).map(lat);
        let (min, max) = vals.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
        if min.is_finite() && max / min.max(LOG_FLOOR_US) > 100.0 {
            Axis::log(min, max)
        } else {
            Axis::linear(0.0, max * 1.05, 6)
        }
    }

    fn unit(&self) -> &'static str {
        if self.log {
            "µs, log scale"
        } else {
            "µs"
        }
    }

    /// Position of `v` as a fraction of the axis, clamped to 0..=1.
    fn frac(&self, v: f64) -> f64 {
        let t = if self.log {
            (v.max(self.lo).log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        if t.is_finite() {
            t.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Clamps a latency into the plottable range.
fn lat(v: f64) -> f64 {
    v.clamp(0.0, MAX_US)
}

/// A pixel coordinate, one decimal; never NaN/inf.
fn num(v: f64) -> String {
    format!("{:.1}", if v.is_finite() { v } else { 0.0 })
}

/// Up to three decimals, trailing zeros dropped: 1.5, 250, 0.125.
fn trim(v: f64) -> String {
    let s = format!("{:.3}", if v.is_finite() { v } else { 0.0 });
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// "250 µs", "1.5 ms", "2 s".
fn fmt_us(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{} s", trim(v / 1e6)),
        v if v >= 1e3 => format!("{} ms", trim(v / 1e3)),
        v => format!("{} µs", trim(v)),
    }
}

/// Tick label for `k` nines: 0%, 90%, 99%, 99.9%, ...
fn nines_label(k: f64) -> String {
    match k.round() as usize {
        0 => "0%".into(),
        1 => "90%".into(),
        k => format!("99{}{}%", if k > 2 { "." } else { "" }, "9".repeat(k - 2)),
    }
}

fn line(out: &mut String, [a, b, c, d]: [f64; 4], attrs: &str) {
    let _ = write!(out, r#"<line x1="{}" y1="{}" x2="{}" y2="{}" {attrs}/>"#, num(a), num(b), num(c), num(d));
}

fn text(out: &mut String, x: f64, y: f64, anchor: &str, attrs: &str, s: &str) {
    let _ = write!(out, r#"<text x="{}" y="{}" text-anchor="{anchor}"{attrs}>{}</text>"#, num(x), num(y), escape(s));
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if c.is_control() && c != '\t' && c != '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series whose percentiles span ~160x and whose over-time values are `t`.
    fn series(label: &str, scale: f64, t: &[Option<f64>]) -> Series {
        let percentiles = percentile_points().into_iter().map(|q| (q, scale * (1.0 + (1.0 - q).powf(-0.5))));
        let over_time = t.iter().enumerate().map(|(i, v)| (i as f64 * 0.5, *v)).collect();
        Series { label: label.into(), percentiles: percentiles.collect(), over_time }
    }

    fn render(series: &[Series], limits: &[(String, f64)]) -> String {
        render_svg(&Plot {
            title: "t",
            over_time_label: "p99.9 per 1 s interval",
            series,
            percentile_limits: limits,
            over_time_limits: limits,
        })
    }

    /// Coordinate counts of the polylines of one panel class, in order.
    fn polylines(svg: &str, class: &str) -> Vec<usize> {
        let points = |r: &str| r.split("points=\"").nth(1)?.split('"').next().map(|p| p.split_whitespace().count());
        svg.split(&format!(r#"<polyline class="{class}""#)).skip(1).map(|r| points(r).unwrap_or(0)).collect()
    }

    fn assert_sane(svg: &str) {
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        for bad in ["NaN", "inf", "<&"] {
            assert!(!svg.contains(bad), "{bad} in {svg}");
        }
    }

    /// `GYRE_PLOT_EXAMPLE=/tmp/plot_example.svg cargo test -p gyre-bench plot` writes this example.
    #[test]
    fn plot_is_sane_svg_with_legend_and_limits() {
        let wave = |k: f64| -> Vec<Option<f64>> {
            let v = |i: usize| k * (300.0 + 40.0 * (i as f64 * 0.7).sin() + if i == 20 { 900.0 } else { 0.0 });
            (0..30).map(|i| Some(v(i)).filter(|_| !(10..13).contains(&i))).collect()
        };
        let s = [series("gyre://127.0.0.1:7700", 30.0, &wave(1.0)), series("redis://127.0.0.1:6379", 12.0, &wave(0.6))];
        let svg = render(&s, &[("SLA p99.9 < 1 ms".into(), 1000.0)]);
        assert_sane(&svg);
        assert!(svg.contains(">gyre://127.0.0.1:7700</text>") && svg.contains(">redis://127.0.0.1:6379</text>"));
        assert!(svg.contains(PALETTE[0]) && svg.contains(PALETTE[1]));
        assert_eq!(svg.matches("SLA p99.9 &lt; 1 ms").count(), 2);
        for t in ["0%", "90%", "99.9%", "99.999%", "500 µs", "1 ms", "Time since start (s)"] {
            assert!(svg.contains(&format!(">{t}</text>")), "missing tick {t}");
        }
        if let Ok(path) = std::env::var("GYRE_PLOT_EXAMPLE") {
            std::fs::write(path, &svg).expect("write example");
        }
    }

    #[test]
    fn plot_escapes_labels() {
        let (s, limits) = ([series("x<&>\"'y", 1.0, &[])], [("l<&>".to_string(), 5.0)]);
        let svg = render_svg(&Plot {
            title: "<T&>",
            over_time_label: "a<b",
            series: &s,
            percentile_limits: &limits,
            over_time_limits: &limits,
        });
        assert_sane(&svg);
        assert!(svg.contains("x&lt;&amp;&gt;&quot;&apos;y") && svg.contains("&lt;T&amp;&gt;"));
        assert!(svg.contains("a&lt;b") && svg.contains("l&lt;&amp;&gt;"));
    }

    #[test]
    fn plot_edge_cases_have_no_nan_or_inf() {
        let mk = |percentiles: Vec<(f64, f64)>, over_time| Series { label: "s".into(), percentiles, over_time };
        let cases = [
            vec![],
            vec![mk(vec![], vec![])],
            vec![mk(vec![(0.5, 7.0)], vec![(2.0, Some(7.0))])],
            vec![mk(vec![(0.0, 5.0), (0.9, 5.0)], vec![(0.0, Some(5.0)); 3])],
            vec![mk(vec![(0.0, 0.0), (0.999, 5e3)], vec![(0.0, Some(0.0)), (1.0, Some(1e4))])],
            vec![mk(
                vec![(f64::NAN, 1.0), (1.0, 5.0), (0.5, f64::INFINITY), (0.9, -3.0), (0.999_999_999_999, 1e300)],
                vec![(f64::NAN, Some(1.0)), (1.0, Some(f64::NAN)), (f64::INFINITY, None), (3.0, Some(-1.0))],
            )],
        ];
        for s in &cases {
            for limits in [vec![], vec![("z".to_string(), 0.0), ("n".to_string(), f64::NAN)]] {
                assert_sane(&render(s, &limits));
            }
        }
        assert_eq!(render(&[], &[]).matches("no data").count(), 2);
        let one = render(&cases[2], &[]);
        assert_eq!((polylines(&one, "pct"), polylines(&one, "time")), (vec![1], vec![1]));
        assert_eq!(one.matches("<circle").count(), 2, "lone points get markers");
    }

    #[test]
    fn plot_polyline_has_one_coordinate_per_point_and_none_splits() {
        let svg =
            render(&[series("a", 10.0, &[Some(1.0), Some(2.0), None, Some(3.0), Some(2.0), Some(1.0), None])], &[]);
        assert_eq!(polylines(&svg, "pct"), vec![percentile_points().len()]);
        assert_eq!(polylines(&svg, "time"), vec![2, 3]);
    }

    #[test]
    fn plot_log_axis_when_spread_exceeds_100x() {
        assert!(Axis::latency([0.0, 101.0].into_iter()).log, "0 clamps to the 1 µs floor");
        assert!(!Axis::latency([10.0, 1000.0].into_iter()).log);
        assert!(!Axis::latency([5.0; 3].into_iter()).log);
        let svg = render(&[series("a", 10.0, &[Some(50.0), Some(60.0)])], &[]);
        assert_eq!(svg.matches("log scale").count(), 1, "percentiles span > 100x, over-time does not");
        let log = Axis::latency([3.0, 500.0].into_iter());
        assert_eq!((log.lo, log.hi, log.ticks.len()), (1.0, 1e3, 10));
        let labels = [fmt_us(250.0), fmt_us(1500.0), fmt_us(2e6), nines_label(3.0)];
        assert_eq!(labels, ["250 µs", "1.5 ms", "2 s", "99.9%"]);
    }
}
