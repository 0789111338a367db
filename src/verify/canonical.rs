//! The canonical form `verify` hashes on both sides: an SQL expression computes it on the
//! source, [`ValueWriter`] computes it from the lake's Arrow values, and the two must agree
//! byte for byte for equal rows.
//!
//! A value's canonical text is `v` + a typed body (integers in decimal, floats as the hex of
//! their IEEE bytes, decimals with exactly their scale, dates as days and timestamps as
//! microseconds since the Unix epoch, bytes in hex, text as Postgres prints it), or `f` +
//! Postgres's text for a value the lake keeps in `_fallback` (`infinity`, `NaN`). A row is
//! the concatenation of its columns' pieces, each `<chars>:<canonical>` or `n` for NULL,
//! so no two rows share a canonical form. The key's SHA-256 picks the row's bucket (a
//! range of the hash space); the row's SHA-256 is what the buckets sum (Postgres 11+ has
//! `sha256()`; `ring`, which the TLS stack builds anyway, computes it here).

use std::fmt::Write as _;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Decimal128Array,
    Float32Array, Float64Array, Int64Array, ListArray, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::error::ArrowError;

use crate::pg_types::ColumnKind;
use crate::table_name::quote_ident;

/// The bits every NaN is hashed as (Rust's `f32::NAN`, `f64::NAN`).
const NAN32: &str = "7fc00000";
const NAN64: &str = "7ff8000000000000";

/// A column compared on both sides.
#[derive(Debug, Clone)]
pub struct Compared {
    pub name: String,
    pub kind: ColumnKind,
    pub type_oid: u32,
}

/// The SQL expression of `column`'s canonical text over the table alias `s` (NULL for NULL).
pub fn sql_value(column: &Compared) -> String {
    let x = format!("s.{}", quote_ident(&column.name));
    let typed = match typed_condition(&column.kind, &x) {
        Some(cond) => format!(
            "CASE WHEN {cond} THEN 'v' || {} ELSE 'f' || ({x})::text END",
            typed_body(&column.kind, &x)
        ),
        None => format!("'v' || {}", typed_body(&column.kind, &x)),
    };
    format!("CASE WHEN {x} IS NULL THEN NULL ELSE {typed} END")
}

/// The SQL piece of an already canonical value `x`: `<chars>:<x>`, or `n` for NULL.
pub fn sql_piece(x: &str) -> String {
    format!("coalesce(length({x})::text || ':' || {x}, 'n')")
}

/// When the lake has a typed value (otherwise `_fallback` keeps Postgres's text).
fn typed_condition(kind: &ColumnKind, x: &str) -> Option<String> {
    match kind {
        ColumnKind::Date | ColumnKind::Timestamp | ColumnKind::TimestampTz => {
            Some(format!("isfinite({x})"))
        }
        ColumnKind::Decimal { .. } => Some(format!(
            "({x})::text NOT IN ('NaN', 'Infinity', '-Infinity')"
        )),
        ColumnKind::List(elem) => {
            let mut cond = format!("coalesce(array_ndims({x}), 1) = 1");
            if let Some(inner) = typed_condition(elem, "u.e") {
                let _ = write!(
                    cond,
                    " AND NOT EXISTS (SELECT 1 FROM unnest({x}) AS u(e) \
                     WHERE u.e IS NOT NULL AND NOT ({inner}))"
                );
            }
            Some(cond)
        }
        _ => None,
    }
}

/// The typed body of a non-NULL value `x`.
fn typed_body(kind: &ColumnKind, x: &str) -> String {
    match kind {
        ColumnKind::Bool | ColumnKind::Int64 => format!("({x})::text"),
        // Every NaN as one bit pattern (Rust's), whatever sign or payload it carries.
        ColumnKind::Float32 => format!(
            "CASE WHEN ({x})::float4 = 'NaN' THEN '{NAN32}' ELSE encode(float4send(({x})::float4), 'hex') END"
        ),
        ColumnKind::Float64 => format!(
            "CASE WHEN ({x})::float8 = 'NaN' THEN '{NAN64}' ELSE encode(float8send(({x})::float8), 'hex') END"
        ),
        ColumnKind::Decimal { scale, .. } => format!("round({x}, {scale})::text"),
        // The type's output function, as pgoutput sends it: a `::text` cast may differ
        // (`inet` adds the mask, `char(n)` drops its padding).
        ColumnKind::Text => format!("format('%s', {x})"),
        ColumnKind::Date => format!("(({x}) - date '1970-01-01')::text"),
        ColumnKind::Timestamp | ColumnKind::TimestampTz => {
            format!("round(extract(epoch from {x}) * 1000000)::bigint::text")
        }
        ColumnKind::Bytea => format!("encode({x}, 'hex')"),
        ColumnKind::List(elem) => {
            let value = format!(
                "CASE WHEN u.e IS NULL THEN NULL ELSE 'v' || {} END",
                typed_body(elem, "u.e")
            );
            format!(
                "(SELECT coalesce(string_agg({}, '' ORDER BY u.o), '') \
                 FROM unnest({x}) WITH ORDINALITY AS u(e, o))",
                sql_piece(&format!("({value})"))
            )
        }
    }
}

/// Appends one piece (`<chars>:<canonical>` or `n`) to `out`.
pub fn push_piece(out: &mut String, canonical: Option<&str>) {
    match canonical {
        Some(c) => {
            let _ = write!(out, "{}:{c}", c.chars().count());
        }
        None => out.push('n'),
    }
}

/// Splits a canonical key back into its values, for reports (`None` for NULL).
pub fn split_pieces(mut text: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    while !text.is_empty() {
        if let Some(rest) = text.strip_prefix('n') {
            out.push(None);
            text = rest;
            continue;
        }
        let Some((len, rest)) = text.split_once(':') else {
            break;
        };
        let Ok(len) = len.parse::<usize>() else {
            break;
        };
        let end = rest
            .char_indices()
            .nth(len)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        let value = &rest[..end];
        // Drop the `v`/`f` marker.
        out.push(Some(value.get(1..).unwrap_or_default().to_string()));
        text = &rest[end..];
    }
    out
}

/// The bucket of a canonical key among `2^bits` ranges of the hash space.
pub fn bucket(key: &str, bits: u32) -> u32 {
    let digest = sha256(key);
    let d = digest.as_ref();
    let high = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    if bits == 0 { 0 } else { high >> (32 - bits) }
}

/// A row's 60-bit hash (the first 15 hex digits of its SHA-256), as the source computes it.
pub fn row_hash(row: &str) -> u64 {
    let digest = sha256(row);
    let mut high = [0u8; 8];
    high.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(high) >> 4
}

fn sha256(text: &str) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
}

/// The SQL of the same: `kb` (the key's 32-bit hash) and `rb` (the row's 60-bit hash) for
/// canonical key and row expressions.
pub fn sql_hashes(key: &str, row: &str) -> (String, String) {
    (
        format!(
            "('x' || substr(encode(sha256(convert_to({key}, 'UTF8')), 'hex'), 1, 8))::bit(32)::bigint"
        ),
        format!(
            "('x' || substr(encode(sha256(convert_to({row}, 'UTF8')), 'hex'), 1, 15))::bit(60)::bigint"
        ),
    )
}

/// Writes canonical values of one Arrow column (cast to the column kind's Arrow type).
pub struct ValueWriter {
    array: ArrayRef,
    kind: ColumnKind,
}

impl ValueWriter {
    pub fn new(array: &ArrayRef, kind: &ColumnKind) -> Result<ValueWriter, ArrowError> {
        let array = if array.data_type() == &kind.arrow_type() {
            array.clone()
        } else {
            cast(array, &kind.arrow_type())?
        };
        Ok(ValueWriter {
            array,
            kind: kind.clone(),
        })
    }

    /// Row `row`'s canonical value, `fallback` being the column's `_fallback` text.
    pub fn value(&self, row: usize, fallback: Option<&str>) -> Option<String> {
        if self.array.is_null(row) {
            return fallback.map(|text| format!("f{text}"));
        }
        let mut out = String::from("v");
        write_body(&self.array, &self.kind, row, &mut out);
        Some(out)
    }
}

fn write_body(array: &ArrayRef, kind: &ColumnKind, row: usize, out: &mut String) {
    let any = array.as_any();
    match kind {
        ColumnKind::Bool => {
            if let Some(a) = any.downcast_ref::<BooleanArray>() {
                out.push_str(if a.value(row) { "true" } else { "false" });
            }
        }
        ColumnKind::Int64 => {
            if let Some(a) = any.downcast_ref::<Int64Array>() {
                let _ = write!(out, "{}", a.value(row));
            }
        }
        ColumnKind::Float32 => {
            if let Some(a) = any.downcast_ref::<Float32Array>() {
                match a.value(row) {
                    v if v.is_nan() => out.push_str(NAN32),
                    v => hex(out, &v.to_be_bytes()),
                }
            }
        }
        ColumnKind::Float64 => {
            if let Some(a) = any.downcast_ref::<Float64Array>() {
                match a.value(row) {
                    v if v.is_nan() => out.push_str(NAN64),
                    v => hex(out, &v.to_be_bytes()),
                }
            }
        }
        ColumnKind::Decimal { scale, .. } => {
            if let Some(a) = any.downcast_ref::<Decimal128Array>() {
                decimal(out, a.value(row), *scale);
            }
        }
        ColumnKind::Text => {
            if let Some(a) = any.downcast_ref::<StringArray>() {
                out.push_str(a.value(row));
            }
        }
        ColumnKind::Date => {
            if let Some(a) = any.downcast_ref::<Date32Array>() {
                let _ = write!(out, "{}", a.value(row));
            }
        }
        ColumnKind::Timestamp | ColumnKind::TimestampTz => {
            if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
                let _ = write!(out, "{}", a.value(row));
            }
        }
        ColumnKind::Bytea => {
            if let Some(a) = any.downcast_ref::<BinaryArray>() {
                hex(out, a.value(row));
            }
        }
        ColumnKind::List(elem) => {
            if let Some(a) = any.downcast_ref::<ListArray>() {
                let items = a.value(row);
                for i in 0..items.len() {
                    if items.is_null(i) {
                        push_piece(out, None);
                    } else {
                        let mut value = String::from("v");
                        write_body(&items, elem, i, &mut value);
                        push_piece(out, Some(&value));
                    }
                }
            }
        }
    }
}

fn hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

/// `-12.50` for 1250 at scale 2, as Postgres prints `round(x, 2)`.
fn decimal(out: &mut String, value: i128, scale: i8) {
    let scale = scale.max(0) as usize;
    let digits = value.unsigned_abs().to_string();
    if value < 0 {
        out.push('-');
    }
    if scale == 0 {
        out.push_str(&digits);
        return;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    out.push_str(int);
    out.push('.');
    out.push_str(frac);
}

/// The `_fallback` texts of one row, by column.
pub fn fallbacks(
    column: Option<&ArrayRef>,
    row: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let Some(array) = column else {
        return Default::default();
    };
    let Some(strings) = array.as_string_opt::<i32>() else {
        return Default::default();
    };
    if strings.is_null(row) {
        return Default::default();
    }
    match serde_json::from_str(strings.value(row)) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_print_their_scale() {
        let mut s = String::new();
        decimal(&mut s, 1250, 2);
        assert_eq!(s, "12.50");
        s.clear();
        decimal(&mut s, -5, 2);
        assert_eq!(s, "-0.05");
        s.clear();
        decimal(&mut s, 0, 3);
        assert_eq!(s, "0.000");
        s.clear();
        decimal(&mut s, 42, 0);
        assert_eq!(s, "42");
    }

    #[test]
    fn pieces_split_back_into_values() {
        let mut key = String::new();
        push_piece(&mut key, Some("v42"));
        push_piece(&mut key, None);
        push_piece(&mut key, Some("vçã:1"));
        assert_eq!(
            split_pieces(&key),
            vec![Some("42".into()), None, Some("çã:1".into())]
        );
    }

    #[test]
    fn hashes_match_postgres_sha256() {
        // encode(sha256('a'), 'hex') = ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb
        assert_eq!(bucket("a", 32), 0xca978112);
        assert_eq!(bucket("a", 4), 0xc);
        assert_eq!(row_hash("a"), 0xca978112ca1bbdc);
    }
}
