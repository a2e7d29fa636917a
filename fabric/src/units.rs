//! Parsing of the human-friendly quantities that the command lines take:
//! sizes (`8G`, `16M`, `4096`), durations (`2us`, `1.5ms`) and bandwidths
//! (`100Gbit`, `25GB/s`).
//!
//! Sizes use binary multiples (K = 1024), as memory sizes do; bandwidths use
//! decimal multiples (G = 10^9), as link speeds do.

use std::time::Duration;

/// What went wrong parsing a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// The text is empty.
    #[error("empty value")]
    Empty,
    /// The number part is not a number.
    #[error("`{0}` is not a number")]
    NotANumber(String),
    /// The unit suffix is not one this quantity knows.
    #[error("unknown unit `{unit}` in `{text}` (expected one of {expected})")]
    UnknownUnit {
        /// The whole text.
        text: String,
        /// The suffix that was not understood.
        unit: String,
        /// The suffixes that are understood.
        expected: &'static str,
    },
    /// The value does not fit the type that holds it.
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Splits `12.5Gbit` into (`12.5`, `Gbit`).
fn split_number(text: &str) -> Result<(f64, &str), UnitError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(UnitError::Empty);
    }
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(end);
    let value: f64 = num
        .parse()
        .map_err(|_| UnitError::NotANumber(text.to_string()))?;
    if !value.is_finite() || value < 0.0 {
        return Err(UnitError::NotANumber(text.to_string()));
    }
    Ok((value, unit.trim()))
}

fn to_u64(value: f64, text: &str) -> Result<u64, UnitError> {
    if value >= u64::MAX as f64 {
        return Err(UnitError::Overflow(text.to_string()));
    }
    Ok(value.round() as u64)
}

/// Parses a byte size: a number with an optional binary suffix
/// (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`), e.g. `8G`, `16MiB`, `4096`.
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let (value, unit) = split_number(text)?;
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(UnitError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
                expected: "B, K, M, G, T",
            });
        }
    };
    to_u64(value * (1u64 << shift) as f64, text)
}

/// Parses a duration: a number with a unit `ns`, `us`, `ms` or `s`, e.g. `2us`.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let (value, unit) = split_number(text)?;
    let nanos_per_unit = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => {
            return Err(UnitError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
                expected: "ns, us, ms, s",
            });
        }
    };
    Ok(Duration::from_nanos(to_u64(value * nanos_per_unit, text)?))
}

/// Parses a bandwidth into bits per second: `100Gbit`, `400Mbit`, `25GB/s`, `1e9` is not accepted.
/// Units: `bit`, `Kbit`, `Mbit`, `Gbit`, `Tbit` (also `bps` forms) and `B/s`, `KB/s`, `MB/s`, `GB/s`.
pub fn parse_bandwidth(text: &str) -> Result<u64, UnitError> {
    let (value, unit) = split_number(text)?;
    let lower = unit.to_ascii_lowercase();
    let (prefix, bits_per_unit) = if let Some(p) = lower.strip_suffix("bit") {
        (p, 1.0)
    } else if let Some(p) = lower.strip_suffix("bps") {
        (p, 1.0)
    } else if let Some(p) = lower.strip_suffix("b/s") {
        (p, 8.0)
    } else {
        ("?", 0.0)
    };
    let mult = match prefix {
        "" => 1e0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        _ => {
            return Err(UnitError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
                expected: "bit, Kbit, Mbit, Gbit, Tbit, B/s, KB/s, MB/s, GB/s",
            });
        }
    };
    let bps = to_u64(value * mult * bits_per_unit, text)?;
    if bps == 0 {
        return Err(UnitError::NotANumber(text.to_string()));
    }
    Ok(bps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert!(matches!(
            parse_size("8X"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(parse_size(""), Err(UnitError::Empty)));
        assert!(matches!(parse_size("G"), Err(UnitError::NotANumber(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2us").unwrap(), Duration::from_micros(2));
        assert_eq!(
            parse_duration("1.5ms").unwrap(),
            Duration::from_micros(1500)
        );
        assert_eq!(parse_duration("0ns").unwrap(), Duration::ZERO);
        assert!(parse_duration("2").is_err());
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("100Gbit").unwrap(), 100_000_000_000);
        assert_eq!(parse_bandwidth("25GB/s").unwrap(), 200_000_000_000);
        assert_eq!(parse_bandwidth("10Mbps").unwrap(), 10_000_000);
        assert!(parse_bandwidth("0Gbit").is_err());
        assert!(parse_bandwidth("100Gfoo").is_err());
    }
}
