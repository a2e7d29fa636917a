//! `splitvisor-bench check DIR`: every plot was written and is a valid PNG
//! (signature, full decode, more than one colour), and every JSON file parses.

use crate::plot::PLOTS;
use std::path::{Path, PathBuf};

/// The eight bytes every PNG file starts with.
const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Why a results directory failed its check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file does not start with the PNG signature.
    #[error("{0} is not a PNG file (no PNG signature)")]
    Signature(PathBuf),
    /// A PNG file does not decode.
    #[error("{path} does not decode as a PNG")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: png::DecodingError,
    },
    /// A PNG decodes to an image of one colour: nothing was drawn.
    #[error("{0} is blank (one colour)")]
    Blank(PathBuf),
    /// A JSON file does not parse.
    #[error("{path} is not valid JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Some files failed (each one's error is in the list).
    #[error("{} problem(s) in the results:{}", .0.len(), list(.0))]
    Several(Vec<CheckError>),
}

fn list(errors: &[CheckError]) -> String {
    let mut s = String::new();
    for e in errors {
        s.push_str("\n  ");
        s.push_str(&e.to_string());
        if let Some(c) = std::error::Error::source(e) {
            s.push_str(": ");
            s.push_str(&c.to_string());
        }
    }
    s
}

/// What a checked PNG holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PngInfo {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
}

/// Checks one PNG file: signature, a full decode, more than one colour.
pub fn check_png(path: &Path) -> Result<PngInfo, CheckError> {
    let bytes = std::fs::read(path).map_err(|source| CheckError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !bytes.starts_with(&SIGNATURE) {
        return Err(CheckError::Signature(path.to_path_buf()));
    }
    let decode = |source| CheckError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = png::Decoder::new(bytes.as_slice())
        .read_info()
        .map_err(decode)?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).map_err(decode)?;
    let data = &buf[..frame.buffer_size()];
    let px = frame.color_type.samples() * usize::from(frame.bit_depth as u8).div_ceil(8);
    let first = &data[..px.min(data.len())];
    if data.chunks(px.max(1)).all(|p| p == first) {
        return Err(CheckError::Blank(path.to_path_buf()));
    }
    Ok(PngInfo {
        width: frame.width,
        height: frame.height,
    })
}

/// Checks every plot of [`PLOTS`] in `dir` and every `*.json` there; prints
/// one line per file.
pub fn check_dir(dir: &Path) -> Result<(), CheckError> {
    let mut errors = Vec::new();
    let mut plots = 0;
    for (name, _) in PLOTS {
        let path = dir.join(name);
        match check_png(&path) {
            Ok(i) => {
                plots += 1;
                println!("ok   {} ({} x {} PNG)", path.display(), i.width, i.height);
            }
            Err(e) => {
                println!("FAIL {}", path.display());
                errors.push(e);
            }
        }
    }
    let mut jsons = 0;
    let entries = std::fs::read_dir(dir).map_err(|source| CheckError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for path in files {
        let r = std::fs::read_to_string(&path)
            .map_err(|source| CheckError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|t| {
                serde_json::from_str::<serde_json::Value>(&t).map_err(|source| CheckError::Json {
                    path: path.clone(),
                    source,
                })
            });
        match r {
            Ok(_) => jsons += 1,
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        println!(
            "{}: {plots} plots are valid PNG images, {jsons} JSON files parse",
            dir.display()
        );
        Ok(())
    } else {
        Err(CheckError::Several(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::test_util;

    #[test]
    fn a_png_must_have_its_signature_decode_and_show_something() {
        let dir = test_util::dir("check");
        let not_png = dir.join("a.png");
        std::fs::write(&not_png, b"hello").unwrap();
        assert!(matches!(check_png(&not_png), Err(CheckError::Signature(_))));
        let mut cut = SIGNATURE.to_vec();
        cut.extend_from_slice(b"\0\0\0\rIHDR");
        std::fs::write(&not_png, &cut).unwrap();
        assert!(matches!(
            check_png(&not_png),
            Err(CheckError::Decode { .. })
        ));
        // A one-colour image decodes but is blank.
        let blank = dir.join("blank.png");
        crate::plot::render(&blank, (20, 10), |_| Ok(())).unwrap();
        assert!(matches!(check_png(&blank), Err(CheckError::Blank(_))));
        assert!(matches!(
            check_png(&dir.join("missing.png")),
            Err(CheckError::Read { .. })
        ));
        // A directory with none of the plots fails, naming each.
        std::fs::write(dir.join("x.json"), "{").unwrap();
        let e = check_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("5 problem(s)"), "{e}");
        assert!(e.contains("timeline.png") && e.contains("x.json"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
