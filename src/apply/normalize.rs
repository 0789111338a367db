//! Normalization rules (the silver layer): legacy text columns holding dates and amounts in
//! mixed formats become typed columns in the curated tables.
//!
//! A rule names a column-name pattern (`*` matches any run of characters, case-insensitive),
//! a target type (`date`, `timestamp`, `decimal(p,s)`) and the formats it accepts, tried in
//! order. Rules apply only to text columns (`text`, `varchar`, `char`) that are not part of
//! the key; every other column passes through unchanged, and the raw tables always keep the
//! original text. A value no format accepts becomes NULL in the curated table, is counted
//! per column, and the first one of each column is logged with an example: never a crash,
//! never a silent zero. Amounts are never rounded: a value with more decimals than the
//! target scale does not parse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use deltalake::arrow::array::{
    Array, ArrayRef, Date32Array, Decimal128Array, StringArray, TimestampMicrosecondArray,
};
use deltalake::arrow::datatypes::{DataType, TimeUnit};
use deltalake::arrow::error::ArrowError;

use deltalake::arrow::record_batch::RecordBatch;
use serde::Deserialize;

use crate::change::ColumnSpec;
use crate::pg_types::parse_decimal;
use crate::table_name::TableName;

/// Postgres text types (`text`, `varchar`, `char`) the normalization rules may apply to.
const TEXT_TYPES: [u32; 3] = [25, 1043, 1042];

/// `[transform]`: normalization rules for the curated tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Tried in order; the first rule whose pattern matches a text column applies.
    #[serde(default = "default_rules")]
    pub rules: Vec<RuleConfig>,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            rules: default_rules(),
        }
    }
}

/// One `[[transform.rules]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Column-name pattern; `*` matches any run of characters, case-insensitive.
    pub column: String,
    /// `date`, `timestamp` (UTC) or `decimal(p,s)`.
    pub target: String,
    /// strftime formats (dates, timestamps) or `1234.56` / `1.234,56` (decimals), in order.
    pub formats: Vec<String>,
    /// Prefixes removed before parsing (currency symbols).
    #[serde(default)]
    pub strip: Vec<String>,
}

/// The built-in rules: `*data*` text columns hold dates or timestamps, `*valor*` text
/// columns hold amounts.
pub fn default_rules() -> Vec<RuleConfig> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        RuleConfig {
            column: "*data*".into(),
            target: "timestamp".into(),
            formats: s(&[
                "%Y-%m-%d",
                "%d/%m/%Y",
                "%Y-%m-%d %H:%M:%S%#z",
                "%Y-%m-%dT%H:%M:%S%#z",
                "%Y-%m-%dT%H:%M:%SZ",
                "%Y-%m-%d %H:%M:%S",
                "%Y-%m-%dT%H:%M:%S",
                "%d/%m/%Y %H:%M:%S",
            ]),
            strip: vec![],
        },
        RuleConfig {
            column: "*valor*".into(),
            target: "decimal(18,2)".into(),
            formats: s(&["1234.56", "1.234,56"]),
            strip: s(&["R$", "$"]),
        },
    ]
}

impl TransformConfig {
    /// Checks every rule (problems name `transform.rules[i]`) and returns the rules.
    pub fn validate(&self, problems: &mut Vec<String>) -> Normalization {
        let mut rules = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            match Rule::from_config(rule) {
                Ok(r) => rules.push(r),
                Err(e) => problems.push(format!("transform.rules[{i}]: {e}")),
            }
        }
        Normalization {
            rules,
            failures: Default::default(),
        }
    }
}

/// What a rule produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Date,
    /// A UTC timestamp; values without an offset are taken as UTC.
    Timestamp,
    Decimal {
        precision: u8,
        scale: i8,
    },
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, String> {
        let t = text.trim().to_ascii_lowercase();
        match t.as_str() {
            "date" => return Ok(Target::Date),
            "timestamp" => return Ok(Target::Timestamp),
            _ => {}
        }
        let inner = t
            .strip_prefix("decimal(")
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| {
                format!("`{text}` is not a target type; use date, timestamp or decimal(p,s)")
            })?;
        let (p, s) = inner
            .split_once(',')
            .ok_or_else(|| format!("`{text}`: write decimal(precision,scale)"))?;
        let precision: u8 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: bad precision"))?;
        let scale: i8 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: bad scale"))?;
        if !(1..=38).contains(&precision) || scale < 0 || scale as u8 > precision {
            return Err(format!(
                "`{text}`: precision must be 1 to 38 and scale 0 to precision"
            ));
        }
        Ok(Target::Decimal { precision, scale })
    }

    pub fn arrow_type(&self) -> DataType {
        match self {
            Target::Date => DataType::Date32,
            Target::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Target::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
        }
    }
}

/// The decimal formats a rule may accept.
pub const DECIMAL_FORMATS: [&str; 2] = ["1234.56", "1.234,56"];

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pattern: String,
    pub target: Target,
    formats: Vec<String>,
    strip: Vec<String>,
}

impl Rule {
    /// Checks a configured rule; the error says what is wrong (the caller names the field).
    pub fn from_config(config: &RuleConfig) -> Result<Rule, String> {
        let target = Target::parse(&config.target)?;
        if config.column.trim().is_empty() {
            return Err("column: give a column-name pattern such as \"*data*\"".into());
        }
        if config.formats.is_empty() {
            return Err("formats: list at least one format".into());
        }
        for f in &config.formats {
            let ok = match target {
                Target::Decimal { .. } => DECIMAL_FORMATS.contains(&f.as_str()),
                // chrono reports bad specifiers only when formatting: try one.
                _ => chrono::format::StrftimeItems::new(f)
                    .all(|item| !matches!(item, chrono::format::Item::Error)),
            };
            if !ok {
                return Err(match target {
                    Target::Decimal { .. } => format!(
                        "formats: `{f}` is not a decimal format; use \"1234.56\" or \"1.234,56\""
                    ),
                    _ => format!("formats: `{f}` is not a valid strftime format"),
                });
            }
        }
        Ok(Rule {
            pattern: config.column.to_ascii_lowercase(),
            target,
            formats: config.formats.clone(),
            strip: config.strip.clone(),
        })
    }

    pub fn matches(&self, column: &str) -> bool {
        glob_match(&self.pattern, &column.to_ascii_lowercase())
    }

    /// Parses one text value, or `None` when no format accepts it.
    pub fn parse(&self, text: &str) -> Option<TypedValue> {
        let mut text = text.trim();
        for prefix in &self.strip {
            if let Some(rest) = text.strip_prefix(prefix.as_str()) {
                text = rest.trim_start();
            }
        }
        match &self.target {
            Target::Decimal { precision, scale } => self.formats.iter().find_map(|f| {
                let canonical = decimal_canonical(text, f)?;
                parse_decimal(&canonical, *precision, *scale).map(TypedValue::Decimal)
            }),
            Target::Date => self.formats.iter().find_map(|f| {
                let date = match parse_instant(text, f)? {
                    Instant::Date(d) => d,
                    // A timestamp names the date in its own offset.
                    Instant::Local(dt) => dt.date(),
                    Instant::Utc(dt) => dt.date(),
                };
                let days = date
                    .signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1)?)
                    .num_days();
                i32::try_from(days).ok().map(TypedValue::Date)
            }),
            Target::Timestamp => self.formats.iter().find_map(|f| {
                let micros = match parse_instant(text, f)? {
                    Instant::Date(d) => d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros(),
                    Instant::Local(dt) => dt.and_utc().timestamp_micros(),
                    Instant::Utc(dt) => dt.and_utc().timestamp_micros(),
                };
                Some(TypedValue::Micros(micros))
            }),
        }
    }
}

/// A parsed normalized value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TypedValue {
    Date(i32),
    Micros(i64),
    Decimal(i128),
}

enum Instant {
    Date(NaiveDate),
    /// No offset given: taken as UTC.
    Local(NaiveDateTime),
    /// Converted to UTC from the offset given.
    Utc(NaiveDateTime),
}

fn parse_instant(text: &str, format: &str) -> Option<Instant> {
    if let Ok(dt) = DateTime::parse_from_str(text, format) {
        return Some(Instant::Utc(dt.naive_utc()));
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(text, format) {
        return Some(Instant::Local(dt));
    }
    NaiveDate::parse_from_str(text, format)
        .ok()
        .map(Instant::Date)
}

/// Rewrites an amount in `format` as `-1234.56`, or `None` when it is not in that format.
fn decimal_canonical(text: &str, format: &str) -> Option<String> {
    let (sign, body) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest.trim_start()),
        None => ("", text.strip_prefix('+').unwrap_or(text)),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let decimal_mark = if format == "1234.56" { '.' } else { ',' };
    let (int_part, frac) = match body.split_once(decimal_mark) {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    let int_digits = match format {
        "1234.56" => int_part.to_string(),
        "1.234,56" => {
            let groups: Vec<&str> = int_part.split('.').collect();
            let grouped_ok = groups.len() == 1
                || ((1..=3).contains(&groups[0].len()) && groups[1..].iter().all(|g| g.len() == 3));
            if !grouped_ok {
                return None;
            }
            groups.concat()
        }
        _ => return None,
    };
    if !digits(&int_digits) {
        return None;
    }
    match frac {
        None => Some(format!("{sign}{int_digits}")),
        Some(f) if digits(f) => Some(format!("{sign}{int_digits}.{f}")),
        Some(_) => None,
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(i) => rest = &rest[i + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Values that failed normalization since the daemon started, per `table.column`; shared
/// by every session so each column is logged once per process.
#[derive(Debug, Clone, Default)]
pub struct Failures(Arc<Mutex<HashMap<String, u64>>>);

impl Failures {
    /// Adds `n` failures; true when they are the column's first.
    fn add(&self, column: String, n: u64) -> bool {
        let Ok(mut map) = self.0.lock() else {
            return false;
        };
        let count = map.entry(column).or_insert(0);
        *count += n;
        *count == n
    }

    /// Current counts, per `table.column`.
    pub fn counts(&self) -> HashMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The configured rules and the failure counts.
#[derive(Debug, Clone, Default)]
pub struct Normalization {
    pub rules: Vec<Rule>,
    pub failures: Failures,
}

/// The rules applied to one table's columns.
pub struct Normalizer {
    table: String,
    /// The source columns' names.
    names: Vec<String>,
    /// Per source column: the rule that applies, if any.
    rules: Vec<Option<Rule>>,
    failures: Failures,
}

impl Normalizer {
    /// Picks, for each column, the first rule whose pattern matches, for text columns
    /// outside the key only.
    pub fn new(
        table: &str,
        columns: &[(String, bool)],
        normalization: &Normalization,
    ) -> Normalizer {
        let rules = &normalization.rules;
        Normalizer {
            table: table.to_string(),
            names: columns.iter().map(|(name, _)| name.clone()).collect(),
            rules: columns
                .iter()
                .map(|(name, eligible)| {
                    if !eligible {
                        return None;
                    }
                    rules.iter().find(|r| r.matches(name)).cloned()
                })
                .collect(),
            failures: normalization.failures.clone(),
        }
    }

    /// The rules for the curated table of `name`: text columns outside the key are
    /// eligible (a dropped column has type OID 0: never eligible).
    pub fn for_table(
        name: &TableName,
        columns: &[ColumnSpec],
        key_columns: &[String],
        normalization: &Normalization,
    ) -> Normalizer {
        let eligible: Vec<(String, bool)> = columns
            .iter()
            .map(|c| {
                let text = TEXT_TYPES.contains(&c.type_oid);
                (c.name.clone(), text && !key_columns.contains(&c.name))
            })
            .collect();
        Normalizer::new(&format!("curated.{name}"), &eligible, normalization)
    }

    /// Per source column, the type its rule stores it as (`None`: no rule applies).
    pub fn stored_types(&self) -> Vec<Option<DataType>> {
        self.rules
            .iter()
            .map(|r| r.as_ref().map(|r| r.target.arrow_type()))
            .collect()
    }

    /// The source columns of raw change rows (the first columns of `raw`), converted
    /// where a rule applies.
    pub fn normalize(&self, raw: &RecordBatch) -> Result<Vec<ArrayRef>, ArrowError> {
        if raw.num_columns() < self.names.len() {
            return Err(ArrowError::SchemaError(format!(
                "{} has {} source columns but the batch only {}",
                self.table,
                self.names.len(),
                raw.num_columns()
            )));
        }
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| self.convert(i, name, raw.column(i)))
            .collect()
    }

    /// The source columns a rule converts (by index).
    pub fn converted(&self) -> Vec<usize> {
        (0..self.rules.len())
            .filter(|&i| self.rules[i].is_some())
            .collect()
    }

    /// The rule for source column `i`.
    pub fn rule(&self, i: usize) -> Option<&Rule> {
        self.rules.get(i).and_then(|r| r.as_ref())
    }

    /// Converts a text column with `rule`.
    pub fn convert(
        &self,
        i: usize,
        column: &str,
        array: &ArrayRef,
    ) -> Result<ArrayRef, ArrowError> {
        let Some(rule) = self.rule(i).cloned() else {
            return Ok(array.clone());
        };
        let text = array
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArrowError::CastError(format!("column {column} is not text")))?;
        let mut failed = 0u64;
        let mut example: Option<&str> = None;
        let values = text.iter().map(|v| {
            let v = v?;
            let parsed = rule.parse(v);
            if parsed.is_none() {
                failed += 1;
                example.get_or_insert(v);
            }
            parsed
        });
        let values: Vec<Option<TypedValue>> = values.collect();
        let out: ArrayRef = match &rule.target {
            Target::Date => Arc::new(Date32Array::from_iter(values.iter().map(|v| match v {
                Some(TypedValue::Date(d)) => Some(*d),
                _ => None,
            }))),
            Target::Timestamp => Arc::new(
                TimestampMicrosecondArray::from_iter(values.iter().map(|v| match v {
                    Some(TypedValue::Micros(m)) => Some(*m),
                    _ => None,
                }))
                .with_timezone("UTC"),
            ),
            Target::Decimal { precision, scale } => Arc::new(
                Decimal128Array::from_iter(values.iter().map(|v| match v {
                    Some(TypedValue::Decimal(d)) => Some(*d),
                    _ => None,
                }))
                .with_precision_and_scale(*precision, *scale)?,
            ),
        };
        if failed > 0 {
            crate::telemetry::normalization_failures(
                self.table.strip_prefix("curated.").unwrap_or(&self.table),
                column,
                failed,
            );
        }
        if failed > 0
            && self
                .failures
                .add(format!("{}.{column}", self.table), failed)
        {
            {
                tracing::warn!(
                    table = %self.table,
                    column,
                    example = example.unwrap_or_default(),
                    target = ?rule.target,
                    "a value matches none of the column's normalization formats; the curated \
                     table gets NULL (raw keeps the text). Further failures in this column are \
                     counted, not logged"
                );
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(target: &str, formats: &[&str]) -> Rule {
        Rule::from_config(&RuleConfig {
            column: "*x*".into(),
            target: target.into(),
            formats: formats.iter().map(|s| s.to_string()).collect(),
            strip: vec!["R$".into()],
        })
        .unwrap()
    }

    #[test]
    fn default_rules_parse_the_legacy_formats() {
        let rules = default_rules();
        let dates = Rule::from_config(&rules[0]).unwrap();
        let amounts = Rule::from_config(&rules[1]).unwrap();
        assert!(dates.matches("data_pagamento_informada"));
        assert!(amounts.matches("VALOR_informado"));
        let ts = |s| match dates.parse(s) {
            Some(TypedValue::Micros(m)) => Some(m),
            _ => None,
        };
        let midnight = 1_704_412_800_000_000; // 2024-01-05T00:00:00Z
        assert_eq!(ts("2024-01-05"), Some(midnight));
        assert_eq!(ts("05/01/2024"), Some(midnight));
        assert_eq!(
            ts("2024-01-05 10:00:00-03"),
            Some(midnight + 13 * 3_600_000_000)
        );
        assert_eq!(
            ts("2024-01-05T13:00:00Z"),
            Some(midnight + 13 * 3_600_000_000)
        );
        assert_eq!(ts("ontem"), None);
        assert_eq!(ts("31/02/2024"), None);
        let dec = |s| match amounts.parse(s) {
            Some(TypedValue::Decimal(d)) => Some(d),
            _ => None,
        };
        assert_eq!(dec("1234.56"), Some(123456));
        assert_eq!(dec("1.234,56"), Some(123456));
        assert_eq!(dec("R$ 1.234,56"), Some(123456));
        assert_eq!(dec("-12,5"), Some(-1250));
        assert_eq!(dec("12.345.678,90"), Some(1_234_567_890));
        assert_eq!(dec("1,2,3"), None);
        assert_eq!(dec("12.34.56"), None);
        assert_eq!(dec("abc"), None);
        assert_eq!(dec(""), None);
        // No rounding, ever: too many decimals for the scale in every format.
        assert_eq!(dec("1,005"), None);
        // Ambiguous text takes the first format that parses it exactly.
        assert_eq!(dec("1.5"), Some(150));
        assert_eq!(dec("1.005"), Some(100_500));
    }

    #[test]
    fn targets_and_formats_are_checked() {
        assert!(Target::parse("decimal(10,2)").is_ok());
        assert!(Target::parse("decimal(2,3)").is_err());
        assert!(Target::parse("money").is_err());
        assert!(
            Rule::from_config(&RuleConfig {
                column: "*v*".into(),
                target: "decimal(10,2)".into(),
                formats: vec!["1 234,56".into()],
                strip: vec![],
            })
            .is_err()
        );
        let r = rule("date", &["%d/%m/%Y"]);
        assert_eq!(r.parse("05/01/2024"), Some(TypedValue::Date(19727)));
    }

    #[test]
    fn glob() {
        assert!(glob_match("*data*", "data"));
        assert!(glob_match("*data*", "x_data_y"));
        assert!(!glob_match("*data*", "dat"));
        assert!(glob_match("valor_*", "valor_total"));
        assert!(!glob_match("valor_*", "o_valor_total"));
    }
}
