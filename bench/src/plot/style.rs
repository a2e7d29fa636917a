//! What every plot shares: the font, text sizes and colours.

use super::PlotError;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::sync::OnceLock;

/// Liberation Sans Regular (SIL Open Font License 1.1; `assets/OFL.txt`).
static FONT: &[u8] = include_bytes!("../../assets/LiberationSans-Regular.ttf");

/// The family name the plots ask for.
pub const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters once.
pub fn init_font() -> Result<(), PlotError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        register_font(FAMILY, FontStyle::Normal, FONT).is_ok()
            && register_font(FAMILY, FontStyle::Bold, FONT).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// A plot's title.
pub fn title() -> TextStyle<'static> {
    (FAMILY, 26).into_font().into()
}

/// A panel's caption.
pub fn caption() -> TextStyle<'static> {
    (FAMILY, 21).into_font().into()
}

/// Axis descriptions.
pub fn axis_desc() -> TextStyle<'static> {
    (FAMILY, 18).into_font().into()
}

/// Tick labels.
pub fn ticks() -> TextStyle<'static> {
    (FAMILY, 15).into_font().into()
}

/// Legend entries and annotations.
pub fn legend() -> TextStyle<'static> {
    (FAMILY, 15).into_font().into()
}

/// The colour of series `i`: a palette that stays apart on white (Tableau 10).
pub fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    PALETTE[i % PALETTE.len()]
}

/// `12345.0` as `12.3k`, `1234567.0` as `1.23M`, smaller numbers with a
/// decimal under 100; trailing zeros after the point dropped (`10k`, `2`).
pub fn short_number(v: f64) -> String {
    let (s, unit) = if v >= 1e6 {
        (format!("{:.2}", v / 1e6), "M")
    } else if v >= 1e4 {
        (format!("{:.1}", v / 1e3), "k")
    } else if v >= 100.0 {
        (format!("{v:.0}"), "")
    } else {
        (format!("{v:.1}"), "")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{unit}")
}

/// A log axis's tick label: only at 1, 2 and 5 times a power of ten (the
/// other ticks keep their grid line), as [`short_number`] with `suffix`.
pub fn log_tick(v: f64, suffix: &str) -> String {
    if v <= 0.0 {
        return String::new();
    }
    let m = v / 10f64.powf(v.log10().floor());
    if [1.0, 2.0, 5.0, 10.0]
        .iter()
        .any(|k| (m - k).abs() < 1e-6 * k)
    {
        format!("{}{suffix}", short_number(v))
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_font_loads_and_numbers_shorten() {
        init_font().unwrap();
        assert_eq!(short_number(96674.0), "96.7k");
        assert_eq!(short_number(3231.4), "3231");
        assert_eq!(short_number(43.26), "43.3");
        assert_eq!(short_number(2_500_000.0), "2.5M");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(10_000.0), "10k");
        assert_eq!(short_number(39.0), "39");
        assert_eq!(log_tick(20.0, "x"), "20x");
        assert_eq!(log_tick(200.0, ""), "200");
        assert_eq!(log_tick(30.0, "x"), "");
        assert_eq!(log_tick(1000.0, ""), "1000");
    }
}
