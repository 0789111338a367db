//! Schema changes: reconciles the columns the source sends with the columns the lake has.
//!
//! - A column the source added becomes a new nullable column (older rows read as NULL).
//! - A column the source dropped stays in the lake and is no longer filled: raw history
//!   keeps its old values, new raw rows have NULL, and curated rows keep the value they had
//!   until the row is next written (then NULL).
//! - A type change is applied when the lake's type already holds every value of the new
//!   type: all integers are stored as 64-bit, `numeric(p,s)` as `decimal(38,s)` and text
//!   types as strings, so `integer → bigint`, `numeric(10,2) → numeric(14,2)` and
//!   `varchar(n) → text` need no Delta change at all.
//! - Any other type change stops the daemon with [`TypeChanged`] naming the table, the
//!   column, both types and the operator's options.

use deltalake::arrow::datatypes::Schema;

use crate::change::{ColumnSpec, METADATA_COLUMNS};
use crate::pg_types::{ColumnKind, numeric_typmod, oid};

/// OIDs from here on belong to user-defined types (`FirstNormalObjectId`).
const FIRST_USER_OID: u32 = 16384;

/// A column's type changed in a way the lake cannot store losslessly.
#[derive(Debug, thiserror::Error)]
#[error(
    "table {table}: column {column} changed from {old_type} to {new_type}, which the lake \
     cannot store losslessly in its existing {lake_type} column. Either revert the change in \
     Postgres, or stop wal2delta, move the table's raw and curated Delta tables aside \
     ({table} under <lake>/raw and <lake>/curated) and start it again: they are re-created \
     with the new type and, with source.snapshot = \"initial\", copied afresh"
)]
pub struct TypeChanged {
    pub table: String,
    pub column: String,
    pub old_type: String,
    pub new_type: String,
    pub lake_type: String,
}

/// A readable name for a Postgres type.
pub fn pg_type_name(type_oid: u32, typmod: i32) -> String {
    match type_oid {
        oid::BOOL => "boolean".into(),
        oid::BYTEA => "bytea".into(),
        oid::INT8 => "bigint".into(),
        oid::INT2 => "smallint".into(),
        oid::INT4 => "integer".into(),
        25 => "text".into(),
        1043 if typmod >= 4 => format!("varchar({})", typmod - 4),
        1043 => "varchar".into(),
        oid::FLOAT4 => "real".into(),
        oid::FLOAT8 => "double precision".into(),
        oid::DATE => "date".into(),
        oid::TIMESTAMP => "timestamp".into(),
        oid::TIMESTAMPTZ => "timestamptz".into(),
        oid::NUMERIC => match numeric_typmod(typmod) {
            Some((p, s)) => format!("numeric({p},{s})"),
            None => "numeric".into(),
        },
        0 => "a dropped column".into(),
        other => format!("the type with OID {other}"),
    }
}

/// Checks a column whose type the source now reports differently; returns the updated
/// column when the lake's type still holds every value.
pub fn retype(
    table: &str,
    lake: &ColumnSpec,
    type_oid: u32,
    typmod: i32,
) -> Result<ColumnSpec, TypeChanged> {
    let kind = ColumnKind::from_pg(type_oid, typmod);
    if kind != lake.kind && lake.type_oid != 0 {
        return Err(TypeChanged {
            table: table.to_string(),
            column: lake.name.clone(),
            old_type: pg_type_name(lake.type_oid, lake.type_modifier),
            new_type: pg_type_name(type_oid, typmod),
            lake_type: format!("{}", lake.kind.arrow_type()),
        });
    }
    if kind != lake.kind {
        // A dropped column came back with another type.
        return Err(TypeChanged {
            table: table.to_string(),
            column: lake.name.clone(),
            old_type: format!("{} (dropped)", lake.kind.arrow_type()),
            new_type: pg_type_name(type_oid, typmod),
            lake_type: format!("{}", lake.kind.arrow_type()),
        });
    }
    Ok(ColumnSpec {
        name: lake.name.clone(),
        kind,
        type_oid,
        type_modifier: typmod,
    })
}

/// The lake columns for a table: the existing raw table's columns in their order (those
/// the source dropped included), with the source's current types, then the columns the
/// source added.
pub fn reconcile(
    table: &str,
    existing: Option<&Schema>,
    source: &[ColumnSpec],
) -> Result<Vec<ColumnSpec>, TypeChanged> {
    let Some(existing) = existing else {
        return Ok(source.to_vec());
    };
    let mut out = Vec::new();
    for field in existing.fields() {
        if METADATA_COLUMNS.contains(&field.name().as_str()) {
            continue;
        }
        let kind = ColumnKind::from_arrow(field.data_type());
        match (source.iter().find(|c| c.name == *field.name()), kind) {
            (Some(col), Some(kind)) if col.kind == kind => out.push(col.clone()),
            // A user-defined type (a domain) added while streaming was stored as text —
            // the stream does not say a domain's base type — and stays text.
            (Some(col), Some(ColumnKind::Text)) if col.type_oid >= FIRST_USER_OID => {
                out.push(ColumnSpec {
                    kind: ColumnKind::Text,
                    ..col.clone()
                })
            }
            (Some(col), lake_kind) => {
                return Err(TypeChanged {
                    table: table.to_string(),
                    column: col.name.clone(),
                    old_type: format!("{} (in the lake)", field.data_type()),
                    new_type: pg_type_name(col.type_oid, col.type_modifier),
                    lake_type: lake_kind
                        .map(|k| format!("{}", k.arrow_type()))
                        .unwrap_or_else(|| format!("{}", field.data_type())),
                });
            }
            (None, Some(kind)) => out.push(ColumnSpec {
                name: field.name().clone(),
                kind,
                type_oid: 0,
                type_modifier: -1,
            }),
            (None, None) => {
                return Err(TypeChanged {
                    table: table.to_string(),
                    column: field.name().clone(),
                    old_type: format!("{}", field.data_type()),
                    new_type: "a dropped column".into(),
                    lake_type: format!("{}", field.data_type()),
                });
            }
        }
    }
    for col in source {
        if !out.iter().any(|c| c.name == col.name) {
            out.push(col.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::raw::layout::raw_schema;

    fn col(name: &str, oid: u32, typmod: i32) -> ColumnSpec {
        ColumnSpec {
            name: name.into(),
            kind: ColumnKind::from_pg(oid, typmod),
            type_oid: oid,
            type_modifier: typmod,
        }
    }

    #[test]
    fn added_dropped_and_widened_columns_reconcile() {
        let old = raw_schema(&[
            col("id", 23, -1),
            col("gone", 25, -1),
            col("amount", 1700, (10 << 16 | 2) + 4),
        ]);
        let now = [
            col("id", 20, -1),
            col("amount", 1700, (14 << 16 | 2) + 4),
            col("added", 1082, -1),
        ];
        let cols = reconcile("t", Some(&old), &now).unwrap();
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "gone", "amount", "added"]);
        assert_eq!(cols[1].type_oid, 0);
        let err =
            reconcile("t", Some(&old), &[col("amount", 1700, (10 << 16 | 3) + 4)]).unwrap_err();
        assert!(
            err.to_string().contains("amount") && err.to_string().contains("numeric(10,3)"),
            "{err}"
        );
        assert!(retype("t", &cols[0], 21, -1).is_ok());
        let err = retype("t", &cols[0], 25, -1).unwrap_err().to_string();
        assert!(
            err.contains("column id changed from bigint to text"),
            "{err}"
        );
    }
}
