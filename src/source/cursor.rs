//! `Cursor`: bounds-checked reading of big-endian protocol fields.
//!
//! Every read returns a [`Malformed`] error instead of panicking when the input is too
//! short or a string is not terminated, so hostile or truncated bytes can never crash
//! the daemon.

/// The bytes do not form a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct Malformed(pub String);

/// A read position over a byte slice.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Malformed> {
        if self.remaining() < n {
            return Err(Malformed(format!(
                "{what}: needs {n} bytes, only {} left",
                self.remaining()
            )));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Malformed> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &str) -> Result<u8, Malformed> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn i16(&mut self, what: &str) -> Result<i16, Malformed> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    pub fn i32(&mut self, what: &str) -> Result<i32, Malformed> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &str) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn i64(&mut self, what: &str) -> Result<i64, Malformed> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self, what: &str) -> Result<&'a str, Malformed> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Malformed(format!("{what}: string without terminating NUL")))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| Malformed(format!("{what}: string is not valid UTF-8")))?;
        self.pos += end + 1;
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails when bytes are left over after a complete message.
    pub fn finish(&self, what: &str) -> Result<(), Malformed> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(Malformed(format!(
                "{what}: {} unexpected trailing bytes",
                self.remaining()
            )))
        }
    }
}
