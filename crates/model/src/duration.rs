//! Durations as Istio and Kubernetes write them.
//!
//! Istio fields such as `timeout` are protobuf `Duration`s, whose JSON form is seconds with a
//! `s` suffix (`"1.5s"`); users also write Go-style durations (`"1m30s"`, `"100ms"`), which
//! Istio's tooling accepts. Both are the same grammar here: a sequence of decimal numbers
//! each followed by a unit (`h`, `m`, `s`, `ms`, `us`/`µs`, `ns`).

use std::time::Duration;

/// Parses `"10s"`, `"0.5s"`, `"100ms"`, `"1m30s"`, `"2h"`, `"250us"`, `"1ns"`.
///
/// A bare number without unit is rejected, as Go and protobuf reject it, because it is
/// ambiguous (seconds? milliseconds?).
pub fn parse(s: &str) -> Result<Duration, String> {
    let input = s.trim();
    if input.is_empty() {
        return Err("empty duration; expected e.g. \"10s\" or \"100ms\"".to_string());
    }
    if input == "0" {
        return Ok(Duration::ZERO);
    }
    if input.starts_with('-') {
        return Err(format!("invalid duration {s:?}: negative durations are not allowed"));
    }
    let rest = input.strip_prefix('+').unwrap_or(input);
    let mut total_nanos: u128 = 0;
    let mut chars = rest.char_indices().peekable();
    let mut parsed_any = false;
    while chars.peek().is_some() {
        // Number part: digits with at most one decimal point.
        let start = chars.peek().map_or(0, |&(i, _)| i);
        let mut end = start;
        while let Some(&(i, c)) = chars.peek() {
            if c.is_ascii_digit() || c == '.' {
                end = i + c.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let number = &rest[start..end];
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(format!(
                "invalid duration {s:?}: expected a number at {:?}",
                &rest[start..]
            ));
        }
        // Unit part: letters (and `µ`).
        let unit_start = end;
        let mut unit_end = unit_start;
        while let Some(&(i, c)) = chars.peek() {
            if c.is_alphabetic() {
                unit_end = i + c.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let unit = &rest[unit_start..unit_end];
        let unit_nanos: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit after {number:?} (use h, m, s, ms, us or ns)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use h, m, s, ms, us or ns)"
                ));
            }
        };
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| format!("invalid duration {s:?}: number {number:?} is too large"))?
        };
        let mut nanos = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        // Fraction: scale digit by digit so `0.5s` is exact and extra precision truncates.
        let mut scale = unit_nanos;
        for d in frac_part.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos = nanos
                .checked_add(u128::from(d - b'0') * scale)
                .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        parsed_any = true;
    }
    if !parsed_any {
        return Err(format!("invalid duration {s:?}"));
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| format!("invalid duration {s:?}: too large"))?;
    // The remainder is below 1e9, so it always fits in u32.
    let sub = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn accepts_istio_and_go_forms() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("1ns"), Ok(Duration::from_nanos(1)));
        assert_eq!(parse("1h2m3.25s"), Ok(Duration::from_millis(3_723_250)));
        assert_eq!(parse(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse(" 3s "), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_bad_input_with_a_clear_message() {
        for bad in ["", "10", "s", "10x", "-1s", "1.2.3s", "1s5", "abc", "..s", "1 s"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("duration"), "{bad}: {err}");
        }
        assert!(parse("10").unwrap_err().contains("missing unit"));
        assert!(parse("10x").unwrap_err().contains("unknown unit"));
        assert!(parse("99999999999999999999999999999999999999999h").is_err());
        // The whole seconds fit in u128 nanoseconds, the fraction on top does not.
        assert!(
            parse("340282366920938463463374607431.9s")
                .unwrap_err()
                .contains("too large")
        );
    }
}

/// Serde for durations written as text (`"5s"`), rendered back as milliseconds (`"5000ms"`).
pub mod serde_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}
