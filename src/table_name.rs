//! `TableName`: a schema-qualified source table name, parsed with SQL's identifier rules.
//!
//! Unquoted parts fold to lower case and quoted parts (`"Ocorrências"`) keep their exact
//! spelling, as Postgres does. The name renders back as properly quoted SQL, and maps to a
//! path segment in the lake that stays distinct for every distinct name.

use std::fmt;

/// A source table: schema and name, exactly as Postgres stores them in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

/// The text is not a table name.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a table name; write schema.table, quoting parts with capitals or odd characters (sales.\"Big Table\")"
)]
pub struct TableNameError(String);

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(text: &str) -> Result<TableName, TableNameError> {
        let err = || TableNameError(text.to_string());
        let mut parts = Vec::new();
        let mut chars = text.trim().chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        None => return Err(err()),
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if !(c.is_alphanumeric() || c == '_' || c == '$') {
                        return Err(err());
                    }
                    part.extend(c.to_lowercase());
                    chars.next();
                }
            }
            if part.is_empty() {
                return Err(err());
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(_) => return Err(err()),
            }
        }
        match parts.len() {
            1 => Ok(TableName::new("public", parts.remove(0))),
            2 => {
                let name = parts.pop().unwrap_or_default();
                Ok(TableName::new(parts.pop().unwrap_or_default(), name))
            }
            _ => Err(err()),
        }
    }

    /// The name as quoted SQL: `"public"."Ocorrências"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Path segments for the lake: `<schema>/<table>`, with every byte outside
    /// `[A-Za-z0-9_-]` written as `~XX` so that no name can escape its directory or
    /// collide with another.
    pub fn path_segments(&self) -> String {
        format!(
            "{}/{}",
            path_segment(&self.schema),
            path_segment(&self.name)
        )
    }
}

impl fmt::Display for TableName {
    /// `schema.table`, quoting only where SQL needs it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |s: &str| {
            let plain = s
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if plain { s.to_string() } else { quote_ident(s) }
        };
        write!(f, "{}.{}", show(&self.schema), show(&self.name))
    }
}

/// Quotes an SQL identifier, doubling embedded quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes an SQL string literal, doubling embedded quotes.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn path_segment(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sql_identifier_rules() {
        assert_eq!(
            TableName::parse("Foo").unwrap(),
            TableName::new("public", "foo")
        );
        assert_eq!(
            TableName::parse("app.\"Ocorrências\"").unwrap(),
            TableName::new("app", "Ocorrências")
        );
        assert_eq!(
            TableName::parse("\"a.b\".\"x\"\"y\"").unwrap(),
            TableName::new("a.b", "x\"y")
        );
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("a b").is_err());
        assert!(TableName::parse("\"open").is_err());
    }

    #[test]
    fn renders_and_maps_to_paths() {
        let t = TableName::new("app", "Ocorrências");
        assert_eq!(t.to_string(), "app.\"Ocorrências\"");
        assert_eq!(t.quoted(), "\"app\".\"Ocorrências\"");
        assert_eq!(t.path_segments(), "app/Ocorr~C3~AAncias");
        assert_eq!(TableName::new("a/b", "..").path_segments(), "a~2Fb/~2E~2E");
    }
}
