//! The identity a user's processes run as in their container, and why a login may have
//! none. Resolved at login from the quota's `uid` by [`crate::login::identity`].

/// The credentials a user's processes have in their container. Whenever the gateway touches
/// a path inside a container that the user can change (a socket to connect, a directory to
/// make, a file to read), it does so with these credentials and never as root, so the
/// kernel's own permission checks decide: what the user could not do in a shell, the
/// gateway does not do for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (besides `gid`).
    pub groups: Vec<u32>,
}

/// Why a login has no identity to run as; the user is told this, the log has the detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// `uid = "host"` and no host account has the login's name.
    #[error("there is no account named {0} on the gateway's host (uid = \"host\"); ask your admin")]
    NoHostAccount(String),
    /// `uid = "host"` and the account is root's uid.
    #[error(
        "the host account {0} has uid 0: labgate runs nobody as root unless the config says uid = 0; ask your admin"
    )]
    HostRoot(String),
    /// The account database could not be asked.
    #[error("cannot look up the host account {user} ({reason}); ask your admin")]
    Lookup {
        /// The login name.
        user: String,
        /// What failed.
        reason: String,
    },
    /// `uid = "auto"` and every uid of the range is taken.
    #[error("no uid is left in auto_uids {first}-{last} for uid = \"auto\"; ask your admin")]
    Exhausted {
        /// First of the range.
        first: u32,
        /// Last of the range.
        last: u32,
    },
    /// `uid = "auto"` and the record of given uids cannot be read or written.
    #[error("cannot read or record the uids given by uid = \"auto\" ({0}); ask your admin")]
    State(String),
}
