//! Figure 4: a run with a memory node attached and another detached: pages
//! per node over time, with the events marked.

use super::{PlotError, render, style};
use crate::data::Timeline;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Draws `t` into the PNG at `path`.
pub fn draw(path: &Path, t: &Timeline) -> Result<(), PlotError> {
    let end = t
        .nodes
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .chain(t.events.iter().map(|e| e.0))
        .fold(1.0f64, f64::max);
    let top = t
        .nodes
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .fold(10.0f64, f64::max);
    render(path, (1200, 680), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Pages per memory node while one node is attached and another detached",
                style::title(),
            )
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(84)
            .build_cartesian_2d(0f64..end * 1.02, 0f64..top * 1.35)?;
        chart
            .configure_mesh()
            .x_desc("time since the VM started (s)")
            .y_desc("guest pages held (4 KiB each)")
            .y_label_formatter(&|y| style::short_number(*y))
            .label_style(style::ticks())
            .axis_desc_style(style::axis_desc())
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, c) in t.nodes.iter().enumerate() {
            let color = style::color(i);
            chart
                .draw_series(LineSeries::new(c.points.clone(), color.stroke_width(3)))?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });
        }
        // Each event: a dashed line, its text beside it at staggered heights.
        for (k, (at, what)) in t.events.iter().enumerate() {
            chart.draw_series(DashedLineSeries::new(
                vec![(*at, 0.0), (*at, top * 1.35)],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))?;
            let y = top * (1.30 - 0.07 * (k % 3) as f64);
            let (px, py) = chart.backend_coord(&(*at, y));
            let right_side = *at < end * 0.7;
            let (dx, h) = if right_side {
                (6, HPos::Left)
            } else {
                (-6, HPos::Right)
            };
            root.draw(&Text::new(
                format!("{what} ({at:.1} s)"),
                (px + dx, py),
                style::legend().pos(Pos::new(h, VPos::Center)),
            ))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::MiddleRight)
            .label_font(style::legend())
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .margin(12)
            .draw()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Curve;
    use crate::plot::test_util;

    #[test]
    fn a_small_fixture_draws_a_decodable_png() {
        let t = Timeline {
            nodes: vec![
                Curve {
                    label: "node A".into(),
                    points: (0..50)
                        .map(|i| (f64::from(i) / 10.0, f64::from(i * 100)))
                        .collect(),
                },
                Curve {
                    label: "node B".into(),
                    points: (20..50)
                        .map(|i| (f64::from(i) / 10.0, f64::from((i - 20) * 50)))
                        .collect(),
                },
            ],
            events: vec![(2.0, "attach B".into()), (4.0, "detach A".into())],
        };
        let dir = test_util::dir("timeline");
        let path = dir.join("timeline.png");
        draw(&path, &t).unwrap();
        assert_eq!(test_util::assert_png(&path), (1200, 680));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
