//! Functions whose result can be far larger than their arguments — `repeat`, `lpad`,
//! `rpad`, `replace`, `array_repeat`, `array_resize`, `range`, `generate_series` — check
//! what they are about to build before they build it.
//!
//! # Design
//! DataFusion's memory pools see operators (sorts, joins, aggregates), not the arrays a
//! scalar function returns, so `SELECT repeat('x', 1000000000)` would allocate 1 GB
//! unseen. Each statement's context gets these functions wrapped ([`guard`]): the wrapper
//! estimates the output of the call from its arguments (exactly for `repeat`, `replace`
//! and the integer series; an upper bound for the others), refuses one value over
//! `serve.max_value_mb` (`54000`), and reserves the whole call's output from the
//! statement's pool (`53200` past `serve.query_memory_mb` or `serve.memory_mb`), times
//! the partitions that may run it at once. The rest is delegated unchanged, except that
//! the wrapped functions are declared volatile: a constant call is not folded into a
//! literal at planning, which a projection would then copy into every row of every batch
//! unseen (`SELECT repeat('x', 60000000) FROM t`); evaluated per batch instead, a call
//! with constant arguments is counted once per row.
//!
//! Functions whose result is bounded by their arguments' sizes (`concat`, `||`,
//! `substr`, …) are not wrapped; `regexp_replace` with the `g` flag is not either (its
//! output depends on the matches, which cost a regex pass to count).

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};

use deltalake::datafusion::arrow::array::{Array, AsArray};
use deltalake::datafusion::arrow::datatypes::FieldRef;
use deltalake::datafusion::arrow::datatypes::{
    DataType, Int64Type, IntervalMonthDayNanoType, TimeUnit, TimestampNanosecondType,
};
use deltalake::datafusion::common::ExprSchema;
use deltalake::datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use deltalake::datafusion::common::{Result, ScalarValue};
use deltalake::datafusion::config::ConfigOptions;
use deltalake::datafusion::execution::FunctionRegistry;
use deltalake::datafusion::execution::SessionState;
use deltalake::datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, LogicalPlan, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature,
};

use super::budget::StatementPool;

/// How a guarded function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: len × n.
    Repeat,
    /// `lpad`/`rpad(text, n [, fill])`: n characters.
    Pad,
    /// `replace(text, from, to)`: len + matches × (len(to) − len(from)).
    Replace,
    /// `array_repeat(element, n)`: n elements.
    ArrayRepeat,
    /// `array_resize(list, n [, fill])`: n elements.
    ArrayResize,
    /// `range`/`generate_series(start, stop [, step])` as scalar functions.
    Series,
}

const GUARDED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("array_repeat", Growth::ArrayRepeat),
    ("array_resize", Growth::ArrayResize),
    ("range", Growth::Series),
    ("generate_series", Growth::Series),
];

/// Wraps the guarded functions of `state` so they reserve from `pool`.
pub fn guard(state: &mut SessionState, pool: &Arc<StatementPool>) {
    for (name, growth) in GUARDED {
        let Some(inner) = state.scalar_functions().get(*name).cloned() else {
            continue;
        };
        let guarded = Guarded::new(inner.as_ref().clone(), *growth, Arc::downgrade(pool));
        // Registered under the function's name and aliases; replaces the plain one.
        let _ = state.register_udf(Arc::new(ScalarUDF::new_from_impl(guarded)));
    }
}

/// Whether `plan` (or a subquery of it) calls a guarded function: such a plan holds the
/// guard of its statement's memory pool and must not run in another statement.
pub fn calls_guarded(plan: &LogicalPlan) -> bool {
    // A wrapper answers to its function's name and aliases.
    let guarded = |f: &ScalarUDF| {
        GUARDED
            .iter()
            .any(|(name, _)| f.name() == *name || f.aliases().iter().any(|a| a == name))
    };
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(call) = e
                    && guarded(&call.func)
                {
                    found = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(match found {
            true => TreeNodeRecursion::Stop,
            false => TreeNodeRecursion::Continue,
        })
    });
    found
}

/// Estimated output of one call: all rows, and the largest value.
#[derive(Debug, Default, PartialEq)]
struct Estimate {
    total: usize,
    largest: usize,
}

impl Estimate {
    fn add(&mut self, bytes: usize) {
        self.total = self.total.saturating_add(bytes);
        self.largest = self.largest.max(bytes);
    }
}

/// The text at `row` of a string argument.
fn text(v: &ColumnarValue, row: usize) -> Option<&str> {
    match v {
        ColumnarValue::Scalar(
            ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s),
        ) => s.as_deref(),
        ColumnarValue::Scalar(_) => None,
        ColumnarValue::Array(a) => {
            if row >= a.len() || a.is_null(row) {
                return None;
            }
            match a.data_type() {
                DataType::Utf8 => Some(a.as_string::<i32>().value(row)),
                DataType::LargeUtf8 => Some(a.as_string::<i64>().value(row)),
                DataType::Utf8View => Some(a.as_string_view().value(row)),
                _ => None,
            }
        }
    }
}

/// The integer at `row`; temporal values as nanoseconds since the epoch.
fn integer(v: &ColumnarValue, row: usize) -> Option<i64> {
    match v {
        ColumnarValue::Scalar(s) => match s {
            ScalarValue::Int64(n) => *n,
            ScalarValue::Int32(n) => n.map(i64::from),
            s if s.data_type().is_temporal() => {
                match s.cast_to(&DataType::Timestamp(TimeUnit::Nanosecond, None)) {
                    Ok(ScalarValue::TimestampNanosecond(n, _)) => n,
                    _ => None,
                }
            }
            _ => None,
        },
        ColumnarValue::Array(a) => {
            if row >= a.len() || a.is_null(row) {
                return None;
            }
            match a.data_type() {
                DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(row)),
                t if t.is_temporal() => {
                    let one = a.slice(row, 1);
                    let cast = deltalake::datafusion::arrow::compute::cast(
                        &one,
                        &DataType::Timestamp(TimeUnit::Nanosecond, None),
                    )
                    .ok()?;
                    let ns = cast.as_primitive::<TimestampNanosecondType>();
                    (!ns.is_null(0)).then(|| ns.value(0))
                }
                _ => None,
            }
        }
    }
}

/// A series step at `row`: an integer, or an interval as its shortest length in
/// nanoseconds (a month counted as 28 days), so the element count is an upper bound.
fn step(v: &ColumnarValue, row: usize) -> Option<i128> {
    const DAY: i128 = 86_400_000_000_000;
    let interval = |s: &ScalarValue| match s
        .cast_to(&DataType::Interval(
            deltalake::datafusion::arrow::datatypes::IntervalUnit::MonthDayNano,
        ))
        .ok()?
    {
        ScalarValue::IntervalMonthDayNano(Some(i)) => Some(
            i128::from(i.months) * 28 * DAY + i128::from(i.days) * DAY + i128::from(i.nanoseconds),
        ),
        _ => None,
    };
    match v {
        ColumnarValue::Scalar(s) if s.data_type().is_integer() => integer(v, row).map(i128::from),
        ColumnarValue::Scalar(s) => interval(s),
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Int64 => integer(v, row).map(i128::from),
            DataType::Interval(_) if row < a.len() && !a.is_null(row) => {
                let one = deltalake::datafusion::arrow::compute::cast(
                    &a.slice(row, 1),
                    &DataType::Interval(
                        deltalake::datafusion::arrow::datatypes::IntervalUnit::MonthDayNano,
                    ),
                )
                .ok()?;
                let i = one.as_primitive::<IntervalMonthDayNanoType>().value(0);
                Some(
                    i128::from(i.months) * 28 * DAY
                        + i128::from(i.days) * DAY
                        + i128::from(i.nanoseconds),
                )
            }
            _ => None,
        },
    }
}

/// The size of one element of any argument (for `array_repeat`): a scalar's data, or an
/// array's average per row (of its own slice, not the buffers it shares).
fn element_bytes(v: &ColumnarValue) -> usize {
    match v {
        ColumnarValue::Scalar(s) => s
            .data_type()
            .primitive_width()
            .unwrap_or_else(|| s.size().saturating_sub(std::mem::size_of::<ScalarValue>()))
            .max(1),
        ColumnarValue::Array(a) => {
            let bytes = a
                .to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| a.get_array_memory_size());
            (bytes / a.len().max(1)).max(1)
        }
    }
}

fn times(bytes: usize, n: Option<i64>) -> usize {
    bytes.saturating_mul(usize::try_from(n.unwrap_or(0)).unwrap_or(0))
}

impl Growth {
    /// The output of a call over `rows` rows. With constant arguments the one value is
    /// computed once and then copied into every row.
    fn estimate(self, args: &[ColumnarValue], rows: usize) -> Estimate {
        let all_scalar = args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
        if all_scalar {
            let one = self.estimate_rows(args, 1);
            return Estimate {
                total: one.total.saturating_mul(rows.max(1)),
                largest: one.largest,
            };
        }
        self.estimate_rows(args, rows)
    }

    fn estimate_rows(self, args: &[ColumnarValue], rows: usize) -> Estimate {
        let arg = |i: usize| args.get(i);
        let mut e = Estimate::default();
        for row in 0..rows {
            let text_at = |i: usize| arg(i).and_then(|v| text(v, row));
            let int_at = |i: usize| arg(i).and_then(|v| integer(v, row));
            let bytes = match self {
                Growth::Repeat => times(text_at(0).map_or(0, str::len), int_at(1)),
                Growth::Pad => match (text_at(0), text_at(2)) {
                    // NULL in, NULL out.
                    (None, _) => 0,
                    // Nothing to pad with: the text, cut to the width.
                    (Some(s), Some("")) => s.len(),
                    (Some(s), fill) => {
                        let wide = !s.is_ascii() || !fill.unwrap_or(" ").is_ascii();
                        times(if wide { 4 } else { 1 }, int_at(1))
                    }
                },
                Growth::Replace => match (text_at(0), text_at(1), text_at(2)) {
                    (Some(s), Some(from), Some(to)) if to.len() > from.len() || from.is_empty() => {
                        let matches = if from.is_empty() {
                            s.chars().count() + 1
                        } else {
                            s.matches(from).count()
                        };
                        s.len().saturating_add(
                            matches.saturating_mul(to.len() - from.len().min(to.len())),
                        )
                    }
                    (Some(s), _, _) => s.len(),
                    _ => 0,
                },
                Growth::ArrayRepeat => times(arg(0).map_or(0, element_bytes), int_at(1)),
                Growth::ArrayResize => times(arg(2).map_or(8, element_bytes).max(8), int_at(1)),
                Growth::Series => {
                    let (start, stop, by) = match args.len() {
                        1 => (Some(0), int_at(0), Some(1)),
                        2 => (int_at(0), int_at(1), Some(1)),
                        _ => (int_at(0), int_at(1), arg(2).and_then(|v| step(v, row))),
                    };
                    match (start, stop, by) {
                        (Some(a), Some(b), Some(s)) if s != 0 => {
                            let n = ((i128::from(b) - i128::from(a)) / s).max(0) + 1;
                            usize::try_from(n.saturating_mul(8)).unwrap_or(usize::MAX)
                        }
                        _ => 0,
                    }
                }
            };
            e.add(bytes);
        }
        e
    }
}

/// A guarded function: checks, reserves, then calls the function it wraps.
#[derive(Debug)]
struct Guarded {
    inner: ScalarUDF,
    /// The inner function's, declared volatile (not folded at planning).
    signature: Signature,
    growth: Growth,
    /// The statement's pool. Weak: a plan kept by a prepared statement must not hold its
    /// parse-time reservation; the session keeps the pool until the last row is sent.
    pool: Weak<StatementPool>,
}

impl PartialEq for Guarded {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner && Weak::ptr_eq(&self.pool, &other.pool)
    }
}

impl Eq for Guarded {}

impl Hash for Guarded {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

impl Guarded {
    fn new(inner: ScalarUDF, growth: Growth, pool: Weak<StatementPool>) -> Guarded {
        let mut signature = inner.signature().clone();
        signature.volatility = deltalake::datafusion::logical_expr::Volatility::Volatile;
        Guarded {
            inner,
            signature,
            growth,
            pool,
        }
    }

    fn check(&self, args: &ScalarFunctionArgs) -> Result<()> {
        let Some(pool) = self.pool.upgrade() else {
            // Only a plan kept past its statement gets here; fail closed.
            return Err(deltalake::datafusion::common::DataFusionError::Execution(
                format!(
                    "{} was called after its statement ended; run the statement again",
                    self.inner.name()
                ),
            ));
        };
        let e = self.growth.estimate(&args.args, args.number_rows);
        let what = self.inner.name();
        if e.largest > pool.max_value {
            return Err(pool.value_too_large(e.largest, what));
        }
        // Every partition may be building its own result at once.
        let partitions = args.config_options.execution.target_partitions.max(1);
        pool.reserve_results(e.total.saturating_mul(partitions), what)
    }
}

#[warn(clippy::missing_trait_methods)] // Delegates, so it should implement every method.
impl ScalarUDFImpl for Guarded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[expect(deprecated)]
        self.inner.inner().display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.inner().return_field_from_args(args)
    }

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        #[expect(deprecated)]
        self.inner.inner().is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        self.check(&args)?;
        self.inner.inner().invoke_with_args(args)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        let inner = self.inner.inner().with_updated_config(config)?;
        Some(ScalarUDF::new_from_impl(Guarded::new(
            inner,
            self.growth,
            self.pool.clone(),
        )))
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn simplify(
        &self,
        args: Vec<Expr>,
        info: &deltalake::datafusion::logical_expr::simplify::SimplifyContext,
    ) -> Result<deltalake::datafusion::logical_expr::simplify::ExprSimplifyResult> {
        self.inner.inner().simplify(args, info)
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &deltalake::datafusion::logical_expr::simplify::SimplifyContext,
    ) -> Result<deltalake::datafusion::logical_expr::preimage::PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }

    fn evaluate_bounds(
        &self,
        input: &[&deltalake::datafusion::logical_expr::interval_arithmetic::Interval],
    ) -> Result<deltalake::datafusion::logical_expr::interval_arithmetic::Interval> {
        self.inner.inner().evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &deltalake::datafusion::logical_expr::interval_arithmetic::Interval,
        inputs: &[&deltalake::datafusion::logical_expr::interval_arithmetic::Interval],
    ) -> Result<Option<Vec<deltalake::datafusion::logical_expr::interval_arithmetic::Interval>>>
    {
        self.inner.inner().propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<deltalake::datafusion::logical_expr::StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }

    fn output_ordering(
        &self,
        inputs: &[deltalake::datafusion::logical_expr::sort_properties::ExprProperties],
    ) -> Result<deltalake::datafusion::logical_expr::sort_properties::SortProperties> {
        self.inner.inner().output_ordering(inputs)
    }

    fn preserves_lex_ordering(
        &self,
        inputs: &[deltalake::datafusion::logical_expr::sort_properties::ExprProperties],
    ) -> Result<bool> {
        self.inner.inner().preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(
        &self,
        inputs: &[deltalake::datafusion::logical_expr::sort_properties::ExprProperties],
    ) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(
        &self,
        args: &[deltalake::datafusion::logical_expr::ExpressionPlacement],
    ) -> deltalake::datafusion::logical_expr::ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(v.into())))
    }
    fn n(v: i64) -> ColumnarValue {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(v)))
    }

    #[test]
    fn estimates_follow_the_arguments() {
        let e = Growth::Repeat.estimate(&[s("ab"), n(1_000_000)], 8192);
        assert_eq!(e.largest, 2_000_000);
        assert_eq!(
            e.total,
            2_000_000 * 8192,
            "constant arguments: copied into every row"
        );
        assert_eq!(Growth::Repeat.estimate(&[s("ab"), n(5)], 1).total, 10);
        assert_eq!(Growth::Pad.estimate(&[s("x"), n(100)], 1).largest, 100);
        assert_eq!(
            Growth::Pad.estimate(&[s("x"), n(100), s("é")], 1).largest,
            400
        );
        assert_eq!(
            Growth::Pad
                .estimate(&[s("xyz"), n(1_000_000), s("")], 1)
                .largest,
            3
        );
        let null = ColumnarValue::Scalar(ScalarValue::Utf8(None));
        assert_eq!(Growth::Pad.estimate(&[null, n(1_000_000)], 1).largest, 0);
        // An int64 element is 8 bytes, not the size of a ScalarValue.
        assert_eq!(
            Growth::ArrayRepeat.estimate(&[n(0), n(1_000)], 1).largest,
            8_000
        );
        assert_eq!(Growth::Repeat.estimate(&[s("ab"), n(-5)], 1).largest, 0);
        // replace: exact, from the matches.
        assert_eq!(
            Growth::Replace
                .estimate(&[s("aXbXc"), s("X"), s("YYY")], 1)
                .largest,
            9
        );
        assert_eq!(
            Growth::Replace
                .estimate(&[s("abc"), s(""), s("--")], 1)
                .largest,
            11
        );
        assert_eq!(
            Growth::Replace
                .estimate(&[s("abc"), s("abc"), s("")], 1)
                .largest,
            3
        );
        assert_eq!(Growth::Series.estimate(&[n(1), n(1_000)], 1).largest, 8_000);
        assert_eq!(
            Growth::Series.estimate(&[n(1), n(1_000), n(10)], 1).largest,
            800
        );
        assert_eq!(Growth::Series.estimate(&[n(10), n(1)], 1).largest, 8);
        // A column of counts: every row adds up.
        let counts = ColumnarValue::Array(Arc::new(
            deltalake::datafusion::arrow::array::Int64Array::from(vec![Some(10), None, Some(5)]),
        ));
        let e = Growth::Repeat.estimate(&[s("abc"), counts], 3);
        assert_eq!(
            e,
            Estimate {
                total: 45,
                largest: 30
            }
        );
    }

    #[test]
    fn a_temporal_series_counts_its_steps() {
        let day = |d: i32| ColumnarValue::Scalar(ScalarValue::Date32(Some(d)));
        let hours = ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(
            deltalake::datafusion::arrow::datatypes::IntervalMonthDayNano::new(
                0,
                0,
                3_600_000_000_000,
            ),
        )));
        // Ten days by the hour: 241 timestamps.
        assert_eq!(
            Growth::Series
                .estimate(&[day(0), day(10), hours], 1)
                .largest,
            241 * 8
        );
    }
}

#[cfg(test)]
mod sql_tests {
    use super::*;
    use crate::serve::budget::Budget;
    use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use deltalake::datafusion::prelude::{SessionConfig, SessionContext};

    async fn outcome(sql: &str) -> String {
        let pool = Arc::new(StatementPool::new(
            Arc::new(Budget::new(64 << 20)),
            32 << 20,
            1 << 20,
        ));
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool.clone())
            .build_arc()
            .unwrap();
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        let mut state = ctx.state();
        guard(&mut state, &pool);
        let ctx = SessionContext::new_with_state(state);
        match ctx.sql(sql).await {
            Ok(df) => match df.collect().await {
                Ok(b) => format!("ok {}", b.iter().map(|b| b.num_rows()).sum::<usize>()),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn guarded_functions_refuse_before_building() {
        for sql in [
            "SELECT repeat('x', 1000000000)",
            "SELECT length(lpad('x', 2000000000))",
            "SELECT lpad('x', 2000000000)",
            "SELECT rpad('x', 2000000000, 'yz')",
            "SELECT replace(repeat('a', 1000), 'a', repeat('b', 10000))",
            "SELECT range(1, 1000000000)",
            "SELECT generate_series(1, 1000000000)",
            "SELECT array_repeat(1, 1000000000)",
            "SELECT cardinality(array_resize([1], 1000000000))",
        ] {
            let out = outcome(sql).await;
            assert!(out.contains("serve.max_value_mb"), "{sql}: {out}");
        }
        assert_eq!(
            outcome("SELECT repeat('x', 1000), lpad('x', 5)").await,
            "ok 1"
        );
        // A constant value, small alone, copied into every row of a batch.
        let out = outcome("SELECT repeat('x', 500000) FROM generate_series(1, 8192)").await;
        assert!(out.contains("serve.query_memory_mb"), "{out}");
        assert_eq!(
            outcome("SELECT repeat('x', 5) FROM generate_series(1, 8192)").await,
            "ok 8192"
        );
        let out =
            outcome("SELECT repeat(CAST(v AS VARCHAR), 100000) FROM generate_series(1, 1000) t(v)")
                .await;
        assert!(out.contains("serve.query_memory_mb"), "{out}");
    }

    #[tokio::test]
    async fn plans_that_call_a_guarded_function_are_found() {
        let pool = Arc::new(StatementPool::new(
            Arc::new(Budget::new(64 << 20)),
            32 << 20,
            1 << 20,
        ));
        let ctx = SessionContext::new();
        let mut state = ctx.state();
        guard(&mut state, &pool);
        let ctx = SessionContext::new_with_state(state);
        let plan = |sql: &'static str| {
            let ctx = ctx.clone();
            async move { ctx.state().create_logical_plan(sql).await.unwrap() }
        };
        for sql in [
            "SELECT repeat('x', 3)",
            "SELECT upper(lpad('x', 4))",
            "SELECT 1 WHERE EXISTS (SELECT replace('a', 'a', 'b'))",
            "SELECT v FROM (VALUES (1)) t(v) WHERE v IN (SELECT cardinality(range(1, 3)))",
        ] {
            assert!(calls_guarded(&plan(sql).await), "{sql}");
        }
        for sql in ["SELECT 1", "SELECT upper('x'), length('abc')"] {
            assert!(!calls_guarded(&plan(sql).await), "{sql}");
        }
    }
}
