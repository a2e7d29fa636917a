//! Figure 1: each workload's slowdown against the local cache's share of its
//! working set, one line per fabric, with LegoOS's published points.

use super::legend::{self, Mark};
use super::{DrawError, PlotError, render, style};
use crate::data::{Curve, SHARES, Slowdowns};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// LegoOS's published slowdowns, for orientation: Shan et al., "LegoOS: A
/// Disseminated, Distributed OS for Hardware Resource Disaggregation",
/// OSDI'18, §6: with an ExCache of about 25% of the working set, TensorFlow
/// (CIFAR-10 training) ran 1.68x and Phoenix (word count) 1.34x slower than on
/// a Linux server holding its whole working set. Different workloads, an
/// RDMA fabric and a hardware-emulating OS: a reference point, not a
/// comparison.
pub const LEGOOS: [(&str, f64, f64); 2] = [("TensorFlow", 25.0, 1.68), ("Phoenix", 25.0, 1.34)];

const PANEL: (u32, u32) = (560, 430);

/// Draws `s` into the PNG at `path`.
pub fn draw(path: &Path, s: &Slowdowns) -> Result<(), PlotError> {
    let n = s.workloads.len().max(1);
    let cols = n.min(3);
    let rows = n.div_ceil(cols);
    // Every fabric once, in the order first seen: its colour in every panel.
    let mut fabrics: Vec<String> = Vec::new();
    for (_, curves) in &s.workloads {
        for c in curves {
            if !fabrics.contains(&c.label) {
                fabrics.push(c.label.clone());
            }
        }
    }
    let mut entries: Vec<(Mark, String)> = fabrics
        .iter()
        .enumerate()
        .map(|(i, f)| (Mark::Line(style::color(i)), f.clone()))
        .collect();
    entries.push((
        Mark::Triangle,
        "LegoOS (OSDI'18, published): TensorFlow at ~25%".into(),
    ));
    entries.push((
        Mark::Cross,
        "LegoOS (OSDI'18, published): Phoenix at ~25%".into(),
    ));
    let legend_h = legend::height(entries.len(), 2);
    let size = (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + 50 + legend_h);
    render(path, size, |root| {
        let body = root.titled(
            "Slowdown against the local cache's share of the working set",
            style::title(),
        )?;
        let h = body.dim_in_pixel().1;
        let (panels, bottom) = body.split_vertically(h - legend_h);
        let areas = panels.split_evenly((rows, cols));
        for ((name, curves), area) in s.workloads.iter().zip(areas.iter()) {
            panel(area, name, curves, &fabrics)?;
        }
        legend::draw(&bottom, &entries, 2)
    })
}

/// x position of a cache share: 100% at 0, each halving one step right.
fn x_of(pct: f64) -> f64 {
    (100.0 / pct).log2()
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    workload: &str,
    curves: &[Curve],
    fabrics: &[String],
) -> Result<(), DrawError> {
    let top = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .chain(LEGOOS.iter().map(|l| l.2))
        .fold(2.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("workload: {workload}"), style::caption())
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.25f64..3.25f64, (0.8f64..top * 1.6).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&|x| {
            SHARES
                .iter()
                .find(|(_, p)| (x_of(*p) - x).abs() < 0.01)
                .map_or(String::new(), |(l, _)| l.to_string())
        })
        .y_labels(30)
        .y_label_formatter(&|y| style::log_tick(*y, "x"))
        .x_desc("local cache (share of the working set)")
        .y_desc("slowdown vs all-local (log scale)")
        .label_style(style::ticks())
        .axis_desc_style(style::axis_desc())
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for c in curves {
        let i = fabrics.iter().position(|f| *f == c.label).unwrap_or(0);
        let color = style::color(i);
        let pts: Vec<(f64, f64)> = c.points.iter().map(|&(p, y)| (x_of(p), y)).collect();
        chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))?;
    }
    for (name, pct, y) in LEGOOS {
        let p = (x_of(pct), y);
        if name == "TensorFlow" {
            chart.draw_series([TriangleMarker::new(p, 8, BLACK.filled())])?;
        } else {
            chart.draw_series([Cross::new(p, 7, BLACK.stroke_width(2))])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::test_util;

    #[test]
    fn a_small_fixture_draws_a_decodable_png() {
        let curve = |label: &str, k: f64| Curve {
            label: label.into(),
            points: SHARES
                .iter()
                .map(|&(_, p)| (p, 1.0 + k * (100.0 / p - 1.0)))
                .collect(),
        };
        let s = Slowdowns {
            workloads: vec![
                ("seq".into(), vec![curve("tcp", 1.0), curve("ideal", 0.5)]),
                (
                    "rand".into(),
                    vec![curve("tcp", 30.0), curve("ideal", 10.0)],
                ),
            ],
        };
        let dir = test_util::dir("slowdown");
        let path = dir.join("slowdown.png");
        draw(&path, &s).unwrap();
        assert_eq!(
            test_util::assert_png(&path),
            (2 * PANEL.0, PANEL.1 + 50 + legend::height(4, 2))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cache_shares_sit_one_step_apart() {
        assert_eq!(x_of(100.0), 0.0);
        assert_eq!(x_of(25.0), 2.0);
        assert_eq!(x_of(12.5), 3.0);
    }
}
