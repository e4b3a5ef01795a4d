//! Users' public keys: `keys_dir/NAME.pub` files in OpenSSH `authorized_keys` format.
//!
//! A user exists if and only if their key file exists (or, for certificate logins, has a
//! `[users.NAME]` table: see [`super::cert`]). Files are read at authentication time, so adding
//! or removing a user is dropping or deleting one file; nothing is cached. A line whose key or
//! options do not parse is skipped and reported with its `file:line`, as sshd skips it.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use russh::keys::ssh_key::{HashAlg, PublicKey};

use super::options::{self, KeyOptions, UseRefusal};
use super::user::Username;

/// A key a user proved at login, with what it may do: one line of their key file, or the
/// key of a certificate signed by a trusted CA.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    /// The public key itself; compared by key data, never by comment.
    pub key: PublicKey,
    /// Its options (see [`KeyOptions`]).
    pub options: KeyOptions,
    /// Where it came from, for log messages.
    pub origin: KeyOrigin,
}

/// Where an [`AuthorizedKey`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    /// A line of the user's key file (1-based).
    Line(usize),
    /// A certificate (see [`super::cert`]).
    Certificate {
        /// The certificate's key id (`ssh-keygen -I`).
        key_id: String,
        /// Its serial number.
        serial: u64,
        /// SHA-256 fingerprint of the CA that signed it.
        ca: String,
    },
}

impl AuthorizedKey {
    /// The SHA-256 fingerprint as OpenSSH prints it (`SHA256:...`).
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint(HashAlg::Sha256).to_string()
    }

    /// What this key may do.
    pub fn options(&self) -> &KeyOptions {
        &self.options
    }
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
    /// Parses `authorized_keys` text. Blank lines and `#` comments are skipped; a line whose
    /// key or options do not parse is reported and skipped, as sshd skips it.
    pub fn parse(path: &Path, text: &str) -> KeyFile {
        let mut out = KeyFile::default();
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line) {
                Ok((key, options)) => out.keys.push(AuthorizedKey {
                    key,
                    options,
                    origin: KeyOrigin::Line(idx + 1),
                }),
                Err(message) => out.errors.push(KeyLineError {
                    path: path.to_owned(),
                    line: idx + 1,
                    message,
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

    /// Finds the first line with `key` whose options allow a login from `ip` at `now`, as
    /// sshd tries each matching line in turn. `Err(None)`: the key is not in the file;
    /// `Err(Some(why))`: it is, but every line with it refuses this login.
    pub fn find_usable(
        &self,
        key: &PublicKey,
        ip: IpAddr,
        now: SystemTime,
    ) -> Result<&AuthorizedKey, Option<UseRefusal>> {
        let mut refusal = None;
        for entry in self
            .keys
            .iter()
            .filter(|k| k.key.key_data() == key.key_data())
        {
            match entry.options.authorize(ip, now) {
                Ok(()) => return Ok(entry),
                Err(why) => refusal = Some(why),
            }
        }
        Err(refusal)
    }
}

/// One key line: `[options] keytype base64 [comment]`. The options field ends at the first
/// blank outside double quotes (a `command="..."` may contain blanks).
fn parse_line(line: &str) -> Result<(PublicKey, KeyOptions), String> {
    if let Ok(key) = line.parse::<PublicKey>() {
        return Ok((key, KeyOptions::default()));
    }
    let end = options::options_end(line)
        .ok_or_else(|| "not a valid authorized_keys line (no key, or unclosed quote)".to_owned())?;
    let (field, rest) = line.split_at(end);
    let key = rest
        .trim_start()
        .parse::<PublicKey>()
        .map_err(|e| format!("not a valid authorized_keys line ({e})"))?;
    let options = KeyOptions::parse(field).map_err(|e| format!("{e}: line skipped"))?;
    Ok((key, options))
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
        assert_eq!(f.keys[0].options, KeyOptions::default());
        assert_eq!(f.keys[0].origin, KeyOrigin::Line(3));
        assert!(!f.keys[1].options.pty && !f.keys[1].options.port_forwarding);
        assert_eq!(f.keys[1].origin, KeyOrigin::Line(4));
        assert!(f.keys[0].fingerprint().starts_with("SHA256:"));
    }

    #[test]
    fn options_may_contain_blanks_and_keys_need_no_comment() {
        let text = format!("command=\"echo hello  world\",from=\"127.0.0.1\" {ED}\nno-pty {ED2}\n");
        let f = KeyFile::parse(Path::new("a.pub"), &text);
        assert!(f.errors.is_empty(), "{:?}", f.errors);
        assert_eq!(
            f.keys[0].options.command.as_deref(),
            Some("echo hello  world")
        );
        assert!(f.keys[0].options.from.is_some());
        assert!(!f.keys[1].options.pty);
    }

    #[test]
    fn a_line_with_a_bad_option_is_skipped_and_named() {
        let text = format!("no-ptty {ED} typo\nfrom=10.0.0.0/8 {ED}\n{ED2}\n");
        let f = KeyFile::parse(Path::new("k/carol.pub"), &text);
        assert_eq!(f.keys.len(), 1, "{:?}", f.keys);
        assert_eq!(f.keys[0].origin, KeyOrigin::Line(3));
        let shown: Vec<String> = f.errors.iter().map(ToString::to_string).collect();
        assert!(shown[0].starts_with("k/carol.pub:1: "), "{shown:?}");
        assert!(shown[0].contains("\"no-ptty\""), "{shown:?}");
        assert!(shown[1].starts_with("k/carol.pub:2: "), "{shown:?}");
        assert!(shown[1].contains("double quotes"), "{shown:?}");
    }

    #[test]
    fn a_later_line_with_the_same_key_may_allow_what_an_earlier_refuses() {
        let text =
            format!("from=\"10.0.0.0/8\" {ED} office\nfrom=\"127.0.0.1\",no-pty {ED} here\n");
        let f = KeyFile::parse(Path::new("a.pub"), &text);
        let key: PublicKey = ED.parse().unwrap();
        let now = SystemTime::now();
        let used = f
            .find_usable(&key, "127.0.0.1".parse().unwrap(), now)
            .unwrap();
        assert_eq!(used.origin, KeyOrigin::Line(2));
        let refused = f
            .find_usable(&key, "192.168.0.9".parse().unwrap(), now)
            .unwrap_err();
        assert!(
            matches!(refused, Some(UseRefusal::NotFromHere { .. })),
            "{refused:?}"
        );
        let other: PublicKey = ED2.parse().unwrap();
        assert_eq!(
            f.find_usable(&other, "127.0.0.1".parse().unwrap(), now)
                .unwrap_err(),
            None
        );
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
