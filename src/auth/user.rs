//! The user name type: the one identity every other module keys on.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A lab user's name, checked against `[a-z_][a-z0-9_-]{0,31}` (the portable POSIX login name
/// rule, lowercase only) before it reaches the file system or Docker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(String);

/// Why a string is not a valid user name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid user name {name:?}: must match [a-z_][a-z0-9_-]{{0,31}} (lowercase letter or _ first, at most 32 characters)"
)]
pub struct InvalidUsername {
    /// The rejected name, as given (truncated to keep logs short).
    pub name: String,
}

impl Username {
    /// Checks `name` and wraps it.
    pub fn parse(name: &str) -> Result<Self, InvalidUsername> {
        let bytes = name.as_bytes();
        let first_ok = matches!(bytes.first(), Some(b'a'..=b'z' | b'_'));
        let rest_ok = bytes
            .iter()
            .skip(1)
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
        if first_ok && rest_ok && bytes.len() <= 32 {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidUsername {
                name: name.chars().take(64).collect(),
            })
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name a `user+profile` container is accounted under (GPU holdings): `alice+gpu`.
    /// No valid user name has a `+`, so it never equals another user's; it is never a login
    /// name, a path or a container name.
    pub fn with_profile(&self, profile: &super::ProfileName) -> Username {
        Username(format!("{}+{profile}", self.0))
    }

    /// Reads a holder name back (`alice` or `alice+gpu`, as [`Username::with_profile`]
    /// writes it), checking both parts.
    pub fn parse_holder(name: &str) -> Result<Self, InvalidUsername> {
        match name.split_once('+') {
            None => Username::parse(name),
            Some((user, profile)) => {
                let profile = super::ProfileName::parse(profile).map_err(|_| InvalidUsername {
                    name: name.to_owned(),
                })?;
                Ok(Username::parse(user)?.with_profile(&profile))
            }
        }
    }

    /// The user a holder name belongs to: `alice` for `alice+gpu` (and for `alice`), whose
    /// usage and budget a profile's container counts under.
    pub fn account(&self) -> Username {
        match self.0.split_once('+') {
            Some((user, _)) => Username(user.to_owned()),
            None => self.clone(),
        }
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Username {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Username::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_login_names() {
        for ok in ["alice", "_svc", "bob-2", "a", "x_y-z0", &"a".repeat(32)] {
            assert!(Username::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "Alice",
            "1abc",
            "-x",
            "a.b",
            "a/b",
            "../etc",
            "al ice",
            "é",
            &"a".repeat(33),
            "root;rm",
        ] {
            assert!(Username::parse(bad).is_err(), "{bad:?}");
        }
    }
}
