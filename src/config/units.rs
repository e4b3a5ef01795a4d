//! Human units in the config: byte sizes as Docker reads them (binary: `512M` = 512 MiB) and
//! durations as humantime reads them (`30m`, `8h`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A size in bytes, written `512M`, `16G`, `1.5g`, `64MiB` or a plain number of bytes. The
/// multipliers are binary (k = 1024), as in `docker run --memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a size; the error says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        let digits_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(digits_end);
        let value: f64 = number.parse().map_err(|_| {
            format!(
                "invalid size {text:?}: expected a number with an optional unit such as 512M or 16G"
            )
        })?;
        let suffix = suffix.trim().to_ascii_lowercase();
        let unit = suffix
            .strip_suffix("ib")
            .or_else(|| suffix.strip_suffix('b'))
            .unwrap_or(&suffix);
        let shift = match unit {
            "" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            "p" => 50,
            _ => {
                return Err(format!(
                    "invalid size {text:?}: unknown unit {suffix:?} (use K, M, G, T or P; binary, as Docker reads them)"
                ));
            }
        };
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("invalid size {text:?}: too large"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (name, shift) in UNITS {
            let unit = 1u64 << shift;
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{name}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written as humantime reads it: `30s`, `30m`, `8h`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?}: {e} (write e.g. \"30s\", \"30m\", \"8h\")"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary_like_docker() {
        assert_eq!(ByteSize::parse("512M").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("512m").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("16G").unwrap().0, 16 << 30);
        assert_eq!(ByteSize::parse("64MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("2gb").unwrap().0, 2 << 30);
        assert_eq!(ByteSize::parse("1.5g").unwrap().0, 3 << 29);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("1 K").unwrap().0, 1024);
    }

    #[test]
    fn bad_sizes_say_why() {
        for bad in ["", "M", "12Q", "1.2.3G", "-5M", "lots"] {
            let e = ByteSize::parse(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        assert!(ByteSize::parse("12Q").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(16 << 30).to_string(), "16G");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }
}
