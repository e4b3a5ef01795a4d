//! Authentication: who may log in, with which key, and what that key may do.
//!
//! Owns the user name rule ([`Username`]), the key files ([`KeyStore`]), the key options
//! ([`KeyOptions`]), the trusted user CAs ([`cert`]) and the two decisions the SSH layer asks
//! for: may this public key, or this certificate, log in as this user from this address now?
//! Unknown users, wrong keys and refused options get the same answer, so a client cannot probe
//! which users exist; the reason is logged.

pub mod cert;
pub mod identity;
pub mod keys;
pub mod options;
pub mod profile;
pub mod source;
pub mod user;

pub use cert::{CertRefusal, TrustedCas};
pub use keys::{AuthorizedKey, KeyFile, KeyOrigin, KeyStore};
pub use options::{KeyOptions, UseRefusal};
pub use profile::{LoginName, ProfileName};
pub use user::{InvalidUsername, Username};

use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use russh::keys::PublicKey;
use russh::keys::ssh_key::Certificate;

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
    /// The key is in the file, but its options refuse this login (`from=`, `expiry-time`).
    KeyOption(UseRefusal),
    /// A certificate that is not accepted.
    Certificate(CertRefusal),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::InvalidName => f.write_str("invalid user name"),
            Refusal::UnknownUser => f.write_str("unknown user"),
            Refusal::WrongKey => f.write_str("key not authorized for this user"),
            Refusal::KeyFileUnreadable(e) => write!(f, "key file unreadable: {e}"),
            Refusal::KeyOption(e) => write!(f, "key not usable: {e}"),
            Refusal::Certificate(e) => write!(f, "certificate refused: {e}"),
        }
    }
}

/// Checks `(user, key)` against the key store, and the key's options against the client's
/// address `ip` and the time `now`.
pub async fn check_key(
    store: &KeyStore,
    user: &str,
    key: &PublicKey,
    ip: IpAddr,
    now: SystemTime,
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
    let entry = file
        .find_usable(key, ip, now)
        .map_err(|why| why.map_or(Refusal::WrongKey, Refusal::KeyOption))?
        .clone();
    Ok((name, entry))
}

/// Checks a certificate offered for `user`: signed by a CA of the file `ca_file`, valid now,
/// `user` among its principals, its options allowing `ip` (see [`cert`]). The user must be
/// known: a key file in `store`, or `configured(name)` (a `[users.NAME]` table).
pub async fn check_certificate(
    store: &KeyStore,
    ca_file: Option<&Path>,
    configured: impl Fn(&Username) -> bool,
    user: &str,
    certificate: &Certificate,
    ip: IpAddr,
    now: SystemTime,
) -> Result<(Username, AuthorizedKey), Refusal> {
    let name = Username::parse(user).map_err(|_| Refusal::InvalidName)?;
    let ca_file = ca_file.ok_or(Refusal::Certificate(CertRefusal::NoTrustedCa))?;
    let known = configured(&name)
        || tokio::fs::try_exists(store.path_of(&name))
            .await
            .unwrap_or(false);
    if !known {
        return Err(Refusal::UnknownUser);
    }
    let cas = TrustedCas::load(ca_file)
        .await
        .map_err(|e| Refusal::Certificate(CertRefusal::CaFileUnreadable(e.to_string())))?;
    for e in &cas.errors {
        tracing::warn!("skipping bad CA line: {e}");
    }
    // The principal is the login name itself (one place decides what that is: `Username`).
    let entry = cas
        .check(certificate, name.as_str(), ip, now)
        .map_err(Refusal::Certificate)?;
    Ok((name, entry))
}
