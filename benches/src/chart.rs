//! The phase-breakdown chart of the report (`benches/phases.png`): one horizontal bar per
//! variant of benchmark 2, split at the median of each phase timestamp.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One bar: a label and (phase, start ms, end ms) segments.
pub struct Bar {
    pub label: String,
    pub segments: Vec<(String, f64, f64)>,
}

/// TrueType fonts tried for the chart text (any one will do).
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a TrueType font as "sans-serif" (plotters' ab_glyph backend has no system fonts).
fn register_font() -> anyhow::Result<PathBuf> {
    for p in FONT_CANDIDATES {
        if let Ok(bytes) = std::fs::read(p) {
            // The font registry needs 'static bytes; the chart is drawn once per process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(PathBuf::from(p));
            }
        }
    }
    bail!(
        "no TrueType font found (tried {}); install fonts-dejavu-core",
        FONT_CANDIDATES.join(", ")
    )
}

/// Colours of successive phases.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
];

/// Draws `bars` as a horizontal stacked bar chart into `path` (PNG).
pub fn draw_phases(path: &Path, title: &str, bars: &[Bar]) -> anyhow::Result<()> {
    register_font()?;
    if bars.is_empty() {
        bail!("nothing to draw");
    }
    let x_max = bars
        .iter()
        .flat_map(|b| b.segments.iter().map(|s| s.2))
        .fold(1.0f64, f64::max)
        * 1.05;
    let mut phases: Vec<String> = Vec::new();
    for b in bars {
        for s in &b.segments {
            if !phases.contains(&s.0) {
                phases.push(s.0.clone());
            }
        }
    }
    let height = (120 + 70 * bars.len() as u32).max(60 + 24 * phases.len() as u32);
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    let e = |err: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {err:?}", path.display());
    root.fill(&WHITE).map_err(e)?;
    let (plot_area, legend_area) = root.split_horizontally(800);
    for (k, phase) in phases.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let y = 50 + 24 * k as i32;
        legend_area
            .draw(&Rectangle::new([(5, y), (21, y + 14)], colour.filled()))
            .map_err(e)?;
        legend_area
            .draw(&Text::new(phase.clone(), (28, y), ("sans-serif", 14)))
            .map_err(e)?;
    }
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(10)
        .build_cartesian_2d(0f64..x_max, 0f64..n)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc("ms since the start (medians)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    for (k, phase) in phases.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = bars
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                let y = n - 1.0 - i as f64;
                b.segments.iter().filter(|s| &s.0 == phase).map(move |s| {
                    Rectangle::new([(s.1, y + 0.1), (s.2.max(s.1), y + 0.6)], colour.filled())
                })
            })
            .collect();
        chart.draw_series(rects).map_err(e)?;
    }
    let labels: Vec<Text<'_, (f64, f64), String>> = bars
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let y = n - 1.0 - i as f64;
            let end = b.segments.last().map(|s| s.2).unwrap_or(0.0);
            Text::new(
                format!("{}: {end:.1} ms", b.label),
                (0.0, y + 0.92),
                ("sans-serif", 15),
            )
        })
        .collect();
    chart.draw_series(labels).map_err(e)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
