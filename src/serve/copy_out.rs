//! `COPY … TO STDOUT`: a query's rows streamed as COPY data, which is what psql's
//! `\copy (select …) to 'file.csv' csv header` sends, in text, CSV or binary format.
//!
//! # Design
//! - **A query like any other.** `COPY t TO STDOUT` is `SELECT * FROM t`, and
//!   `COPY (query) TO STDOUT` is the query: it runs on the session's view with the
//!   statement limits (deadline, cancel, memory, result size), and its rows are encoded by
//!   the same Arrow-to-Postgres encoder as query results (text format for text and CSV,
//!   binary for binary), so a value reads the same in `\copy` and in `SELECT`.
//! - **Streamed**: one `CopyData` message per row as the plan yields it; memory stays that
//!   of the plan, whatever the result's size.
//! - **Postgres's formats**: text (tab-separated, `\N` for NULL, backslash escapes), CSV
//!   (quoted when needed, empty unquoted field for NULL, `""` for the empty string) and
//!   binary (`PGCOPY` header, one tuple per row, trailer), with the options `FORMAT`,
//!   `HEADER`, `DELIMITER`, `NULL`, `QUOTE` and `ESCAPE`, in the `WITH (…)` and the older
//!   `CSV HEADER` spellings. Other options are refused (`0A000`); `COPY FROM` and
//!   `COPY TO` a file or program are writes (`read_only`).
//! - **Errors end the COPY the Postgres way** ([`send`]): an `ErrorResponse` after the
//!   rows sent so far, never a `CopyDone` (the client would take a cut-off file for a
//!   whole one). pgwire's own sender answers a failed COPY with `CopyFail`, a message
//!   only clients send, after which libpq drops the connection ("unexpected response
//!   from server; first received character was "f""); so the session sends COPY
//!   responses itself.

use bytes::{Bytes, BytesMut};
use datafusion_postgres::pgwire;
use deltalake::datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use futures::StreamExt;
use pgwire::api::results::{CopyResponse, QueryResponse, Response};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};

/// A `COPY … TO STDOUT` to run: the query giving the rows, and how to write them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    pub query: String,
    pub format: CopyFormat,
    /// The query's column names as Postgres gives them (`column_names`), for the header.
    pub names: Option<Vec<Option<String>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFormat {
    Text {
        delimiter: u8,
        null: String,
        header: bool,
    },
    Csv {
        delimiter: u8,
        null: String,
        header: bool,
        quote: u8,
        escape: u8,
    },
    Binary,
}

impl CopyFormat {
    /// Whether the rows are needed in Postgres's binary encoding.
    pub fn binary(&self) -> bool {
        matches!(self, CopyFormat::Binary)
    }

    /// Whether a header message (the binary signature, a header line) precedes the rows.
    pub fn header_message(&self) -> bool {
        match self {
            CopyFormat::Binary => true,
            CopyFormat::Text { header, .. } | CopyFormat::Csv { header, .. } => *header,
        }
    }
}

fn unsupported(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "0A000".into(),
        message,
    )))
}

fn invalid(message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        "22023".into(),
        message,
    )))
}

/// The `COPY … TO STDOUT` in `statement`, if it is one; an error names an option that
/// is not supported or not valid.
pub fn parse(statement: &Statement) -> Option<Result<CopyOut, PgWireError>> {
    let Statement::Copy {
        source,
        to: true,
        target: CopyTarget::Stdout,
        options,
        legacy_options,
        ..
    } = statement
    else {
        return None;
    };
    let mut names = None;
    let query = match source {
        CopySource::Query(q) => {
            let mut query = Statement::Query(q.clone());
            names = super::column_names::of(&query);
            super::rewrite::rewrite(&mut query);
            query.to_string()
        }
        CopySource::Table {
            table_name,
            columns,
        } if columns.is_empty() => format!("SELECT * FROM {table_name}"),
        CopySource::Table {
            table_name,
            columns,
        } => {
            let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
            format!("SELECT {} FROM {table_name}", columns.join(", "))
        }
    };
    Some(format(options, legacy_options).map(|format| CopyOut {
        query,
        format,
        names,
    }))
}

fn single_byte(option: &str, c: char) -> Result<u8, PgWireError> {
    u8::try_from(c)
        .ok()
        .filter(|b| b.is_ascii())
        .ok_or_else(|| invalid(format!("COPY {option} must be a single one-byte character")))
}

fn format(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Result<CopyFormat, PgWireError> {
    let (mut kind, mut header, mut delimiter, mut null, mut quote, mut escape) =
        ("text".to_string(), false, None, None, None, None);
    for option in options {
        match option {
            CopyOption::Format(name) => kind = name.value.to_lowercase(),
            CopyOption::Header(h) => header = *h,
            CopyOption::Delimiter(c) => delimiter = Some(single_byte("delimiter", *c)?),
            CopyOption::Null(s) => null = Some(s.clone()),
            CopyOption::Quote(c) => quote = Some(single_byte("quote", *c)?),
            CopyOption::Escape(c) => escape = Some(single_byte("escape", *c)?),
            CopyOption::Encoding(e)
                if e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("utf-8") => {}
            other => {
                return Err(unsupported(format!(
                    "COPY option {other} is not supported by wal2delta; FORMAT, HEADER, DELIMITER, NULL, QUOTE and ESCAPE are"
                )));
            }
        }
    }
    for option in legacy {
        match option {
            CopyLegacyOption::Binary => kind = "binary".into(),
            CopyLegacyOption::Header => header = true,
            CopyLegacyOption::Delimiter(c) => delimiter = Some(single_byte("delimiter", *c)?),
            CopyLegacyOption::Null(s) => null = Some(s.clone()),
            CopyLegacyOption::Csv(csv) => {
                kind = "csv".into();
                for o in csv {
                    match o {
                        CopyLegacyCsvOption::Header => header = true,
                        CopyLegacyCsvOption::Quote(c) => quote = Some(single_byte("quote", *c)?),
                        CopyLegacyCsvOption::Escape(c) => escape = Some(single_byte("escape", *c)?),
                        other => {
                            return Err(unsupported(format!(
                                "COPY option {other} is not supported by wal2delta"
                            )));
                        }
                    }
                }
            }
            other => {
                return Err(unsupported(format!(
                    "COPY option {other} is not supported by wal2delta"
                )));
            }
        }
    }
    match kind.as_str() {
        "text" => {
            if quote.is_some() || escape.is_some() {
                return Err(invalid(
                    "COPY QUOTE and ESCAPE are available only in CSV mode".into(),
                ));
            }
            Ok(CopyFormat::Text {
                delimiter: delimiter.unwrap_or(b'\t'),
                null: null.unwrap_or_else(|| "\\N".into()),
                header,
            })
        }
        "csv" => {
            let quote = quote.unwrap_or(b'"');
            Ok(CopyFormat::Csv {
                delimiter: delimiter.unwrap_or(b','),
                null: null.unwrap_or_default(),
                header,
                quote,
                escape: escape.unwrap_or(quote),
            })
        }
        "binary" => {
            if delimiter.is_some() || null.is_some() || header || quote.is_some() {
                return Err(invalid(
                    "COPY DELIMITER, NULL, HEADER and QUOTE cannot be used in BINARY mode".into(),
                ));
            }
            Ok(CopyFormat::Binary)
        }
        other => Err(invalid(format!(
            "COPY format \"{other}\" not recognized; use text, csv or binary"
        ))),
    }
}

/// The signature, flags and header extension length of a binary COPY.
const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The rows of `rows` (encoded in text format, or binary for [`CopyFormat::Binary`]) as
/// a COPY OUT response: the header (a CSV or text header line, the binary signature) as
/// its own first message, then one message per row.
pub fn response(format: CopyFormat, mut rows: QueryResponse) -> Response {
    let names: Vec<String> = rows
        .row_schema()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let columns = names.len();
    let binary = format.binary();
    let mut head = Vec::new();
    match &format {
        CopyFormat::Binary => head.extend_from_slice(BINARY_HEADER),
        CopyFormat::Text {
            delimiter, header, ..
        }
        | CopyFormat::Csv {
            delimiter, header, ..
        } if *header => {
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    head.push(*delimiter);
                }
                write_value(&format, &mut head, Some(name.as_bytes()));
            }
            head.push(b'\n');
        }
        _ => {}
    }
    let data = std::mem::replace(rows.data_rows(), Box::pin(futures::stream::empty()));
    // The header, if any, is a message of its own, which `send` does not count as a row.
    let header = (!head.is_empty()).then(|| Ok(CopyData::new(Bytes::from(head))));
    let rows = futures::stream::unfold((data, format), |(mut data, format)| async move {
        match data.next().await {
            Some(Ok(row)) => {
                let mut out = BytesMut::new();
                encode_row(&format, &row.data, row.field_count, &mut out);
                Some((Ok(CopyData::new(out.freeze())), (data, format)))
            }
            Some(Err(e)) => Some((Err(e), (data, format))),
            None => None,
        }
    });
    let stream = futures::stream::iter(header).chain(rows);
    // Binary: pgwire appends the trailer.
    Response::CopyOut(CopyResponse::new(i8::from(binary), columns, stream))
}

/// Sends a COPY OUT response: the header (its own first message when `header`), the rows,
/// `CopyDone` and `COPY <rows>`. An error from the rows is returned before `CopyDone`;
/// the caller reports it with an `ErrorResponse`, which ends the COPY for the client.
pub async fn send<C>(client: &mut C, copy: CopyResponse, header: bool) -> PgWireResult<()>
where
    C: futures::Sink<PgWireBackendMessage> + Unpin,
    C::Error: std::fmt::Debug,
    PgWireError: From<<C as futures::Sink<PgWireBackendMessage>>::Error>,
{
    use futures::SinkExt;
    let formats = copy.column_formats();
    let CopyResponse {
        format,
        columns,
        mut data_stream,
        ..
    } = copy;
    client
        .send(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
            format,
            columns as i16,
            formats,
        )))
        .await?;
    let mut messages = 0usize;
    while let Some(data) = data_stream.next().await {
        let data = data?;
        if data.data.as_ref() != [0xff, 0xff] {
            messages += 1; // not the binary trailer
        }
        client.feed(PgWireBackendMessage::CopyData(data)).await?;
    }
    client
        .feed(PgWireBackendMessage::CopyDone(CopyDone::new()))
        .await?;
    client
        .send(PgWireBackendMessage::CommandComplete(
            pgwire::api::results::Tag::new("COPY")
                .with_rows(messages - usize::from(header && messages > 0))
                .into(),
        ))
        .await?;
    Ok(())
}

/// The fields of a DataRow's payload: for each, a big-endian length (-1: NULL) and bytes.
fn fields(data: &[u8], count: i16) -> impl Iterator<Item = Option<&[u8]>> {
    let mut at = 0usize;
    (0..count.max(0)).map(move |_| {
        let len = data
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(-1);
        at += 4;
        if len < 0 {
            return None;
        }
        let value = data.get(at..at + len as usize).unwrap_or_default();
        at += len as usize;
        Some(value)
    })
}

fn encode_row(format: &CopyFormat, data: &[u8], count: i16, out: &mut BytesMut) {
    match format {
        CopyFormat::Binary => {
            out.extend_from_slice(&count.to_be_bytes());
            out.extend_from_slice(data);
        }
        CopyFormat::Text { delimiter, .. } | CopyFormat::Csv { delimiter, .. } => {
            let mut line = Vec::with_capacity(data.len() + 8);
            for (i, value) in fields(data, count).enumerate() {
                if i > 0 {
                    line.push(*delimiter);
                }
                write_value(format, &mut line, value);
            }
            line.push(b'\n');
            out.extend_from_slice(&line);
        }
    }
}

/// One value in text or CSV format, as Postgres's `CopyAttributeOutText`/`…CSV` write it.
fn write_value(format: &CopyFormat, out: &mut Vec<u8>, value: Option<&[u8]>) {
    match format {
        CopyFormat::Binary => {}
        CopyFormat::Text {
            delimiter, null, ..
        } => {
            let Some(value) = value else {
                out.extend_from_slice(null.as_bytes());
                return;
            };
            for &b in value {
                match b {
                    b'\\' => out.extend_from_slice(b"\\\\"),
                    b'\n' => out.extend_from_slice(b"\\n"),
                    b'\r' => out.extend_from_slice(b"\\r"),
                    b'\t' => out.extend_from_slice(b"\\t"),
                    0x08 => out.extend_from_slice(b"\\b"),
                    0x0c => out.extend_from_slice(b"\\f"),
                    0x0b => out.extend_from_slice(b"\\v"),
                    b if b == *delimiter => out.extend_from_slice(&[b'\\', b]),
                    b => out.push(b),
                }
            }
        }
        CopyFormat::Csv {
            delimiter,
            null,
            quote,
            escape,
            ..
        } => {
            let Some(value) = value else {
                out.extend_from_slice(null.as_bytes());
                return;
            };
            let needs_quotes = value == null.as_bytes()
                || value == b"\\."
                || value
                    .iter()
                    .any(|b| b == delimiter || b == quote || *b == b'\n' || *b == b'\r');
            if !needs_quotes {
                out.extend_from_slice(value);
                return;
            }
            out.push(*quote);
            for &b in value {
                if b == *quote || b == *escape {
                    out.push(*escape);
                }
                out.push(b);
            }
            out.push(*quote);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use deltalake::datafusion::sql::sqlparser::parser::Parser;

    fn copy(sql: &str) -> Result<CopyOut, String> {
        let statement = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .map_err(|e| e.to_string())?
            .remove(0);
        parse(&statement)
            .ok_or("not a COPY TO STDOUT")?
            .map_err(|e| e.to_string())
    }

    #[test]
    fn psql_copy_commands_parse_to_their_query_and_format() {
        let c = copy("COPY ( select id from t ) TO STDOUT csv header").unwrap();
        assert_eq!(c.query, "SELECT id FROM t");
        assert!(matches!(
            c.format,
            CopyFormat::Csv {
                header: true,
                delimiter: b',',
                ..
            }
        ));
        let c = copy("COPY arquivo.t (a, \"B\") TO STDOUT WITH (FORMAT binary)").unwrap();
        assert_eq!(c.query, "SELECT a, \"B\" FROM arquivo.t");
        assert_eq!(c.format, CopyFormat::Binary);
        let c = copy("COPY t TO STDOUT").unwrap();
        assert!(matches!(
            c.format,
            CopyFormat::Text {
                delimiter: b'\t',
                ..
            }
        ));
        let c = copy("COPY t TO STDOUT WITH (FORMAT csv, DELIMITER ';', NULL 'NA')").unwrap();
        assert!(
            matches!(c.format, CopyFormat::Csv { delimiter: b';', ref null, .. } if null == "NA")
        );
        assert!(
            copy("COPY t TO STDOUT WITH (FORMAT xml)")
                .unwrap_err()
                .contains("not recognized")
        );
        assert!(
            copy("COPY t TO STDOUT WITH (FREEZE)")
                .unwrap_err()
                .contains("not supported")
        );
        assert!(copy("COPY t FROM STDIN").is_err());
    }

    fn row(values: &[Option<&str>]) -> (Vec<u8>, i16) {
        let mut data = Vec::new();
        for v in values {
            match v {
                Some(v) => {
                    data.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    data.extend_from_slice(v.as_bytes());
                }
                None => data.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        (data, values.len() as i16)
    }

    #[test]
    fn values_are_written_as_postgres_writes_them() {
        let (data, n) = row(&[Some("a\tb\\c\nd"), None, Some("")]);
        let text = copy("COPY t TO STDOUT").unwrap().format;
        let mut out = BytesMut::new();
        encode_row(&text, &data, n, &mut out);
        assert_eq!(&out[..], b"a\\tb\\\\c\\nd\t\\N\t\n");
        let csv = copy("COPY t TO STDOUT CSV").unwrap().format;
        let (data, n) = row(&[Some("say \"hi\", ok"), None, Some(""), Some("plain")]);
        let mut out = BytesMut::new();
        encode_row(&csv, &data, n, &mut out);
        assert_eq!(&out[..], b"\"say \"\"hi\"\", ok\",,\"\",plain\n");
    }
}
