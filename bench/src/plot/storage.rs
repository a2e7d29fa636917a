//! Figure 3: the storage node against qemu-nbd: 4 KiB IOPS, 1 MiB throughput
//! and 4 KiB latency (p50 and p99), as grouped bars.

use super::legend::{self, Mark};
use super::{DrawError, PlotError, render, style};
use crate::data::{SERVERS, ServerFigures, Storage};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws `s` into the PNG at `path`.
pub fn draw(path: &Path, s: &Storage) -> Result<(), PlotError> {
    let small: Vec<_> = s.workloads.iter().filter(|w| w.1 <= 64 << 10).collect();
    let large: Vec<_> = s.workloads.iter().filter(|w| w.1 > 64 << 10).collect();
    let mut entries: Vec<(Mark, String)> = SERVERS
        .iter()
        .enumerate()
        .map(|(i, (_, l))| (Mark::Bar(style::color(i)), (*l).to_string()))
        .collect();
    entries.push((
        Mark::LightBar(style::color(7)),
        "light bar beside each: p99 latency".into(),
    ));
    let legend_h = legend::height(entries.len(), 4);
    render(path, (1400, 1000 + legend_h), |root| {
        let body = root.titled(
            "Storage node vs qemu-nbd (NBD, one client connection, page-cached file)",
            style::title(),
        )?;
        let h = body.dim_in_pixel().1;
        let (charts, bottom) = body.split_vertically(h - legend_h);
        let (top, lower) = charts.split_vertically(charts.dim_in_pixel().1 / 2);
        let (iops, tput) = top.split_horizontally(900);
        let names = |ws: &[&(String, u64, Vec<ServerFigures>)]| -> Vec<String> {
            ws.iter().map(|w| w.0.clone()).collect()
        };
        let values = |ws: &[&(String, u64, Vec<ServerFigures>)], f: fn(&ServerFigures) -> f64| {
            ws.iter()
                .map(|w| w.2.iter().map(f).collect())
                .collect::<Vec<Vec<f64>>>()
        };
        bars(
            root,
            &iops,
            "4 KiB random I/O: operations per second",
            "IOPS",
            &names(&small),
            &values(&small, |f| f.iops),
            None,
            false,
        )?;
        bars(
            root,
            &tput,
            "1 MiB sequential I/O: throughput",
            "MiB/s",
            &names(&large),
            &values(&large, |f| f.mib_per_s),
            None,
            false,
        )?;
        bars(
            root,
            &lower,
            "4 KiB random I/O: latency, submit to completion",
            "latency (µs)",
            &names(&small),
            &values(&small, |f| f.p50_us),
            Some(&values(&small, |f| f.p99_us)),
            true,
        )?;
        legend::draw(&bottom, &entries, 4)
    })
}

/// One panel of grouped bars: a group per workload, a bar per server (and,
/// with `light`, a lighter bar beside each for a second figure); `log` for a
/// log-scale value axis.
#[allow(clippy::too_many_arguments)]
fn bars(
    root: &Area<'_>,
    area: &Area<'_>,
    caption: &str,
    unit: &str,
    groups: &[String],
    values: &[Vec<f64>],
    light: Option<&[Vec<f64>]>,
    log: bool,
) -> Result<(), DrawError> {
    let all = || {
        values
            .iter()
            .chain(light.into_iter().flatten())
            .flatten()
            .copied()
    };
    let top = all().fold(1.0f64, f64::max);
    let n = groups.len().max(1) as f64;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, style::caption())
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(80);
    let panel = Panel {
        root,
        groups,
        values,
        light,
    };
    if log {
        let least = all().filter(|v| *v > 0.0).fold(top, f64::min);
        let lo = 10f64.powf((least / 1.5).log10().floor());
        let mut chart = builder.build_cartesian_2d(0f64..n, (lo..top * 3.0).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_labels(30)
            .y_desc(format!("{unit}, log scale"))
            .y_label_formatter(&|y| style::log_tick(*y, ""))
            .label_style(style::ticks())
            .axis_desc_style(style::axis_desc())
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        panel.fill(&mut chart, lo)
    } else {
        let mut chart = builder.build_cartesian_2d(0f64..n, 0f64..top * 1.15)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(unit)
            .y_label_formatter(&|y| style::short_number(*y))
            .label_style(style::ticks())
            .axis_desc_style(style::axis_desc())
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        panel.fill(&mut chart, 0.0)
    }
}

/// What one panel shows, drawn onto its chart by [`Panel::fill`].
struct Panel<'p, 'a> {
    root: &'p Area<'a>,
    groups: &'p [String],
    values: &'p [Vec<f64>],
    light: Option<&'p [Vec<f64>]>,
}

impl Panel<'_, '_> {
    /// Draws the bars from `base` up, their values above them and the groups'
    /// names under the axis.
    fn fill<'c, Y: Ranged<ValueType = f64>>(
        &self,
        chart: &mut ChartContext<'c, BitMapBackend<'c>, Cartesian2d<RangedCoordf64, Y>>,
        base: f64,
    ) -> Result<(), DrawError> {
        let stride = if self.light.is_some() { 2 } else { 1 };
        let per = self.values.first().map_or(1, Vec::len) * stride;
        let slot = 0.8 / per.max(1) as f64;
        for (g, row) in self.values.iter().enumerate() {
            for (k, &v) in row.iter().enumerate() {
                let color = style::color(k);
                let x0 = g as f64 + 0.1 + (k * stride) as f64 * slot;
                chart.draw_series([Rectangle::new(
                    [(x0, base), (x0 + slot * 0.9, v)],
                    color.filled(),
                )])?;
                let mut label_at = vec![(x0 + slot * 0.45, v)];
                if let Some(l) = self.light {
                    let (v2, x1) = (l[g][k], x0 + slot);
                    let corners = [(x1, base), (x1 + slot * 0.9, v2)];
                    chart.draw_series([
                        Rectangle::new(corners, legend::tint(color).filled()),
                        Rectangle::new(corners, color.stroke_width(1)),
                    ])?;
                    label_at.push((x1 + slot * 0.45, v2));
                }
                for (x, y) in label_at {
                    let (px, py) = chart.backend_coord(&(x, y));
                    self.root.draw(&Text::new(
                        style::short_number(y),
                        (px, py - 4),
                        style::ticks().pos(Pos::new(HPos::Center, VPos::Bottom)),
                    ))?;
                }
            }
        }
        // The groups' names under the axis, in the root area's pixels.
        for (g, name) in self.groups.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(g as f64 + 0.5, base));
            self.root.draw(&Text::new(
                name.clone(),
                (px, py + 10),
                style::axis_desc().pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::test_util;

    #[test]
    fn a_small_fixture_draws_a_decodable_png() {
        let fig = |k: f64| {
            SERVERS
                .iter()
                .enumerate()
                .map(|(i, (_, l))| ServerFigures {
                    server: (*l).into(),
                    iops: k * (i as f64 + 1.0) * 1000.0,
                    mib_per_s: k * 100.0,
                    p50_us: 40.0 * k,
                    p99_us: 90.0 * k,
                })
                .collect::<Vec<_>>()
        };
        let s = Storage {
            workloads: vec![
                ("randread_4k_qd1".into(), 4096, fig(1.0)),
                ("randread_4k_qd16".into(), 4096, fig(2.0)),
                ("seqread_1m_qd4".into(), 1 << 20, fig(3.0)),
            ],
        };
        let dir = test_util::dir("storage");
        let path = dir.join("storage.png");
        draw(&path, &s).unwrap();
        assert_eq!(test_util::assert_png(&path).0, 1400);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
