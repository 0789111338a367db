//! Catalog functions psql's describe commands call that datafusion-postgres lacks:
//! `pg_size_pretty`, the size functions, `obj_description` and its kin,
//! `pg_function_is_visible` and the function-signature functions of `\df` and `\df+`.
//!
//! # Design
//! - `pg_size_pretty` is Postgres's own algorithm (units up to PB, the same rounding), so
//!   a size reads as in Postgres.
//! - The lake has no Postgres relation sizes or comments: `pg_table_size`,
//!   `pg_database_size`, `pg_indexes_size` answer NULL (psql shows an empty Size) and the
//!   description functions NULL (no comments are replicated). `pg_function_is_visible`
//!   answers true: every function the endpoint lists is callable. The emulated
//!   `pg_proc` carries no signatures or bodies, so `pg_get_function_result`/`…_arguments`/
//!   `…_sqlbody` answer NULL.

use std::sync::Arc;

use deltalake::datafusion::arrow::array::{Array, ArrayRef, Int64Array, StringArray};
use deltalake::datafusion::arrow::datatypes::DataType;
use deltalake::datafusion::common::{DataFusionError, ScalarValue};
use deltalake::datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use deltalake::datafusion::prelude::SessionContext;

/// Registers the functions in `ctx`.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(SizePretty::new()));
    for (name, data_type, value) in [
        ("pg_table_size", DataType::Int64, ScalarValue::Int64(None)),
        ("pg_indexes_size", DataType::Int64, ScalarValue::Int64(None)),
        (
            "pg_database_size",
            DataType::Int64,
            ScalarValue::Int64(None),
        ),
        ("obj_description", DataType::Utf8, ScalarValue::Utf8(None)),
        ("col_description", DataType::Utf8, ScalarValue::Utf8(None)),
        ("shobj_description", DataType::Utf8, ScalarValue::Utf8(None)),
        (
            "pg_get_function_result",
            DataType::Utf8,
            ScalarValue::Utf8(None),
        ),
        (
            "pg_get_function_arguments",
            DataType::Utf8,
            ScalarValue::Utf8(None),
        ),
        (
            "pg_get_function_identity_arguments",
            DataType::Utf8,
            ScalarValue::Utf8(None),
        ),
        (
            "pg_get_function_sqlbody",
            DataType::Utf8,
            ScalarValue::Utf8(None),
        ),
        (
            "pg_function_is_visible",
            DataType::Boolean,
            ScalarValue::Boolean(Some(true)),
        ),
    ] {
        ctx.register_udf(ScalarUDF::from(Constant {
            name,
            signature: Signature::variadic_any(Volatility::Stable),
            data_type,
            value,
        }));
    }
}

/// A function whose answer does not depend on its arguments.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: &'static str,
    signature: Signature,
    data_type: DataType,
    value: ScalarValue,
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType, DataFusionError> {
        Ok(self.data_type.clone())
    }
    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> Result<ColumnarValue, DataFusionError> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

/// `pg_size_pretty(bigint)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SizePretty {
    signature: Signature,
}

impl SizePretty {
    fn new() -> SizePretty {
        SizePretty {
            // Any number, cast to bigint (`coerce_types`), as Postgres takes bigint and numeric.
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for SizePretty {
    fn name(&self) -> &str {
        "pg_size_pretty"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType, DataFusionError> {
        Ok(DataType::Utf8)
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>, DataFusionError> {
        match arg_types {
            [t] if t.is_numeric() || t.is_null() => Ok(vec![DataType::Int64]),
            _ => Err(DataFusionError::Plan(
                "pg_size_pretty takes one number (bytes)".into(),
            )),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue, DataFusionError> {
        let [arg] = args.args.as_slice() else {
            return Err(DataFusionError::Plan(
                "pg_size_pretty takes one argument".into(),
            ));
        };
        let arrays = ColumnarValue::values_to_arrays(std::slice::from_ref(arg))?;
        let sizes = arrays[0]
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| DataFusionError::Plan("pg_size_pretty takes a bigint".into()))?;
        let out: StringArray = sizes.iter().map(|s| s.map(size_pretty)).collect();
        let out: ArrayRef = Arc::new(out);
        Ok(match arg {
            ColumnarValue::Scalar(_) => {
                ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?)
            }
            ColumnarValue::Array(_) => ColumnarValue::Array(out),
        })
    }
}

/// Postgres's `pg_size_pretty` (`dbsize.c`): bytes below 10 kB, then kB, MB, GB, TB and
/// PB below 20 units, rounded half away from zero.
fn size_pretty(size: i64) -> String {
    // (name, limit, round, unit bits)
    const UNITS: [(&str, i64, bool, u32); 6] = [
        ("bytes", 10 * 1024, false, 0),
        ("kB", 20 * 1024 - 1, true, 10),
        ("MB", 20 * 1024 - 1, true, 20),
        ("GB", 20 * 1024 - 1, true, 30),
        ("TB", 20 * 1024 - 1, true, 40),
        ("PB", 20 * 1024 - 1, true, 50),
    ];
    let half_rounded = |x: i64| (x + if x < 0 { -1 } else { 1 }) / 2;
    let mut size = size;
    for (i, &(name, limit, round, bits)) in UNITS.iter().enumerate() {
        let last = i + 1 == UNITS.len();
        if size.unsigned_abs() < limit as u64 || last {
            if round {
                size = half_rounded(size);
            }
            return format!("{size} {name}");
        }
        let (_, _, next_round, next_bits) = UNITS[i + 1];
        let shift = next_bits - bits - u32::from(next_round) + u32::from(round);
        size /= 1i64 << shift;
    }
    unreachable!("the last unit returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_in_postgres() {
        // Answers of PostgreSQL 15's pg_size_pretty.
        for (size, text) in [
            (0, "0 bytes"),
            (10239, "10239 bytes"),
            (10240, "10 kB"),
            (12345, "12 kB"),
            (20_970_496, "20 MB"),
            (1_073_741_824, "1024 MB"),
            (21_474_836_480, "20 GB"),
            (-12345, "-12 kB"),
        ] {
            assert_eq!(size_pretty(size), text, "{size}");
        }
    }
}
