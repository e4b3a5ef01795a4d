//! Profile names and the `user+profile` login form (`ssh alice+gpu@lab`).

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::{InvalidUsername, Username};

/// A profile's name, checked against `[a-z0-9][a-z0-9_-]{0,31}` so that `labgate-USER.NAME`
/// is a valid container name that no user's container has (no user name has a `.`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProfileName(String);

/// Why a string is not a valid profile name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid profile name {name:?}: must match [a-z0-9][a-z0-9_-]{{0,31}} (lowercase letter or digit first, at most 32 characters)"
)]
pub struct InvalidProfile {
    /// The rejected name (truncated).
    pub name: String,
}

impl ProfileName {
    /// Checks `name` and wraps it.
    pub fn parse(name: &str) -> Result<Self, InvalidProfile> {
        let bytes = name.as_bytes();
        let first_ok = matches!(bytes.first(), Some(b'a'..=b'z' | b'0'..=b'9'));
        let rest_ok = bytes
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
        if first_ok && rest_ok && bytes.len() <= 32 {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidProfile {
                name: name.chars().take(64).collect(),
            })
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ProfileName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ProfileName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a client typed as its SSH user: a user name, optionally `+PROFILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginName {
    /// The user whose key file authenticates the login.
    pub user: Username,
    /// The profile asked for, if any.
    pub profile: Option<ProfileName>,
}

impl LoginName {
    /// Splits `alice+gpu` into user and profile; both parts are checked. A malformed profile
    /// part makes the whole name invalid (the login is refused like an unknown user).
    pub fn parse(login: &str) -> Result<Self, InvalidUsername> {
        let invalid = || InvalidUsername {
            name: login.chars().take(64).collect(),
        };
        match login.split_once('+') {
            None => Ok(LoginName {
                user: Username::parse(login)?,
                profile: None,
            }),
            Some((user, profile)) => Ok(LoginName {
                user: Username::parse(user).map_err(|_| invalid())?,
                profile: Some(ProfileName::parse(profile).map_err(|_| invalid())?),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_profile_logins_split() {
        let plain = LoginName::parse("alice").unwrap();
        assert_eq!(plain.user.as_str(), "alice");
        assert_eq!(plain.profile, None);
        let gpu = LoginName::parse("alice+gpu-2").unwrap();
        assert_eq!(gpu.user.as_str(), "alice");
        assert_eq!(gpu.profile.unwrap().as_str(), "gpu-2");
    }

    #[test]
    fn malformed_profile_logins_are_invalid() {
        for bad in [
            "alice+",
            "+gpu",
            "alice+GPU",
            "alice+a+b",
            "alice+../x",
            "Alice+gpu",
        ] {
            assert!(LoginName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ProfileName::parse(&"p".repeat(33)).is_err());
        assert!(ProfileName::parse("-x").is_err());
    }
}
