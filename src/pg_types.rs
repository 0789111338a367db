//! Postgres types → Arrow/Delta types, and parsing of pgoutput's text values.
//!
//! The mapping is lossless: a type gets a typed Arrow column only when every value it can
//! hold has an exact typed form, or when the few that do not (NaN in `numeric(p,s)`,
//! `infinity` dates and timestamps, years outside Arrow's range) can be kept as text in the
//! row's `_fallback` column. Types Delta cannot represent (time, interval, uuid, json, …)
//! are stored as their canonical Postgres text. See docs/lake.md › Type mapping.

use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, TimeUnit};

/// Text-form value of an unchanged-but-unknown type is stored as-is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnKind {
    Bool,
    Int64,
    Float32,
    Float64,
    Decimal {
        precision: u8,
        scale: i8,
    },
    Text,
    Date,
    /// `timestamp without time zone`.
    Timestamp,
    /// `timestamp with time zone`, stored as UTC.
    TimestampTz,
    Bytea,
    /// A one-dimensional array of the element kind.
    List(Box<ColumnKind>),
}

/// Well-known type OIDs (from `pg_type.dat`; stable across Postgres versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
}

/// Element type of a built-in array type, if it is one we map to a typed list.
fn array_element(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1182 => oid::DATE,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1231 => oid::NUMERIC,
        // Text-like element types: text, varchar, bpchar, name, uuid, json, jsonb, char,
        // time, timetz, interval. Their elements stay text.
        1009 | 1015 | 1014 | 1003 | 2951 | 199 | 3807 | 1002 | 1183 | 1270 | 1187 => 25,
        _ => return None,
    })
}

impl ColumnKind {
    /// The kind whose Arrow type is `ty` (for columns the lake has but the source dropped).
    pub fn from_arrow(ty: &DataType) -> Option<ColumnKind> {
        Some(match ty {
            DataType::Boolean => ColumnKind::Bool,
            DataType::Int64 => ColumnKind::Int64,
            DataType::Float32 => ColumnKind::Float32,
            DataType::Float64 => ColumnKind::Float64,
            DataType::Decimal128(precision, scale) => ColumnKind::Decimal {
                precision: *precision,
                scale: *scale,
            },
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => ColumnKind::Text,
            DataType::Date32 => ColumnKind::Date,
            DataType::Timestamp(TimeUnit::Microsecond, None) => ColumnKind::Timestamp,
            DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => ColumnKind::TimestampTz,
            DataType::Binary | DataType::BinaryView | DataType::LargeBinary => ColumnKind::Bytea,
            DataType::List(f) | DataType::LargeList(f) => {
                ColumnKind::List(Box::new(ColumnKind::from_arrow(f.data_type())?))
            }
            _ => return None,
        })
    }

    /// The column kind for a Postgres type OID and type modifier (`atttypmod`).
    pub fn from_pg(type_oid: u32, typmod: i32) -> ColumnKind {
        match type_oid {
            oid::BOOL => ColumnKind::Bool,
            // Every integer is stored as a 64-bit integer, so widening a column (smallint →
            // integer → bigint) never changes its Delta type.
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => ColumnKind::Int64,
            oid::FLOAT4 => ColumnKind::Float32,
            oid::FLOAT8 => ColumnKind::Float64,
            oid::NUMERIC => numeric_kind(typmod),
            oid::DATE => ColumnKind::Date,
            oid::TIMESTAMP => ColumnKind::Timestamp,
            oid::TIMESTAMPTZ => ColumnKind::TimestampTz,
            oid::BYTEA => ColumnKind::Bytea,
            other => match array_element(other) {
                Some(elem) => ColumnKind::List(Box::new(ColumnKind::from_pg(elem, typmod))),
                // text, varchar, char, name, uuid, json(b), time(tz), interval, money,
                // inet, enums, domains, user and unknown types: their text form.
                None => ColumnKind::Text,
            },
        }
    }

    /// The Arrow type of the column (always representable in Delta).
    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnKind::Bool => DataType::Boolean,
            ColumnKind::Int64 => DataType::Int64,
            ColumnKind::Float32 => DataType::Float32,
            ColumnKind::Float64 => DataType::Float64,
            ColumnKind::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            ColumnKind::Text => DataType::Utf8,
            ColumnKind::Date => DataType::Date32,
            ColumnKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnKind::TimestampTz => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            ColumnKind::Bytea => DataType::Binary,
            ColumnKind::List(elem) => {
                DataType::List(Arc::new(Field::new("element", elem.arrow_type(), true)))
            }
        }
    }
}

/// `numeric(p,s)` with 1 ≤ p ≤ 38 and 0 ≤ s ≤ p maps to Decimal128(38, s) — the widest
/// precision, so growing the column's precision never changes its Delta type; anything
/// else (unconstrained numeric, larger precision, negative scale) to text.
fn numeric_kind(typmod: i32) -> ColumnKind {
    let Some((precision, scale)) = numeric_typmod(typmod) else {
        return ColumnKind::Text;
    };
    if (1..=38).contains(&precision) && (0..=precision).contains(&scale) {
        ColumnKind::Decimal {
            precision: 38,
            scale: scale as i8,
        }
    } else {
        ColumnKind::Text
    }
}

/// `(precision, scale)` of a `numeric` type modifier; `None` when unconstrained.
pub fn numeric_typmod(typmod: i32) -> Option<(i32, i32)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    // The scale is an 11-bit signed field since Postgres 15.
    Some(((t >> 16) & 0xFFFF, ((t & 0x7FF) ^ 1024) - 1024))
}

/// A parsed value, ready for a typed builder.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int64(i64),
    Float32(f32),
    Float64(f64),
    Decimal(i128),
    Text(String),
    Date(i32),
    Micros(i64),
    Bytes(Vec<u8>),
    List(Vec<Option<Value>>),
}

/// Parses a text-form value into `kind`. `None` means the value has no exact typed form
/// (e.g. `NaN` for `numeric(10,2)`, `infinity` for a date): the caller keeps its text.
pub fn parse_value(kind: &ColumnKind, text: &str) -> Option<Value> {
    Some(match kind {
        ColumnKind::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return None,
        },
        ColumnKind::Int64 => Value::Int64(text.parse().ok()?),
        ColumnKind::Float32 => Value::Float32(text.parse().ok()?),
        ColumnKind::Float64 => Value::Float64(text.parse().ok()?),
        ColumnKind::Decimal { precision, scale } => {
            Value::Decimal(parse_decimal(text, *precision, *scale)?)
        }
        ColumnKind::Text => Value::Text(text.to_string()),
        ColumnKind::Date => Value::Date(parse_date(text)?),
        ColumnKind::Timestamp => Value::Micros(parse_timestamp(text, false)?),
        ColumnKind::TimestampTz => Value::Micros(parse_timestamp(text, true)?),
        ColumnKind::Bytea => Value::Bytes(parse_bytea_hex(text)?),
        ColumnKind::List(elem) => {
            let items = parse_array(text)?;
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(match item {
                    None => None,
                    Some(s) => Some(parse_value(elem, &s)?),
                });
            }
            Value::List(out)
        }
    })
}

/// Parses `-123.45` into an integer scaled by 10^scale, checking the precision.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Option<i128> {
    let (neg, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int_part, frac_part) = body.split_once('.').unwrap_or((body, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let scale = usize::try_from(scale).ok()?;
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // Extra fractional digits are allowed only when they are zeros (no rounding, ever).
    let (kept, dropped) = frac_part.split_at(frac_part.len().min(scale));
    if dropped.bytes().any(|b| b != b'0') {
        return None;
    }
    let int_digits = int_part.trim_start_matches('0');
    if int_digits.len() + scale > precision as usize {
        return None;
    }
    let mut v: i128 = 0;
    for b in int_digits.bytes().chain(kept.bytes()) {
        v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for _ in kept.len()..scale {
        v = v.checked_mul(10)?;
    }
    Some(if neg { -v } else { v })
}

/// Days since 1970-01-01 for `YYYY-MM-DD[ BC]`; `None` for infinity or out of range.
pub fn parse_date(text: &str) -> Option<i32> {
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let date = ymd(body, bc)?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from(date.signed_duration_since(epoch).num_days()).ok()
}

fn ymd(text: &str, bc: bool) -> Option<chrono::NaiveDate> {
    let mut parts = text.splitn(3, '-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    // 1 BC is year 0 in the proleptic Gregorian calendar chrono uses.
    let y = if bc { 1 - y } else { y };
    chrono::NaiveDate::from_ymd_opt(y, m, d)
}

/// Microseconds since the Unix epoch for Postgres's ISO output
/// (`2024-01-05 13:00:00.123456+00`, with ` BC` possibly appended).
pub fn parse_timestamp(text: &str, with_tz: bool) -> Option<i64> {
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let (date_part, rest) = body.split_once(' ')?;
    let date = ymd(date_part, bc)?;
    // Split off a UTC offset: the last '+' or '-' in the time part.
    let (time_part, offset_secs) = if with_tz {
        let idx = rest.rfind(['+', '-'])?;
        let (t, off) = rest.split_at(idx);
        (t, parse_offset(off)?)
    } else {
        (rest, 0)
    };
    let (hms, frac) = time_part.split_once('.').unwrap_or((time_part, ""));
    let mut hms_parts = hms.split(':');
    // Unsigned parsing: a sign or an absurd number is not a time (no overflow below).
    let h = i64::from(hms_parts.next()?.parse::<u8>().ok()?);
    let mi = i64::from(hms_parts.next()?.parse::<u8>().ok()?);
    let s = i64::from(hms_parts.next()?.parse::<u8>().ok()?);
    if hms_parts.next().is_some() || h > 24 || mi > 59 || s > 60 || frac.len() > 6 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut micros: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    let days = date.signed_duration_since(epoch).num_days();
    let secs = days
        .checked_mul(86_400)?
        .checked_add(h * 3600 + mi * 60 + s)?
        .checked_sub(offset_secs)?;
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

fn parse_offset(text: &str) -> Option<i64> {
    let sign = match text.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut parts = text[1..].split(':');
    let mut field = || -> Option<i64> {
        match parts.next() {
            None => Some(0),
            Some(p) => p.parse::<u8>().ok().map(i64::from).filter(|v| *v < 60),
        }
    };
    let (h, m, s) = (field()?, field()?, field()?);
    if parts.next().is_some() {
        return None;
    }
    Some(sign * (h * 3600 + m * 60 + s))
}

/// `\x0a0b…` (bytea_output = hex).
pub fn parse_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |b: u8| -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    };
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Elements of a one-dimensional array literal (`{1,NULL,"a \"b\""}`). `None` for
/// multi-dimensional arrays, explicit bounds (`[0:1]={…}`) or malformed text.
pub fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Some(items);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            quoted = true;
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '}' || c == '"' {
                    return None;
                }
                if c == '\\' {
                    chars.next();
                    item.push(chars.next()?);
                    continue;
                }
                item.push(c);
                chars.next();
            }
        }
        if !quoted && item.eq_ignore_ascii_case("NULL") {
            items.push(None);
        } else {
            items.push(Some(item));
        }
        match chars.next() {
            None => return Some(items),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds() -> Vec<ColumnKind> {
        vec![
            ColumnKind::Bool,
            ColumnKind::Int64,
            ColumnKind::Float32,
            ColumnKind::Float64,
            ColumnKind::Decimal {
                precision: 12,
                scale: 2,
            },
            ColumnKind::Decimal {
                precision: 38,
                scale: 0,
            },
            ColumnKind::Decimal {
                precision: 5,
                scale: -2,
            },
            ColumnKind::Text,
            ColumnKind::Date,
            ColumnKind::Timestamp,
            ColumnKind::TimestampTz,
            ColumnKind::Bytea,
            ColumnKind::List(Box::new(ColumnKind::Int64)),
            ColumnKind::List(Box::new(ColumnKind::Text)),
        ]
    }

    /// The committed corpus of value texts (`tests/corpus/values.txt`), through every
    /// parser: each parses or gives `None`, never panics.
    #[test]
    fn the_committed_value_corpus_never_panics() {
        let corpus = include_str!("../tests/corpus/values.txt");
        let mut replayed = 0;
        for line in corpus.lines() {
            if line.starts_with('#') {
                continue;
            }
            for kind in kinds() {
                let _ = parse_value(&kind, line);
            }
            let _ = parse_array(line);
            let _ = parse_bytea_hex(line);
            replayed += 1;
        }
        assert!(replayed >= 40, "corpus too small: {replayed}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::source::pgoutput::tests::fuzz_cases()))]

        #[test]
        fn any_text_through_any_parser_never_panics(text in ".{0,64}", k in 0usize..14) {
            let _ = parse_value(&kinds()[k], &text);
            let _ = parse_array(&text);
        }

        #[test]
        fn value_shaped_text_never_panics(
            text in "[-+0-9.eE:TZ {},\"\\\\xNnUuLlIiFfAaYy ]{0,40}",
            k in 0usize..14,
        ) {
            let _ = parse_value(&kinds()[k], &text);
        }

        #[test]
        fn decimals_round_trip(units in any::<i64>(), scale in 0i8..6) {
            let text = {
                let digits = units.unsigned_abs().to_string();
                let s = scale as usize;
                let padded = format!("{digits:0>width$}", width = s + 1);
                let (int, frac) = padded.split_at(padded.len() - s);
                let sign = if units < 0 { "-" } else { "" };
                if s == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") }
            };
            prop_assert_eq!(parse_decimal(&text, 38, scale), Some(units as i128), "{}", text);
        }
    }

    #[test]
    fn maps_types() {
        assert_eq!(
            ColumnKind::from_pg(oid::NUMERIC, ((12 << 16) | 2) + 4),
            ColumnKind::Decimal {
                precision: 38,
                scale: 2
            }
        );
        assert_eq!(ColumnKind::from_pg(oid::NUMERIC, -1), ColumnKind::Text);
        assert_eq!(
            ColumnKind::from_pg(1007, -1),
            ColumnKind::List(Box::new(ColumnKind::Int64))
        );
        assert_eq!(ColumnKind::from_pg(2950, -1), ColumnKind::Text);
        assert_eq!(ColumnKind::from_pg(99999, -1), ColumnKind::Text);
    }

    #[test]
    fn decimals_are_exact_or_refused() {
        assert_eq!(parse_decimal("1234.56", 10, 2), Some(123456));
        assert_eq!(parse_decimal("-0.5", 10, 2), Some(-50));
        assert_eq!(parse_decimal("12", 4, 2), Some(1200));
        assert_eq!(parse_decimal("123", 4, 2), None);
        assert_eq!(parse_decimal("1.005", 10, 2), None);
        assert_eq!(parse_decimal("NaN", 10, 2), None);
        assert_eq!(
            parse_decimal("99999999999999999999999999999999999999", 38, 0),
            Some(99999999999999999999999999999999999999)
        );
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(parse_date("1970-01-02"), Some(1));
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        assert_eq!(parse_date("infinity"), None);
        assert_eq!(parse_date("0001-01-01 BC"), parse_date("0000-01-01"));
        assert_eq!(
            parse_timestamp("1970-01-01 00:00:01.5", false),
            Some(1_500_000)
        );
        assert_eq!(
            parse_timestamp("2024-01-05 13:00:00+00", true),
            Some(1_704_459_600_000_000)
        );
        assert_eq!(
            parse_timestamp("2024-01-05 10:00:00-03", true),
            Some(1_704_459_600_000_000)
        );
        assert_eq!(
            parse_timestamp("2024-01-05 10:00:00-03:30", true),
            Some(1_704_461_400_000_000)
        );
        assert_eq!(parse_timestamp("infinity", true), None);
        assert_eq!(parse_timestamp("-infinity", false), None);
        // Hostile text never overflows: it is simply not a timestamp.
        assert_eq!(
            parse_timestamp("2024-01-05 -9223372036854775808:00:00", false),
            None
        );
        assert_eq!(
            parse_timestamp("2024-01-05 10:00:00+99999999999999", true),
            None
        );
        assert_eq!(
            parse_timestamp("9999-12-31 23:59:59.999999+00", true),
            Some(253_402_300_799_999_999)
        );
    }

    #[test]
    fn bytea_and_arrays() {
        assert_eq!(parse_bytea_hex("\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(parse_bytea_hex("\\x0"), None);
        assert_eq!(
            parse_array(r#"{1,NULL,"a \"b\"",""}"#),
            Some(vec![
                Some("1".into()),
                None,
                Some("a \"b\"".into()),
                Some("".into())
            ])
        );
        assert_eq!(parse_array("{}"), Some(vec![]));
        assert_eq!(parse_array("{{1,2},{3,4}}"), None);
        assert_eq!(parse_array("[0:1]={1,2}"), None);
        assert_eq!(
            parse_value(&ColumnKind::List(Box::new(ColumnKind::Int64)), "{1,2,NULL}"),
            Some(Value::List(vec![
                Some(Value::Int64(1)),
                Some(Value::Int64(2)),
                None
            ]))
        );
    }
}
