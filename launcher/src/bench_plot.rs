//! The PNG of `liftoff bench plot`: output tokens/s, TTFT p50 and inter-token latency p50
//! against concurrency, one line per run.

use crate::bench::Run;
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> Result<()> {
    let path = FONT_PATHS
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
        .ok_or_else(|| {
            anyhow!("no TrueType font found for the plot labels (install fonts-dejavu-core)")
        })?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("cannot load font {path}"))?;
    Ok(())
}

/// Draws the three panels into `out`.
pub fn draw(runs: &[Run], out: &std::path::Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(out, (1500, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 3));
    type Metric = fn(&crate::bench::Level) -> f64;
    let metrics: [(&str, Metric); 3] = [
        ("output tokens/s", |l| l.output_tokens_per_s),
        ("TTFT p50 (ms)", |l| l.ttft_ms.p50),
        ("inter-token latency p50 (ms)", |l| l.itl_ms.p50),
    ];
    let max_c = runs
        .iter()
        .flat_map(|r| r.levels.iter().map(|l| l.concurrency))
        .max()
        .unwrap_or(1) as f64;
    for (panel, (title, metric)) in panels.iter().zip(metrics) {
        let max_y = runs
            .iter()
            .flat_map(|r| r.levels.iter().map(metric))
            .fold(0.0, f64::max)
            * 1.15
            + 1e-9;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_c * 1.05, 0.0..max_y)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("concurrent requests")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, run) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = run
                .levels
                .iter()
                .map(|l| (l.concurrency as f64, metric(l)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                .map_err(|e| anyhow!("{e}"))?
                .label(run.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
