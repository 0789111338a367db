//! `Lsn`: a Postgres write-ahead-log position.
//!
//! Postgres prints LSNs as two hexadecimal halves (`16/B374D848`); on the wire and in the
//! Delta tables they are 64-bit integers, which sort the same way. Keeping them in a
//! newtype stops them from being confused with row counts, versions or transaction ids.

use std::fmt;
use std::str::FromStr;

/// A position in the Postgres write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / "start wherever the slot is" position `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// The LSN as the signed integer Delta stores (`txn.version`, `_lsn` columns).
    /// Real LSNs stay far below 2^63, so the conversion never changes the value;
    /// larger ones saturate instead of wrapping.
    pub fn as_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// Reads back an LSN stored as a signed integer; negative values mean "none".
    pub fn from_i64(v: i64) -> Lsn {
        Lsn(u64::try_from(v).unwrap_or(0))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN of the form `XXXXXXXX/XXXXXXXX`.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not an LSN; expected two hexadecimal numbers separated by a slash, like 0/16B3748"
)]
pub struct LsnParseError(String);

/// Serialized as its text form (`16/B374D848`), as the Delta commit info stores it.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Lsn, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }
}
