//! Postgres binary COPY values → the same typed values as their text form.
//!
//! The snapshot copies a table with `COPY … (FORMAT binary)` when every copied column has
//! a type decoded here: the server then skips its output functions and we skip parsing
//! text. The decoded value must be exactly what [`crate::pg_types::parse_value`] makes of
//! the same value's text (pgoutput streams text), including which values it cannot type:
//! those (`NaN`, `infinity`, years past chrono's range, digits a decimal column cannot
//! hold) go to `_fallback` with the text Postgres prints for them (`DateStyle=ISO`,
//! `TimeZone=UTC`, as every wal2delta connection sets), formatted here.

use std::borrow::Cow;
use std::fmt::Write;

use crate::pg_types::{ColumnKind, Value, oid};

/// How one copied column's binary values are read (its source type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryType {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    Date,
    Timestamp,
    /// text, varchar, bpchar, name, json: the bytes are the text.
    Text,
    /// A version byte (1), then the text.
    Jsonb,
    Uuid,
    Bytea,
}

impl BinaryType {
    /// The binary reading of a source column of `type_oid` stored in a lake column of
    /// `kind`, when it gives exactly what the text form gives (`None`: copy as text).
    pub fn for_column(type_oid: u32, kind: &ColumnKind) -> Option<BinaryType> {
        let ty = match type_oid {
            oid::BOOL => BinaryType::Bool,
            oid::INT2 => BinaryType::Int2,
            oid::INT4 => BinaryType::Int4,
            oid::INT8 => BinaryType::Int8,
            oid::OID => BinaryType::Oid,
            oid::FLOAT4 => BinaryType::Float4,
            oid::FLOAT8 => BinaryType::Float8,
            oid::NUMERIC => BinaryType::Numeric,
            oid::DATE => BinaryType::Date,
            oid::TIMESTAMP | oid::TIMESTAMPTZ => BinaryType::Timestamp,
            oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::JSON => BinaryType::Text,
            oid::JSONB => BinaryType::Jsonb,
            oid::UUID => BinaryType::Uuid,
            oid::BYTEA => BinaryType::Bytea,
            _ => return None,
        };
        // The lake column's kind must be the one the type maps to (a column whose type
        // changed since the lake took it is parsed from text, as the stream does).
        let fits = match (ty, kind) {
            (BinaryType::Bool, ColumnKind::Bool) => true,
            (
                BinaryType::Int2 | BinaryType::Int4 | BinaryType::Int8 | BinaryType::Oid,
                ColumnKind::Int64,
            ) => true,
            (BinaryType::Float4, ColumnKind::Float32) => true,
            (BinaryType::Float8, ColumnKind::Float64) => true,
            (BinaryType::Numeric, ColumnKind::Decimal { .. } | ColumnKind::Text) => true,
            (BinaryType::Date, ColumnKind::Date) => true,
            (BinaryType::Timestamp, ColumnKind::Timestamp) => type_oid == oid::TIMESTAMP,
            (BinaryType::Timestamp, ColumnKind::TimestampTz) => type_oid == oid::TIMESTAMPTZ,
            (BinaryType::Text | BinaryType::Jsonb | BinaryType::Uuid, ColumnKind::Text) => true,
            (BinaryType::Bytea, ColumnKind::Bytea) => true,
            _ => false,
        };
        fits.then_some(ty)
    }
}

/// One decoded value.
#[derive(Debug, PartialEq)]
pub enum Decoded<'a> {
    /// A typed value for the column's builder.
    Value(Value),
    /// The text of a text column.
    Text(Cow<'a, str>),
    /// No exact typed form: the text Postgres prints for it, for `_fallback`.
    Untyped(String),
}

/// Decodes `bytes`, a binary value of `ty`, for a lake column of `kind` (the pair
/// [`BinaryType::for_column`] accepted). `None`: the bytes are not a value of `ty`.
pub fn decode<'a>(ty: BinaryType, kind: &ColumnKind, bytes: &'a [u8]) -> Option<Decoded<'a>> {
    let int = |b: &[u8]| -> Option<i64> {
        Some(match b.len() {
            2 => i64::from(i16::from_be_bytes(b.try_into().ok()?)),
            4 => i64::from(i32::from_be_bytes(b.try_into().ok()?)),
            8 => i64::from_be_bytes(b.try_into().ok()?),
            _ => return None,
        })
    };
    let value = |v| Some(Decoded::Value(v));
    match ty {
        BinaryType::Bool => match bytes {
            [b] => value(Value::Bool(*b != 0)),
            _ => None,
        },
        BinaryType::Int2 | BinaryType::Int4 | BinaryType::Int8 => {
            let expected = match ty {
                BinaryType::Int2 => 2,
                BinaryType::Int4 => 4,
                _ => 8,
            };
            (bytes.len() == expected).then_some(())?;
            value(Value::Int64(int(bytes)?))
        }
        BinaryType::Oid => value(Value::Int64(i64::from(u32::from_be_bytes(
            bytes.try_into().ok()?,
        )))),
        // Every NaN as the one its text (`NaN`) parses to: stored NaNs may carry a sign bit
        // (`'inf' - 'inf'`), which sorting and statistics would tell apart.
        BinaryType::Float4 => {
            let v = f32::from_be_bytes(bytes.try_into().ok()?);
            value(Value::Float32(if v.is_nan() { f32::NAN } else { v }))
        }
        BinaryType::Float8 => {
            let v = f64::from_be_bytes(bytes.try_into().ok()?);
            value(Value::Float64(if v.is_nan() { f64::NAN } else { v }))
        }
        BinaryType::Numeric => {
            let n = Numeric::read(bytes)?;
            match kind {
                ColumnKind::Decimal { precision, scale } => match n.scaled(*precision, *scale) {
                    Some(v) => value(Value::Decimal(v)),
                    None => Some(Decoded::Untyped(n.to_text())),
                },
                _ => Some(Decoded::Text(Cow::Owned(n.to_text()))),
            }
        }
        BinaryType::Date => {
            let days = i32::from_be_bytes(bytes.try_into().ok()?);
            Some(match days {
                i32::MIN => Decoded::Untyped("-infinity".into()),
                i32::MAX => Decoded::Untyped("infinity".into()),
                _ => {
                    let unix = i64::from(days) + DAYS_2000;
                    match i32::try_from(unix) {
                        Ok(d) if in_chrono_range(unix) => Decoded::Value(Value::Date(d)),
                        _ => Decoded::Untyped(format_date(unix)),
                    }
                }
            })
        }
        BinaryType::Timestamp => {
            let micros = i64::from_be_bytes(bytes.try_into().ok()?);
            Some(match micros {
                i64::MIN => Decoded::Untyped("-infinity".into()),
                i64::MAX => Decoded::Untyped("infinity".into()),
                _ => {
                    // Split first: the last timestamps Postgres has overflow as Unix micros.
                    let days = micros.div_euclid(MICROS_PER_DAY) + DAYS_2000;
                    let of_day = micros.rem_euclid(MICROS_PER_DAY);
                    match days
                        .checked_mul(MICROS_PER_DAY)
                        .and_then(|d| d.checked_add(of_day))
                    {
                        Some(unix) if in_chrono_range(days) => Decoded::Value(Value::Micros(unix)),
                        _ => {
                            let tz = matches!(kind, ColumnKind::TimestampTz);
                            Decoded::Untyped(format_timestamp(days, of_day, tz))
                        }
                    }
                }
            })
        }
        BinaryType::Text => Some(Decoded::Text(utf8(bytes))),
        BinaryType::Jsonb => match bytes.split_first() {
            Some((1, text)) => Some(Decoded::Text(utf8(text))),
            _ => None,
        },
        BinaryType::Uuid => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            // Lowercase hex in groups of 4-2-2-2-6 bytes, as `uuid_out` prints it.
            let mut text = String::with_capacity(36);
            for (i, x) in b.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    text.push('-');
                }
                let _ = write!(text, "{x:02x}");
            }
            Some(Decoded::Text(Cow::Owned(text)))
        }
        BinaryType::Bytea => value(Value::Bytes(bytes.to_vec())),
    }
}

/// Text as the text path reads it: valid UTF-8 borrowed, anything else made valid.
fn utf8(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Days from 1970-01-01 to 2000-01-01, Postgres's epoch.
const DAYS_2000: i64 = 10_957;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Whether `days` since 1970-01-01 is a date chrono has (the text parser's range: dates
/// outside it are kept as text).
fn in_chrono_range(days: i64) -> bool {
    // Computed once: this runs for every date and timestamp a snapshot copies.
    static RANGE: std::sync::LazyLock<std::ops::RangeInclusive<i64>> =
        std::sync::LazyLock::new(|| {
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
            let days = |d: chrono::NaiveDate| d.signed_duration_since(epoch).num_days();
            days(chrono::NaiveDate::MIN)..=days(chrono::NaiveDate::MAX)
        });
    RANGE.contains(&days)
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01 (H. Hinnant's
/// algorithm; year 0 is 1 BC).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `YYYY-MM-DD` (with ` BC` before year 1), as Postgres prints a date in ISO style.
fn format_date(days: i64) -> String {
    let (y, m, d) = civil(days);
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    format!("{year:04}-{m:02}-{d:02}{bc}")
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+00][ BC]`, as Postgres prints a timestamp in ISO style
/// with `TimeZone=UTC` (fractional seconds without trailing zeros).
/// `days` since 1970-01-01 and `of_day` microseconds into it.
fn format_timestamp(days: i64, of_day: i64, with_tz: bool) -> String {
    let (y, m, d) = civil(days);
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    let secs = of_day / 1_000_000;
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut text = format!("{year:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}");
    let frac = of_day % 1_000_000;
    if frac != 0 {
        let digits = format!("{frac:06}");
        text.push('.');
        text.push_str(digits.trim_end_matches('0'));
    }
    if with_tz {
        text.push_str("+00");
    }
    text.push_str(bc);
    text
}

/// A binary `numeric`: base-10000 digits, the weight of the first, sign and display scale.
struct Numeric<'a> {
    digits: &'a [u8],
    weight: i64,
    sign: u16,
    dscale: i64,
}

const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

impl<'a> Numeric<'a> {
    fn read(bytes: &'a [u8]) -> Option<Numeric<'a>> {
        let word = |i: usize| -> Option<u16> {
            Some(u16::from_be_bytes(bytes.get(i..i + 2)?.try_into().ok()?))
        };
        let ndigits = usize::from(word(0)?);
        let n = Numeric {
            digits: bytes.get(8..)?,
            weight: i64::from(word(2)? as i16),
            sign: word(4)?,
            dscale: i64::from(word(6)?),
        };
        if n.digits.len() != ndigits * 2
            || !matches!(
                n.sign,
                0 | NUMERIC_NEG | NUMERIC_NAN | NUMERIC_PINF | NUMERIC_NINF
            )
            || (0..ndigits).any(|i| n.digit(i as i64) > 9999)
        {
            return None;
        }
        Some(n)
    }

    /// Base-10000 digit `i` (0 outside the stored ones).
    fn digit(&self, i: i64) -> i64 {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.digits.get(2 * i..2 * i + 2))
            .map_or(0, |d| i64::from(u16::from_be_bytes([d[0], d[1]])))
    }

    /// The value times 10^scale, when exact and within `precision` digits (what
    /// [`crate::pg_types::parse_decimal`] accepts of the same value's text).
    fn scaled(&self, precision: u8, scale: i8) -> Option<i128> {
        if !matches!(self.sign, 0 | NUMERIC_NEG) {
            return None;
        }
        let scale = i64::from(scale);
        let mut v: i128 = 0;
        for i in 0..(self.digits.len() / 2) as i64 {
            let d = self.digit(i);
            if d == 0 {
                continue;
            }
            // The digit's weight in decimal places of the scaled value.
            let exp = 4 * (self.weight - i) + scale;
            if exp >= 0 {
                let pow = 10i128.checked_pow(u32::try_from(exp).ok()?)?;
                v = v.checked_add(i128::from(d).checked_mul(pow)?)?;
            } else if exp > -4 {
                // 64-bit: a 128-bit division is a library call.
                let pow = 10i64.pow((-exp) as u32);
                if d % pow != 0 {
                    return None;
                }
                v = v.checked_add(i128::from(d / pow))?;
            } else {
                return None;
            }
        }
        if v >= 10i128.checked_pow(u32::from(precision))? {
            return None;
        }
        Some(if self.sign == NUMERIC_NEG { -v } else { v })
    }

    /// The text Postgres prints (`numeric_out`).
    fn to_text(&self) -> String {
        match self.sign {
            NUMERIC_NAN => return "NaN".into(),
            NUMERIC_PINF => return "Infinity".into(),
            NUMERIC_NINF => return "-Infinity".into(),
            _ => {}
        }
        let mut text = String::new();
        if self.sign == NUMERIC_NEG {
            text.push('-');
        }
        let mut i;
        if self.weight < 0 {
            text.push('0');
            i = self.weight + 1;
        } else {
            let _ = write!(text, "{}", self.digit(0));
            i = 1;
            while i <= self.weight {
                let _ = write!(text, "{:04}", self.digit(i));
                i += 1;
            }
        }
        if self.dscale > 0 {
            text.push('.');
            let end = text.len() + self.dscale as usize;
            while text.len() < end {
                let _ = write!(text, "{:04}", self.digit(i));
                i += 1;
            }
            text.truncate(end);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg_types::{parse_date, parse_timestamp, parse_value};

    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numerics_print_and_scale_as_their_text_parses() {
        let dec = ColumnKind::Decimal {
            precision: 38,
            scale: 2,
        };
        let cases = [
            (numeric(0, 0, 2, &[12, 3400]), "12.34"),
            (numeric(-1, NUMERIC_NEG, 3, &[5000]), "-0.500"),
            (numeric(1, 0, 0, &[1]), "10000"),
            (numeric(-2, 0, 6, &[1200]), "0.000012"),
            (numeric(0, 0, 0, &[]), "0"),
            (numeric(0, 0, 2, &[]), "0.00"),
            (numeric(2, 0, 1, &[7, 0, 1, 5000]), "700000001.5"),
            (numeric(0, NUMERIC_NAN, 0, &[]), "NaN"),
            (numeric(0, NUMERIC_NINF, 0, &[]), "-Infinity"),
            (
                numeric(9, 0, 0, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                "1000000000000000000000000000000000000",
            ),
            (
                numeric(9, 0, 0, &[100, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                "100000000000000000000000000000000000000",
            ),
        ];
        for (bytes, text) in cases {
            let n = Numeric::read(&bytes).unwrap();
            assert_eq!(n.to_text(), text);
            let expected = match parse_value(&dec, text) {
                Some(v) => Decoded::Value(v),
                None => Decoded::Untyped(text.to_string()),
            };
            assert_eq!(
                decode(BinaryType::Numeric, &dec, &bytes),
                Some(expected),
                "{text}"
            );
        }
        assert_eq!(
            Numeric::read(&numeric(0, 0, 0, &[10_000])).map(|_| ()),
            None
        );
        assert_eq!(Numeric::read(&[0, 1, 0, 0]).map(|_| ()), None);
    }

    #[test]
    fn dates_and_timestamps_match_their_text() {
        for text in ["2024-02-29", "1970-01-01", "0044-03-15 BC", "9999-12-31"] {
            let unix = i64::from(parse_date(text).unwrap());
            assert_eq!(format_date(unix), text);
            let bytes = ((unix - DAYS_2000) as i32).to_be_bytes();
            assert_eq!(
                decode(BinaryType::Date, &ColumnKind::Date, &bytes),
                Some(Decoded::Value(Value::Date(unix as i32)))
            );
        }
        for text in [
            "2024-01-05 13:00:00.123456+00",
            "1999-12-31 23:59:59.5+00",
            "0001-01-01 00:00:00+00 BC",
        ] {
            let unix = parse_timestamp(text, true).unwrap();
            let (days, of_day) = (
                unix.div_euclid(MICROS_PER_DAY),
                unix.rem_euclid(MICROS_PER_DAY),
            );
            assert_eq!(format_timestamp(days, of_day, true), text);
            let bytes = (unix - DAYS_2000 * MICROS_PER_DAY).to_be_bytes();
            assert_eq!(
                decode(BinaryType::Timestamp, &ColumnKind::TimestampTz, &bytes),
                Some(Decoded::Value(Value::Micros(unix)))
            );
        }
        // Past i64 as Unix micros within the day (294247-01-10 04:00:54.775808 on).
        let day = 106_751_991 - DAYS_2000;
        let late = day * MICROS_PER_DAY + 20 * 3_600_000_000;
        assert_eq!(
            decode(
                BinaryType::Timestamp,
                &ColumnKind::Timestamp,
                &late.to_be_bytes()
            ),
            Some(Decoded::Untyped("294247-01-10 20:00:00".into()))
        );
        // Postgres's last timestamp: past chrono's range, and past i64 as Unix micros.
        let last: i64 = 9_223_371_331_199_999_999;
        assert_eq!(
            decode(
                BinaryType::Timestamp,
                &ColumnKind::Timestamp,
                &last.to_be_bytes()
            ),
            Some(Decoded::Untyped("294276-12-31 23:59:59.999999".into()))
        );
        let far = i32::MAX - 1;
        assert_eq!(
            decode(BinaryType::Date, &ColumnKind::Date, &far.to_be_bytes()),
            Some(Decoded::Untyped(format_date(i64::from(far) + DAYS_2000)))
        );
        assert_eq!(parse_date(&format_date(i64::from(far) + DAYS_2000)), None);
        assert_eq!(
            decode(BinaryType::Date, &ColumnKind::Date, &i32::MAX.to_be_bytes()),
            Some(Decoded::Untyped("infinity".into()))
        );
    }

    #[test]
    fn kinds_must_match_the_type_and_bad_lengths_are_refused() {
        assert_eq!(
            BinaryType::for_column(oid::TIMESTAMP, &ColumnKind::TimestampTz),
            None
        );
        assert_eq!(BinaryType::for_column(oid::INT4, &ColumnKind::Text), None);
        assert_eq!(BinaryType::for_column(1000, &ColumnKind::Text), None);
        assert_eq!(decode(BinaryType::Int4, &ColumnKind::Int64, &[0, 1]), None);
        let negative_nan = (-f64::NAN).to_be_bytes();
        let Some(Decoded::Value(Value::Float64(v))) =
            decode(BinaryType::Float8, &ColumnKind::Float64, &negative_nan)
        else {
            panic!("a NaN is a float");
        };
        assert_eq!(v.to_bits(), "NaN".parse::<f64>().unwrap().to_bits());
        assert_eq!(
            decode(BinaryType::Jsonb, &ColumnKind::Text, &[2, b'{']),
            None
        );
        assert_eq!(
            decode(BinaryType::Uuid, &ColumnKind::Text, &[0xab; 16]),
            Some(Decoded::Text(Cow::Owned(
                "abababab-abab-abab-abab-abababababab".into()
            )))
        );
    }
}
