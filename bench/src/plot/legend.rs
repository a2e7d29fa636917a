//! A legend drawn in an area of its own, below a figure's panels: for figures
//! whose panels share their series.

use super::{DrawError, style};
use plotters::coord::Shift;
use plotters::prelude::*;

/// How an entry's sample looks.
#[derive(Debug, Clone, Copy)]
pub enum Mark {
    /// A line with a dot.
    Line(RGBColor),
    /// A filled box.
    Bar(RGBColor),
    /// A filled box in a light tint.
    LightBar(RGBColor),
    /// A black triangle.
    Triangle,
    /// A black cross.
    Cross,
}

/// Rows of the legend at `columns` entries a row.
pub fn rows(entries: usize, columns: usize) -> usize {
    entries.div_ceil(columns.max(1))
}

/// The height a legend of `entries` at `columns` a row needs, in pixels.
pub fn height(entries: usize, columns: usize) -> u32 {
    rows(entries, columns) as u32 * 24 + 12
}

/// Draws `entries` into `area`, `columns` a row.
pub fn draw(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    entries: &[(Mark, String)],
    columns: usize,
) -> Result<(), DrawError> {
    let (w, _) = area.dim_in_pixel();
    let col_w = (w as i32 - 40) / columns.max(1) as i32;
    for (i, (mark, text)) in entries.iter().enumerate() {
        let x = 30 + (i % columns.max(1)) as i32 * col_w;
        let y = 12 + (i / columns.max(1)) as i32 * 24;
        match *mark {
            Mark::Line(c) => {
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 28, y)],
                    c.stroke_width(3),
                ))?;
                area.draw(&Circle::new((x + 14, y), 4, c.filled()))?;
            }
            Mark::Bar(c) => {
                area.draw(&Rectangle::new([(x, y - 7), (x + 28, y + 7)], c.filled()))?
            }
            Mark::LightBar(c) => {
                area.draw(&Rectangle::new(
                    [(x, y - 7), (x + 28, y + 7)],
                    tint(c).filled(),
                ))?;
                area.draw(&Rectangle::new(
                    [(x, y - 7), (x + 28, y + 7)],
                    c.stroke_width(1),
                ))?;
            }
            Mark::Triangle => area.draw(&TriangleMarker::new((x + 14, y), 7, BLACK.filled()))?,
            Mark::Cross => area.draw(&Cross::new((x + 14, y), 6, BLACK.stroke_width(2)))?,
        }
        area.draw(&Text::new(text.clone(), (x + 36, y - 8), style::legend()))?;
    }
    Ok(())
}

/// `c` mixed with two parts of white.
pub fn tint(c: RGBColor) -> RGBColor {
    let t = |v: u8| ((u16::from(v) + 2 * 255) / 3) as u8;
    RGBColor(t(c.0), t(c.1), t(c.2))
}
