//! Authentication: who may log in, with which key.
//!
//! Owns the user name rule ([`Username`]), the key files ([`KeyStore`]) and the one decision
//! the SSH layer asks for: does this offered public key belong to this user? Unknown users and
//! wrong keys get the same answer, so a client cannot probe which users exist.

pub mod keys;
pub mod profile;
pub mod user;

pub use keys::{AuthorizedKey, KeyFile, KeyOptions, KeyStore};
pub use profile::{LoginName, ProfileName};
pub use user::{InvalidUsername, Username};

use russh::keys::PublicKey;

/// Why a login was refused. Only ever logged: the client sees the same generic refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The name fails the user name rule; it never reached the file system.
    InvalidName,
    /// No key file for this name.
    UnknownUser,
    /// The user exists but this key is not in their file.
    WrongKey,
    /// The key file exists but could not be read.
    KeyFileUnreadable(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::InvalidName => f.write_str("invalid user name"),
            Refusal::UnknownUser => f.write_str("unknown user"),
            Refusal::WrongKey => f.write_str("key not authorized for this user"),
            Refusal::KeyFileUnreadable(e) => write!(f, "key file unreadable: {e}"),
        }
    }
}

/// Checks `(user, key)` against the key store.
pub async fn check_key(
    store: &KeyStore,
    user: &str,
    key: &PublicKey,
) -> Result<(Username, AuthorizedKey), Refusal> {
    let name = Username::parse(user).map_err(|_| Refusal::InvalidName)?;
    let file = store
        .load(&name)
        .await
        .map_err(|e| Refusal::KeyFileUnreadable(e.to_string()))?
        .ok_or(Refusal::UnknownUser)?;
    for e in &file.errors {
        tracing::warn!(user = %name, "skipping bad key line: {e}");
    }
    let entry = file.find(key).cloned().ok_or(Refusal::WrongKey)?;
    Ok((name, entry))
}
