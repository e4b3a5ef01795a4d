//! OpenSSH user certificates signed by a CA the admin trusts (`[server] trusted_user_ca_keys`,
//! like sshd's `TrustedUserCAKeys` without an `AuthorizedPrincipalsFile`).
//!
//! A certificate is accepted when it is a *user* certificate, signed by one of the CA keys in
//! the file, valid now (`valid_after <= now < valid_before`), lists the login name among its
//! principals (an empty list is refused, as sshd refuses it), carries no critical option
//! labgate does not understand, and its `source-address` (if any) allows the client. The
//! user must be known: a key file `keys/NAME.pub` or a `[users.NAME]` table (decided by the
//! caller). The certificate's permissions map onto [`KeyOptions`] as sshd maps them: a
//! certificate grants only what its extensions say (`permit-pty`, `permit-port-forwarding`,
//! `permit-agent-forwarding`), `force-command` is a forced command and `source-address` a
//! `from=`. The CA file is read at each certificate login, so editing it needs no reload.

use std::net::IpAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::{Certificate, Fingerprint, HashAlg, PublicKey};

use super::keys::{AuthorizedKey, KeyFileError, KeyLineError, KeyOrigin};
use super::options::{KeyOptions, UseRefusal};
use super::source::SourceList;

/// The CA keys of the trusted CA file.
#[derive(Debug, Default)]
pub struct TrustedCas {
    /// Fingerprints (SHA-256) of the CA keys that parsed.
    fingerprints: Vec<Fingerprint>,
    /// Lines that did not parse; reported, never fatal for the other keys.
    pub errors: Vec<KeyLineError>,
}

/// Why a certificate was refused. Only ever logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertRefusal {
    /// `[server] trusted_user_ca_keys` is not set.
    #[error("certificate offered but no trusted_user_ca_keys is configured")]
    NoTrustedCa,
    /// The CA file could not be read.
    #[error("trusted CA file unreadable: {0}")]
    CaFileUnreadable(String),
    /// Signed by a key that is not in the CA file.
    #[error("certificate signed by an untrusted CA ({0})")]
    UntrustedCa(String),
    /// A host certificate.
    #[error("not a user certificate")]
    NotUserCertificate,
    /// Outside its validity window, or its signature does not verify.
    #[error("certificate not valid now (expired, not yet valid, or bad signature)")]
    NotValid,
    /// The login name is not among the principals.
    #[error("{login:?} is not among the certificate's principals {principals:?}")]
    Principal {
        /// The login name.
        login: String,
        /// The certificate's principals.
        principals: Vec<String>,
    },
    /// A critical option labgate does not implement (sshd refuses those too).
    #[error("unsupported critical option {0:?}")]
    CriticalOption(String),
    /// A `source-address` that does not parse.
    #[error("bad source-address: {0}")]
    SourceAddress(String),
    /// `source-address` does not include the client.
    #[error(transparent)]
    Use(#[from] UseRefusal),
}

impl TrustedCas {
    /// Parses a CA file: one OpenSSH public key per line; blank lines and `#` comments
    /// are skipped.
    pub fn parse(path: &Path, text: &str) -> TrustedCas {
        let mut out = TrustedCas::default();
        for (idx, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.parse::<PublicKey>() {
                Ok(key) => out.fingerprints.push(key.fingerprint(HashAlg::Sha256)),
                Err(e) => out.errors.push(KeyLineError {
                    path: path.to_owned(),
                    line: idx + 1,
                    message: format!("not a valid CA public key line ({e})"),
                }),
            }
        }
        out
    }

    /// Reads the CA file at `path`.
    pub async fn load(path: &Path) -> Result<TrustedCas, KeyFileError> {
        match tokio::fs::read_to_string(path).await {
            Ok(text) => Ok(TrustedCas::parse(path, &text)),
            Err(source) => Err(KeyFileError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Number of usable CA keys.
    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    /// Whether the file holds no usable CA key.
    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    /// Checks `cert` for a login as `login` from `ip` at `now`; returns the key it certifies,
    /// with the options the certificate grants.
    pub fn check(
        &self,
        cert: &Certificate,
        login: &str,
        ip: IpAddr,
        now: SystemTime,
    ) -> Result<AuthorizedKey, CertRefusal> {
        let ca = cert.signature_key().fingerprint(HashAlg::Sha256);
        if !self.fingerprints.contains(&ca) {
            return Err(CertRefusal::UntrustedCa(ca.to_string()));
        }
        if !cert.cert_type().is_user() {
            return Err(CertRefusal::NotUserCertificate);
        }
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        cert.validate_at(secs, [&ca])
            .map_err(|_| CertRefusal::NotValid)?;
        if !cert.valid_principals().iter().any(|p| p == login) {
            return Err(CertRefusal::Principal {
                login: login.to_owned(),
                principals: cert.valid_principals().to_vec(),
            });
        }
        let options = certificate_options(cert)?;
        options.authorize(ip, now)?;
        Ok(AuthorizedKey {
            key: PublicKey::new(cert.public_key().clone(), cert.key_id()),
            options,
            origin: KeyOrigin::Certificate {
                key_id: cert.key_id().to_owned(),
                serial: cert.serial(),
                ca: ca.to_string(),
            },
        })
    }
}

/// What a certificate grants, in [`KeyOptions`] terms: nothing beyond its extensions (a
/// certificate is "restricted" unless it says otherwise), its `force-command` and its
/// `source-address`. Unknown extensions are ignored; unknown critical options refuse it.
pub fn certificate_options(cert: &Certificate) -> Result<KeyOptions, CertRefusal> {
    let ext = cert.extensions();
    let mut options = KeyOptions {
        port_forwarding: ext.contains_key("permit-port-forwarding"),
        agent_forwarding: ext.contains_key("permit-agent-forwarding"),
        pty: ext.contains_key("permit-pty"),
        ..KeyOptions::default()
    };
    for (name, value) in cert.critical_options().iter() {
        match name.as_str() {
            "force-command" => options.command = Some(value.clone()),
            "source-address" => {
                options.from = Some(
                    SourceList::parse_networks(value)
                        .map_err(|e| CertRefusal::SourceAddress(e.to_string()))?,
                )
            }
            other => return Err(CertRefusal::CriticalOption(other.to_owned())),
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::{Algorithm, PrivateKey};

    fn key() -> PrivateKey {
        PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A user certificate for `user_key`, signed by `ca`, for `principals`, valid for an hour.
    fn sign(
        ca: &PrivateKey,
        user_key: &PrivateKey,
        principals: &[&str],
        edit: impl FnOnce(&mut Builder),
    ) -> Certificate {
        sign_as(CertType::User, ca, user_key, principals, edit)
    }

    fn sign_as(
        kind: CertType,
        ca: &PrivateKey,
        user_key: &PrivateKey,
        principals: &[&str],
        edit: impl FnOnce(&mut Builder),
    ) -> Certificate {
        let mut b = Builder::new_with_random_nonce(
            &mut rand::rng(),
            user_key.public_key(),
            now() - 60,
            now() + 3600,
        )
        .unwrap();
        b.serial(7).unwrap().key_id("alice@laptop").unwrap();
        b.cert_type(kind).unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        b.extension("permit-pty", "").unwrap();
        edit(&mut b);
        b.sign(ca).unwrap()
    }

    fn cas(keys: &[&PrivateKey]) -> TrustedCas {
        let text: String = keys
            .iter()
            .map(|k| format!("{}\n", k.public_key().to_openssh().unwrap()))
            .collect();
        TrustedCas::parse(Path::new("ca.pub"), &format!("# lab CA\n\n{text}garbage\n"))
    }

    fn local() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    #[test]
    fn a_certificate_from_a_trusted_ca_for_this_principal_is_accepted() {
        let (ca, user) = (key(), key());
        let trusted = cas(&[&key(), &ca]);
        assert_eq!(trusted.len(), 2);
        assert_eq!(trusted.errors.len(), 1);
        assert_eq!(trusted.errors[0].line, 5);
        let cert = sign(&ca, &user, &["bob", "alice"], |_| {});
        let used = trusted
            .check(&cert, "alice", local(), SystemTime::now())
            .unwrap();
        assert_eq!(used.key.key_data(), user.public_key().key_data());
        assert!(
            matches!(&used.origin, KeyOrigin::Certificate { key_id, serial: 7, .. } if key_id == "alice@laptop")
        );
        // Only what the extensions grant.
        assert!(used.options.pty);
        assert!(!used.options.port_forwarding && !used.options.agent_forwarding);
    }

    #[test]
    fn other_cas_principals_types_and_times_are_refused() {
        let (ca, user) = (key(), key());
        let trusted = cas(&[&ca]);
        let t = SystemTime::now();
        let other = sign(&key(), &user, &["alice"], |_| {});
        assert!(matches!(
            trusted.check(&other, "alice", local(), t),
            Err(CertRefusal::UntrustedCa(_))
        ));
        let cert = sign(&ca, &user, &["alice"], |_| {});
        assert!(matches!(
            trusted.check(&cert, "bob", local(), t),
            Err(CertRefusal::Principal { .. })
        ));
        let none = sign(&ca, &user, &[], |b| {
            b.all_principals_valid().unwrap();
        });
        assert!(matches!(
            trusted.check(&none, "alice", local(), t),
            Err(CertRefusal::Principal { .. })
        ));
        let host = sign_as(CertType::Host, &ca, &user, &["alice"], |_| {});
        assert_eq!(
            trusted.check(&host, "alice", local(), t).unwrap_err(),
            CertRefusal::NotUserCertificate
        );
        let later = t + std::time::Duration::from_secs(7200);
        assert_eq!(
            trusted.check(&cert, "alice", local(), later).unwrap_err(),
            CertRefusal::NotValid
        );
        assert_eq!(
            TrustedCas::default()
                .check(&cert, "alice", local(), t)
                .unwrap_err(),
            CertRefusal::UntrustedCa(ca.public_key().fingerprint(HashAlg::Sha256).to_string())
        );
    }

    #[test]
    fn critical_options_and_extensions_map_onto_key_options() {
        let (ca, user) = (key(), key());
        let trusted = cas(&[&ca]);
        let t = SystemTime::now();
        let cert = sign(&ca, &user, &["alice"], |b| {
            b.critical_option("force-command", "echo forced").unwrap();
            b.critical_option("source-address", "10.0.0.0/8,127.0.0.1")
                .unwrap();
            b.extension("permit-port-forwarding", "").unwrap();
            b.extension("permit-agent-forwarding", "").unwrap();
            b.extension("permit-user-rc", "").unwrap();
        });
        let used = trusted.check(&cert, "alice", local(), t).unwrap();
        assert_eq!(used.options.command.as_deref(), Some("echo forced"));
        assert!(used.options.port_forwarding && used.options.agent_forwarding);
        assert!(matches!(
            trusted.check(&cert, "alice", "192.168.1.1".parse().unwrap(), t),
            Err(CertRefusal::Use(UseRefusal::NotFromHere { .. }))
        ));
        let odd = sign(&ca, &user, &["alice"], |b| {
            b.critical_option("verify-required", "").unwrap();
        });
        assert_eq!(
            trusted.check(&odd, "alice", local(), t).unwrap_err(),
            CertRefusal::CriticalOption("verify-required".into())
        );
        let bad_source = sign(&ca, &user, &["alice"], |b| {
            b.critical_option("source-address", "10.0.0.*").unwrap();
        });
        assert!(matches!(
            trusted.check(&bad_source, "alice", local(), t),
            Err(CertRefusal::SourceAddress(_))
        ));
    }
}
