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
    pub const NAME: u32 = 19;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
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
    let text = text.as_bytes();
    let (neg, body) = match text.first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    // A byte loop, not `split_once`: these values are a few bytes long, and a snapshot
    // parses one per row and column.
    let (int_part, frac_part) = match body.iter().position(|b| *b == b'.') {
        Some(dot) => (&body[..dot], &body[dot + 1..]),
        None => (body, &[][..]),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let scale = usize::try_from(scale).ok()?;
    if !int_part.iter().chain(frac_part).all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Extra fractional digits are allowed only when they are zeros (no rounding, ever).
    let (kept, dropped) = frac_part.split_at(frac_part.len().min(scale));
    if dropped.iter().any(|b| *b != b'0') {
        return None;
    }
    let leading_zeros = int_part.iter().take_while(|b| **b == b'0').count();
    let int_digits = &int_part[leading_zeros..];
    if int_digits.len() + scale > precision as usize {
        return None;
    }
    let digits = int_digits.iter().chain(kept);
    let mut v: i128 = if int_digits.len() + kept.len() <= 18 {
        // Fits in 64 bits: the common case, without 128-bit arithmetic per digit.
        i128::from(digits.fold(0u64, |v, b| v * 10 + u64::from(b - b'0')))
    } else {
        let mut v: i128 = 0;
        for b in digits {
            v = v.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        v
    };
    for _ in kept.len()..scale {
        v = v.checked_mul(10)?;
    }
    Some(if neg { -v } else { v })
}

/// Days since 1970-01-01 for `YYYY-MM-DD[ BC]`; `None` for infinity or out of range.
pub fn parse_date(text: &str) -> Option<i32> {
    match iso_days(text.as_bytes()).filter(|_| text.len() == 10) {
        Some(days) => i32::try_from(days).ok(),
        None => general_date(text),
    }
}

/// [`parse_date`] for every form it takes (BC years, years past 9999).
fn general_date(text: &str) -> Option<i32> {
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
    iso_timestamp(text.as_bytes(), with_tz).or_else(|| general_timestamp(text, with_tz))
}

/// [`parse_timestamp`] for every form it takes (BC years, years past 9999).
fn general_timestamp(text: &str, with_tz: bool) -> Option<i64> {
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

/// The value of `b`, all ASCII digits (`None` otherwise).
fn digits(b: &[u8]) -> Option<i64> {
    b.iter().try_fold(0i64, |v, c| {
        c.is_ascii_digit().then(|| v * 10 + i64::from(c - b'0'))
    })
}

/// Days since 1970-01-01 of the `YYYY-MM-DD` that starts `b` (a valid date of years
/// 0000–9999, proleptic Gregorian as chrono counts them), without chrono: the fast path
/// of [`parse_date`] and [`parse_timestamp`] for what Postgres prints in ISO style.
/// `None` when `b` does not start so; the general parser then decides.
fn iso_days(b: &[u8]) -> Option<i64> {
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(&b[..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if d < 1 || d > month_days {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm): years start in March, so the
    // leap day ends a year. `y` is at least -1 here, so plain division is floor division.
    let y = if m <= 2 { y - 1 } else { y };
    let era = (y + 400) / 400 - 1;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Microseconds since the Unix epoch for exactly `YYYY-MM-DD HH:MM:SS[.f{1,6}]`, followed
/// (with `with_tz`) by `±HH[:MM[:SS]]`: the fast path of [`parse_timestamp`], giving what
/// the general parser gives for these shapes, or `None` to leave the text to it.
fn iso_timestamp(b: &[u8], with_tz: bool) -> Option<i64> {
    if b.len() < 19 || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let days = iso_days(b)?;
    let (h, mi, s) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if h > 24 || mi > 59 || s > 60 {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros = 0;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = digits(&frac[..n])? * 10i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    let mut offset = 0;
    if with_tz {
        let sign = match rest.first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let fields = &rest[1..];
        // ±HH, ±HH:MM or ±HH:MM:SS, each field under 60.
        if !matches!(fields.len(), 2 | 5 | 8) {
            return None;
        }
        for (i, unit) in [3600, 60, 1]
            .into_iter()
            .enumerate()
            .take(fields.len().div_ceil(3))
        {
            if i > 0 && fields[3 * i - 1] != b':' {
                return None;
            }
            let v = digits(&fields[3 * i..3 * i + 2])?;
            if v >= 60 {
                return None;
            }
            offset += sign * v * unit;
        }
    } else if !rest.is_empty() {
        return None;
    }
    Some((days * 86_400 + h * 3600 + mi * 60 + s - offset) * 1_000_000 + micros)
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
    fn the_iso_fast_paths_agree_with_the_general_parsers() {
        // Every date of years 0000–0002, 1969–1971, 2000, 2100, 9999 and some invalid
        // ones, in every time and offset shape; the fast path must give what the general
        // parser gives whenever it answers.
        let mut checked = 0;
        for y in [0, 1, 2, 1969, 1970, 1971, 2000, 2024, 2100, 9999] {
            for m in 0..=13 {
                for d in 0..=32 {
                    let date = format!("{y:04}-{m:02}-{d:02}");
                    let bytes = date.as_bytes();
                    let fast = iso_days(bytes).and_then(|v| i32::try_from(v).ok());
                    assert_eq!(
                        fast.or_else(|| general_date(&date)),
                        general_date(&date),
                        "{date}"
                    );
                    if fast.is_some() {
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 3000, "{checked}");
        let times = [
            "00:00:00", "23:59:59", "24:00:00", "12:60:00", "12:00:61", "25:00:00",
        ];
        let fracs = ["", ".", ".5", ".123456", ".1234567", ".12a"];
        let offsets = [
            "",
            "+00",
            "-03",
            "+05:30",
            "-09:30:15",
            "+60",
            "+5",
            "+05:3",
            "+05:30:1",
        ];
        let mut fast = 0;
        for date in [
            "1970-01-01",
            "2024-02-29",
            "2023-02-29",
            "9999-12-31",
            "0000-03-01",
        ] {
            for time in times {
                for frac in fracs {
                    for offset in offsets {
                        for with_tz in [false, true] {
                            let text = format!("{date} {time}{frac}{offset}");
                            if let Some(v) = iso_timestamp(text.as_bytes(), with_tz) {
                                assert_eq!(Some(v), general_timestamp(&text, with_tz), "{text}");
                                fast += 1;
                            }
                        }
                    }
                }
            }
        }
        // Valid shapes: 4 of 5 dates × 3 of 6 times × 3 fractions × 4 or 1 endings.
        assert_eq!(
            fast,
            4 * 3 * 3 * (4 + 1),
            "timestamps the fast path answered"
        );
        assert_eq!(
            parse_timestamp("2024-01-05 10:00:00.25-03:30", true),
            Some(1_704_461_400_250_000)
        );
        assert_eq!(parse_date("2024-02-30"), None);
        assert_eq!(parse_timestamp("1970-01-01 00:00:00.", false), Some(0));
        assert_eq!(parse_decimal("0012.50", 5, 2), Some(1250));
        assert_eq!(parse_decimal("-.5", 3, 1), Some(-5));
        assert_eq!(parse_decimal("1.2.3", 9, 2), None);
        assert_eq!(parse_decimal(".", 9, 2), None);
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
