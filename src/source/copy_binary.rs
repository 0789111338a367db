//! The framing of COPY's binary format: a signature header, then per row a field count
//! and each field's length and bytes (length -1: NULL), then a trailer (count -1).
//! Values are decoded by [`crate::pg_binary`].

use bytes::BytesMut;

/// `PGCOPY\n\377\r\n\0`.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Splits binary COPY data (arbitrary chunks) into rows of field values.
#[derive(Default)]
pub(super) struct BinaryRows {
    /// Bytes of an unfinished header or row from earlier chunks.
    partial: BytesMut,
    header_read: bool,
    ended: bool,
    /// An emptied buffer of field values, kept for the next row.
    spare: Vec<Option<&'static [u8]>>,
}

impl BinaryRows {
    /// Calls `row` with the values (`None`: NULL) of each complete row that `chunk`
    /// ends, after what earlier chunks left; rows wholly inside `chunk` are not copied.
    /// `Err` names what is wrong with data that is not binary COPY of `fields` columns.
    pub(super) fn split<E>(
        &mut self,
        chunk: &[u8],
        fields: usize,
        mut row: impl FnMut(&[Option<&[u8]>]) -> Result<(), E>,
        bad: impl Fn(&str) -> E,
    ) -> Result<(), E> {
        if self.partial.is_empty() {
            let used = self.rows(chunk, fields, &mut row, &bad)?;
            self.partial.extend_from_slice(&chunk[used..]);
        } else {
            self.partial.extend_from_slice(chunk);
            let data = std::mem::take(&mut self.partial);
            let used = self.rows(&data, fields, &mut row, &bad)?;
            self.partial.extend_from_slice(&data[used..]);
        }
        Ok(())
    }

    /// Reads the header and the complete rows at the start of `data`; returns the bytes
    /// read.
    fn rows<E>(
        &mut self,
        data: &[u8],
        fields: usize,
        row: &mut impl FnMut(&[Option<&[u8]>]) -> Result<(), E>,
        bad: &impl Fn(&str) -> E,
    ) -> Result<usize, E> {
        let mut at = 0;
        if !self.header_read {
            let Some(extension) = data.get(15..19) else {
                return Ok(0);
            };
            if !data.starts_with(SIGNATURE) {
                return Err(bad(
                    "the binary COPY data does not start with its signature",
                ));
            }
            let extension = i32::from_be_bytes(extension.try_into().unwrap_or_default());
            let Ok(extension) = usize::try_from(extension) else {
                return Err(bad(
                    "the binary COPY header has a negative extension length",
                ));
            };
            if data.len() < 19 + extension {
                return Ok(0);
            }
            at = 19 + extension;
            self.header_read = true;
        }
        let mut values = reuse(std::mem::take(&mut self.spare));
        while at < data.len() {
            if self.ended {
                return Err(bad("binary COPY data went on after its trailer"));
            }
            let Some(count) = data.get(at..at + 2) else {
                break;
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                continue;
            }
            if usize::try_from(count).ok() != Some(fields) {
                return Err(bad("COPY sent a row with the wrong number of fields"));
            }
            values.clear();
            let mut next = at + 2;
            let mut complete = true;
            for _ in 0..fields {
                let Some(len) = data.get(next..next + 4) else {
                    complete = false;
                    break;
                };
                let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
                next += 4;
                if len == -1 {
                    values.push(None);
                    continue;
                }
                let Ok(len) = usize::try_from(len) else {
                    return Err(bad("COPY sent a field with a negative length"));
                };
                let Some(value) = data.get(next..next + len) else {
                    complete = false;
                    break;
                };
                values.push(Some(value));
                next += len;
            }
            if !complete {
                break;
            }
            row(&values)?;
            at = next;
        }
        self.spare = reuse(values);
        Ok(at)
    }

    /// Whether the data ended where it should: after the trailer.
    pub(super) fn is_complete(&self) -> bool {
        self.ended && self.partial.is_empty()
    }
}

/// An emptied vector of values whose allocation serves the next row (of another
/// lifetime): collecting in place keeps the buffer.
fn reuse<'b>(mut values: Vec<Option<&'_ [u8]>>) -> Vec<Option<&'b [u8]>> {
    values.clear();
    values.into_iter().map(|_| None).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut data = SIGNATURE.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, b'x', b'y']);
        for row in rows {
            data.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for value in *row {
                match value {
                    None => data.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        data.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        data.extend_from_slice(v);
                    }
                }
            }
        }
        data.extend_from_slice(&(-1i16).to_be_bytes());
        data
    }

    #[test]
    fn rows_split_across_any_chunks() {
        let rows: [&[Option<&[u8]>]; 3] = [
            &[Some(b"a"), None],
            &[Some(b""), Some(b"bcd")],
            &[None, Some(&[0, 1, 2, 3, 4])],
        ];
        let data = copy_data(&rows);
        for size in [1, 2, 3, 7, 19, data.len()] {
            let mut split = BinaryRows::default();
            let mut seen: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
            for chunk in data.chunks(size) {
                split
                    .split(
                        chunk,
                        2,
                        |values| {
                            seen.push(values.iter().map(|v| v.map(<[u8]>::to_vec)).collect());
                            Ok::<_, String>(())
                        },
                        |m| m.to_string(),
                    )
                    .unwrap();
            }
            assert!(split.is_complete(), "chunks of {size}");
            let expected: Vec<Vec<Option<Vec<u8>>>> = rows
                .iter()
                .map(|r| r.iter().map(|v| v.map(<[u8]>::to_vec)).collect())
                .collect();
            assert_eq!(seen, expected, "chunks of {size}");
        }
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        let ok = |_: &[Option<&[u8]>]| Ok::<_, String>(());
        let data = copy_data(&[&[Some(b"a")]]);
        let mut split = BinaryRows::default();
        let err = split.split(&data, 2, ok, |m| m.to_string()).unwrap_err();
        assert!(err.contains("wrong number of fields"), "{err}");
        let mut split = BinaryRows::default();
        let err = split
            .split(b"PGCOPY\n\xfe\r\n\0\0\0\0\0\0\0\0\0", 1, ok, |m| {
                m.to_string()
            })
            .unwrap_err();
        assert!(err.contains("signature"), "{err}");
        let mut trailing = copy_data(&[&[Some(b"a")]]);
        trailing.extend_from_slice(&[0, 1]);
        let mut split = BinaryRows::default();
        let err = split
            .split(&trailing, 1, ok, |m| m.to_string())
            .unwrap_err();
        assert!(err.contains("after its trailer"), "{err}");
        let mut split = BinaryRows::default();
        split
            .split(&data[..data.len() - 3], 1, ok, |m| m.to_string())
            .unwrap();
        assert!(!split.is_complete());
    }
}
