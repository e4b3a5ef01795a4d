//! Users' public keys: `keys_dir/NAME.pub` files in OpenSSH `authorized_keys` format.
//!
//! A user exists if and only if their key file exists. Files are read at authentication time,
//! so adding or removing a user is dropping or deleting one file; nothing is cached.

use std::io;
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::authorized_keys::Entry;
use russh::keys::ssh_key::{HashAlg, PublicKey};

use super::user::Username;

/// One usable line of a key file: the key and its options, kept verbatim for the operations
/// issue's `restrict`, `permitopen=`, `from=`, ... handling.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    /// The public key itself; compared by key data, never by comment.
    pub key: PublicKey,
    /// The options field (`restrict,no-pty`), empty when the line has none.
    pub options: String,
    /// 1-based line number in the file, for log messages.
    pub line: usize,
}

impl AuthorizedKey {
    /// The SHA-256 fingerprint as OpenSSH prints it (`SHA256:...`).
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// The forwarding-related options of this key, as sshd reads them.
    pub fn options(&self) -> KeyOptions {
        KeyOptions::parse(&self.options)
    }
}

/// The `authorized_keys` options labgate honours so far (the operations issue adds the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOptions {
    /// False under `no-port-forwarding`, or `restrict` without `port-forwarding`.
    pub port_forwarding: bool,
    /// Values of `permitopen="host:port"` options; empty means no restriction.
    pub permit_open: Vec<String>,
    /// False under `no-agent-forwarding`, or `restrict` without `agent-forwarding`.
    pub agent_forwarding: bool,
}

impl KeyOptions {
    /// Parses an options field (`restrict,permitopen="localhost:8888"`).
    pub fn parse(field: &str) -> KeyOptions {
        let mut out = KeyOptions {
            port_forwarding: true,
            permit_open: Vec::new(),
            agent_forwarding: true,
        };
        let mut restrict = false;
        let mut reenabled = false;
        let mut agent_reenabled = false;
        for opt in split_options(field) {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n, Some(v.trim_matches('"'))),
                None => (opt, None),
            };
            match (name.to_ascii_lowercase().as_str(), value) {
                ("restrict", None) => restrict = true,
                ("no-port-forwarding", None) => out.port_forwarding = false,
                ("port-forwarding", None) => reenabled = true,
                ("permitopen", Some(v)) => out.permit_open.push(v.to_owned()),
                ("no-agent-forwarding", None) => out.agent_forwarding = false,
                ("agent-forwarding", None) => agent_reenabled = true,
                _ => {}
            }
        }
        if restrict && !reenabled {
            out.port_forwarding = false;
        }
        if restrict && !agent_reenabled {
            out.agent_forwarding = false;
        }
        out
    }
}

/// Splits an options field at commas outside double quotes.
fn split_options(field: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in field.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&field[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < field.len() {
        parts.push(&field[start..]);
    }
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// A line of a key file that could not be parsed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}:{line}: {message}", path = path.display())]
pub struct KeyLineError {
    /// The key file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with the line.
    pub message: String,
}

/// Errors reading a key file as a whole.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read (other than not existing).
    #[error("cannot read {path}: {source}", path = path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// A parsed key file: the usable keys and the lines that were skipped.
#[derive(Debug, Default)]
pub struct KeyFile {
    /// Keys that parsed.
    pub keys: Vec<AuthorizedKey>,
    /// Lines that did not parse; reported, never fatal for the other keys.
    pub errors: Vec<KeyLineError>,
}

impl KeyFile {
    /// Parses `authorized_keys` text. Blank lines and `#` comments are skipped.
    pub fn parse(path: &Path, text: &str) -> KeyFile {
        let mut out = KeyFile::default();
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.parse::<Entry>() {
                Ok(entry) => out.keys.push(AuthorizedKey {
                    key: entry.public_key().clone(),
                    options: entry.config_opts().as_str().to_owned(),
                    line: idx + 1,
                }),
                Err(e) => out.errors.push(KeyLineError {
                    path: path.to_owned(),
                    line: idx + 1,
                    message: format!("not a valid authorized_keys line ({e})"),
                }),
            }
        }
        out
    }

    /// Finds the entry whose key data equals `key`.
    pub fn find(&self, key: &PublicKey) -> Option<&AuthorizedKey> {
        self.keys
            .iter()
            .find(|k| k.key.key_data() == key.key_data())
    }
}

/// The directory of users' key files.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// A store reading `dir/NAME.pub`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The key file path of `user`.
    pub fn path_of(&self, user: &Username) -> PathBuf {
        self.dir.join(format!("{user}.pub"))
    }

    /// Reads `user`'s key file. `Ok(None)` means the user does not exist.
    pub async fn load(&self, user: &Username) -> Result<Option<KeyFile>, KeyFileError> {
        let path = self.path_of(user);
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => Ok(Some(KeyFile::parse(&path, &text))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KeyFileError::Io { path, source }),
        }
    }

    /// Every key file in the directory, for `labgate check`: `(user, file)` for each valid
    /// name, and an error line for each `.pub` file whose name is not a valid user name.
    pub fn scan(&self) -> Result<ScanReport, KeyFileError> {
        let io_err = |source| KeyFileError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut report = ScanReport::default();
        let mut entries: Vec<_> = std::fs::read_dir(&self.dir)
            .map_err(io_err)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .collect();
        entries.sort();
        for path in entries {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let user = match Username::parse(&stem) {
                Ok(u) => u,
                Err(e) => {
                    report.errors.push(KeyLineError {
                        path: path.clone(),
                        line: 0,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            let text = std::fs::read_to_string(&path).map_err(|source| KeyFileError::Io {
                path: path.clone(),
                source,
            })?;
            let file = KeyFile::parse(&path, &text);
            if file.keys.is_empty() {
                report.errors.push(KeyLineError {
                    path: path.clone(),
                    line: 0,
                    message: format!("no usable key: user {user} cannot log in"),
                });
            }
            report.errors.extend(file.errors.iter().cloned());
            report.users.push((user, file.keys.len()));
        }
        Ok(report)
    }
}

/// What `KeyStore::scan` found.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Users with their count of usable keys.
    pub users: Vec<(Username, usize)>,
    /// Everything wrong, one line each.
    pub errors: Vec<KeyLineError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn7MrEI7ZE5jvoV0hWr8ya2DvjoZH2sGUTMv7Ur2DPt";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqHT8IYELG2pKnu5yQ1H7j9jZW6cxGIIiCgVNnhWzX/";

    #[test]
    fn parses_comments_blank_lines_options_and_several_keys() {
        let text =
            format!("# alice's keys\n\n{ED} alice@laptop\nrestrict,no-pty {ED2} ci-bot\n   \n");
        let f = KeyFile::parse(Path::new("alice.pub"), &text);
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        assert_eq!(f.keys.len(), 2);
        assert_eq!(f.keys[0].options, "");
        assert_eq!(f.keys[0].line, 3);
        assert_eq!(f.keys[1].options, "restrict,no-pty");
        assert_eq!(f.keys[1].line, 4);
        assert!(f.keys[0].fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn forwarding_options_are_read_like_sshd() {
        assert!(KeyOptions::parse("").port_forwarding);
        assert!(!KeyOptions::parse("no-port-forwarding").port_forwarding);
        assert!(!KeyOptions::parse("restrict").port_forwarding);
        assert!(KeyOptions::parse("restrict,port-forwarding").port_forwarding);
        let o = KeyOptions::parse(
            r#"command="echo a,b",permitopen="localhost:8888",permitopen="[::1]:6006",no-pty"#,
        );
        assert!(o.port_forwarding);
        assert_eq!(o.permit_open, vec!["localhost:8888", "[::1]:6006"]);
    }

    #[test]
    fn agent_forwarding_option_is_read_like_sshd() {
        assert!(KeyOptions::parse("").agent_forwarding);
        assert!(KeyOptions::parse("no-port-forwarding").agent_forwarding);
        assert!(!KeyOptions::parse("no-agent-forwarding").agent_forwarding);
        assert!(!KeyOptions::parse("restrict").agent_forwarding);
        assert!(!KeyOptions::parse("restrict,port-forwarding").agent_forwarding);
        assert!(KeyOptions::parse("restrict,agent-forwarding").agent_forwarding);
        assert!(!KeyOptions::parse("restrict,agent-forwarding").port_forwarding);
        assert!(!KeyOptions::parse("NO-AGENT-FORWARDING,pty").agent_forwarding);
    }

    #[test]
    fn bad_lines_are_reported_with_line_numbers_and_do_not_hide_good_keys() {
        let text = format!("ssh-ed25519 notbase64!!\n{ED}\nwhatever\n");
        let f = KeyFile::parse(Path::new("k/bob.pub"), &text);
        assert_eq!(f.keys.len(), 1);
        let lines: Vec<usize> = f.errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![1, 3]);
        assert!(f.errors[0].to_string().starts_with("k/bob.pub:1: "));
    }

    #[test]
    fn find_compares_key_data_not_comments() {
        let f = KeyFile::parse(Path::new("a.pub"), &format!("{ED} one-comment\n"));
        let other_comment: PublicKey = format!("{ED} another").parse().unwrap();
        assert!(f.find(&other_comment).is_some());
        let different: PublicKey = ED2.parse().unwrap();
        assert!(f.find(&different).is_none());
    }

    #[tokio::test]
    async fn a_user_exists_iff_the_key_file_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alice.pub"), format!("{ED}\n")).unwrap();
        std::fs::write(dir.path().join("Bad.Name.pub"), format!("{ED}\n")).unwrap();
        let store = KeyStore::new(dir.path().to_owned());
        let alice = Username::parse("alice").unwrap();
        let carol = Username::parse("carol").unwrap();
        assert_eq!(store.load(&alice).await.unwrap().unwrap().keys.len(), 1);
        assert!(store.load(&carol).await.unwrap().is_none());
        let report = store.scan().unwrap();
        assert_eq!(report.users, vec![(alice, 1)]);
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].message.contains("invalid user name"));
    }
}
