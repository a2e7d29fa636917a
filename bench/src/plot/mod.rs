//! The figures, drawn with `plotters` into PNG files; text is set in an
//! embedded font (Liberation Sans, SIL OFL 1.1, `bench/assets/`), so no
//! system font library is involved.

mod cdf;
mod legend;
mod slowdown;
mod storage;
mod style;
mod timeline;

use crate::data::{self, DataError};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The plots a full results directory has, with the JSON each is drawn from.
pub const PLOTS: [(&str, &[&str]); 4] = [
    ("slowdown.png", &[data::MEMORY_JSON]),
    (
        "fault_latency_cdf.png",
        &[data::MEMORY_JSON, data::FABRIC_JSON],
    ),
    ("storage.png", &[data::STORAGE_JSON]),
    ("timeline.png", &[data::TIMELINE_JSON]),
];

/// A drawing error of the bitmap backend.
pub type DrawError = DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The embedded font did not load.
    #[error("the embedded font does not load")]
    Font,
    /// The plot's input could not be read.
    #[error("cannot draw {plot}")]
    Data {
        /// The plot.
        plot: &'static str,
        /// Why.
        #[source]
        source: DataError,
    },
    /// Drawing or writing the PNG failed.
    #[error("cannot draw {path}")]
    Draw {
        /// The PNG file.
        path: PathBuf,
        /// Why.
        #[source]
        source: DrawError,
    },
    /// Some plots could not be drawn (each one's error is in the list).
    #[error("{} of the plots could not be drawn:{}", .0.len(), list(.0))]
    Several(Vec<PlotError>),
}

/// Each error with its causes, on a line of its own.
fn list(errors: &[PlotError]) -> String {
    let mut s = String::new();
    for e in errors {
        s.push_str("\n  ");
        s.push_str(&e.to_string());
        let mut cause = std::error::Error::source(e);
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
    }
    s
}

/// Draws into a new `width` × `height` PNG at `path` with `draw`.
pub fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), DrawError>,
) -> Result<(), PlotError> {
    style::init_font()?;
    let err = |source| PlotError::Draw {
        path: path.to_path_buf(),
        source,
    };
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    draw(&root).map_err(err)?;
    root.present().map_err(err)
}

/// Draws every plot whose input is in `dir`; returns the files written. A plot
/// whose input is missing or broken is an error, after the others are drawn.
pub fn plot_dir(dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    let mut errors = Vec::new();
    for (name, _) in PLOTS {
        let path = dir.join(name);
        let r = plot_one(dir, name, &path);
        match r {
            Ok(()) => written.push(path),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(written)
    } else {
        Err(PlotError::Several(errors))
    }
}

fn plot_one(dir: &Path, name: &'static str, path: &Path) -> Result<(), PlotError> {
    let data = |source| PlotError::Data { plot: name, source };
    match name {
        "slowdown.png" => {
            let v = data::load(dir, data::MEMORY_JSON).map_err(data)?;
            slowdown::draw(path, &data::slowdowns(&v).map_err(data)?)
        }
        "fault_latency_cdf.png" => {
            let m = data::load(dir, data::MEMORY_JSON).map_err(data)?;
            let f = data::load(dir, data::FABRIC_JSON).map_err(data)?;
            cdf::draw(path, &data::latencies(&m, &f).map_err(data)?)
        }
        "storage.png" => {
            let v = data::load(dir, data::STORAGE_JSON).map_err(data)?;
            storage::draw(path, &data::storage(&v).map_err(data)?)
        }
        "timeline.png" => {
            let v = data::load(dir, data::TIMELINE_JSON).map_err(data)?;
            timeline::draw(path, &data::timeline(&v).map_err(data)?)
        }
        _ => unreachable!("every name in PLOTS is drawn here"),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;

    /// A fresh directory for a test's PNGs.
    pub fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sv-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Decodes the PNG at `path` and returns its size, failing the test if it
    /// does not decode or has a single colour.
    pub fn assert_png(path: &std::path::Path) -> (u32, u32) {
        let info = crate::check::check_png(path).unwrap_or_else(|e| panic!("{e}"));
        (info.width, info.height)
    }
}
