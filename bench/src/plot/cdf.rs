//! Figure 2: the remote fault latency distribution (CDF), with the fabric's
//! round trips and the measured floors marked.

use super::{PlotError, render, style};
use crate::data::Latencies;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::Path;

/// Draws `l` into the PNG at `path`.
pub fn draw(path: &Path, l: &Latencies) -> Result<(), PlotError> {
    let xs = l
        .curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .chain(l.floors.iter().map(|f| f.1))
        .filter(|x| *x > 0.0);
    let (lo, hi) = xs.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    // From a power of ten, so the 1-2-5 ticks fall on the axis.
    let (lo, hi) = if hi > 0.0 {
        (10f64.powf((lo * 0.9).log10().floor()), hi * 1.4)
    } else {
        (1.0, 1000.0)
    };
    render(path, (1100, 680), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "Remote fault latency distribution and its floor",
                style::title(),
            )
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(72)
            .build_cartesian_2d((lo..hi).log_scale(), 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc("latency (µs, log scale)")
            .y_desc("share of operations at or below (CDF)")
            .x_labels(30)
            .x_label_formatter(&|x| style::log_tick(*x, ""))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .label_style(style::ticks())
            .axis_desc_style(style::axis_desc())
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, c) in l.curves.iter().enumerate() {
            let color = style::color(i);
            let width = if i == 0 { 4 } else { 2 };
            chart
                .draw_series(LineSeries::new(c.points.clone(), color.stroke_width(width)))?
                .label(c.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(width))
                });
        }
        for (i, (label, x)) in l.floors.iter().enumerate() {
            let color = if i == 0 { BLACK } else { style::color(7) };
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(*x, 0.0), (*x, 1.0)],
                    8,
                    5,
                    color.stroke_width(2),
                ))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 24, y)], 6, 3, color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
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
        let cdf = |from: f64| Curve {
            label: format!("from {from}"),
            points: (0..=20)
                .map(|i| (from * 1.1f64.powi(i), f64::from(i) / 20.0))
                .collect(),
        };
        let l = Latencies {
            curves: vec![cdf(30.0), cdf(15.0)],
            floors: vec![("floor".into(), 14.0)],
        };
        let dir = test_util::dir("cdf");
        let path = dir.join("cdf.png");
        draw(&path, &l).unwrap();
        assert_eq!(test_util::assert_png(&path), (1100, 680));
        // With no data at all it still draws (empty axes).
        draw(
            &path,
            &Latencies {
                curves: vec![],
                floors: vec![],
            },
        )
        .unwrap();
        test_util::assert_png(&path);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
