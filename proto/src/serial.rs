//! Disk serials: the only stable identity of a hot-plugged disk. The agent and its clients check them by the same
//! rule, so a client refuses a bad serial before it contacts anything.
//!
//! A serial is `[A-Za-z0-9._+-]{1,36}`. KubeVirt lowercases the XML of hot-plugged disks, so serials are compared
//! case-insensitively; lowercase and at most 20 characters is the portable choice for both SCSI and virtio-blk.

use std::fmt;

/// Longest serial QEMU's scsi-hd accepts (and the longest we accept).
pub const MAX_LEN: usize = 36;

/// A serial that passed validation, compared case-insensitively.
#[derive(Debug, Clone, Eq)]
pub struct Serial(String);

/// Why a string is not a serial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    #[error("the serial is empty: pass the serial the hypervisor gave the disk, e.g. 'data-0001'")]
    Empty,
    #[error("the serial is {len} characters long; at most {MAX_LEN} are allowed (20 is the portable limit)")]
    TooLong { len: usize },
    #[error("the serial {shown:?} contains {bad:?}; only letters, digits and '.', '_', '+', '-' are allowed")]
    BadCharacter { shown: String, bad: char },
}

impl Serial {
    /// Validates `raw` as a serial.
    pub fn parse(raw: &str) -> Result<Self, SerialError> {
        if raw.is_empty() {
            return Err(SerialError::Empty);
        }
        let len = raw.chars().count();
        if len > MAX_LEN {
            return Err(SerialError::TooLong { len });
        }
        if let Some(bad) = raw.chars().find(|c| !is_serial_char(*c)) {
            return Err(SerialError::BadCharacter { shown: raw.to_string(), bad });
        }
        Ok(Self(raw.to_string()))
    }

    /// The serial as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `other` names the same disk (case-insensitive).
    pub fn matches(&self, other: &str) -> bool {
        !other.is_empty() && self.0.eq_ignore_ascii_case(other)
    }
}

impl PartialEq for Serial {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_serial_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_portable_and_long_serials() {
        for ok in ["data-0001", "A.b_c+d-e", "x", &"a".repeat(36)] {
            assert_eq!(Serial::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_hostile_serials_with_named_errors() {
        assert_eq!(Serial::parse(""), Err(SerialError::Empty));
        assert_eq!(Serial::parse(&"a".repeat(37)), Err(SerialError::TooLong { len: 37 }));
        assert_eq!(Serial::parse(&"a".repeat(10_000)), Err(SerialError::TooLong { len: 10_000 }));
        for (bad, c) in [("../etc", '/'), ("a b", ' '), ("a\0b", '\0'), ("disk/1", '/'), ("é", 'é')] {
            assert_eq!(Serial::parse(bad), Err(SerialError::BadCharacter { shown: bad.to_string(), bad: c }));
        }
    }

    #[test]
    fn compares_case_insensitively() {
        let s = Serial::parse("MixedCase-01").unwrap();
        assert!(s.matches("mixedcase-01"));
        assert!(s.matches("MIXEDCASE-01"));
        assert!(!s.matches("mixedcase-02"));
        assert!(!s.matches(""));
        assert_eq!(s, Serial::parse("mixedcase-01").unwrap());
    }

    #[test]
    fn error_messages_are_actionable_sentences() {
        let msg = Serial::parse("a/b").unwrap_err().to_string();
        assert!(msg.contains("\"a/b\"") && msg.contains("only letters"), "{msg}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn valid_exactly_when_portable_characters_and_length(raw in "\\PC{0,48}") {
            let valid = !raw.is_empty() && raw.chars().count() <= MAX_LEN && raw.chars().all(is_serial_char);
            prop_assert_eq!(Serial::parse(&raw).is_ok(), valid);
        }

        #[test]
        fn matching_ignores_ascii_case(raw in "[A-Za-z0-9._+-]{1,36}") {
            let s = Serial::parse(&raw).unwrap();
            prop_assert!(s.matches(&raw.to_ascii_lowercase()));
            prop_assert!(s.matches(&raw.to_ascii_uppercase()));
        }
    }
}
