//! `labgate check`, like `sshd -t`: loads the config and the key files and prints each
//! problem with its file, line and column (stderr), what it found (stdout), and warnings for
//! what works degraded (users without keys, unreadable registry secrets, missing helpers,
//! homes under writable mounts). `[cluster]` has its own checks in [`cluster`].

mod cluster;

use std::path::Path;

use crate::auth::KeyStore;
use crate::config::{self, Config, helpers};

/// Checks the config at `path` and what it names, printing as it goes; true when all is well
/// (warnings do not count), the exit status of `labgate check`.
pub fn run(path: &Path) -> bool {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return false;
        }
    };
    let store = KeyStore::new(config.server.keys_dir.clone());
    let report = match store.scan() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return false;
        }
    };
    for e in &report.errors {
        eprintln!("{e}");
    }
    let ca_ok = check_trusted_cas(&config);
    let cluster_ok = cluster::report(&config);
    for user in config.configured_users() {
        if !report.users.iter().any(|(u, _)| u == user) {
            eprintln!(
                "{}: warning: [users.{user}] has no key file {}: that user cannot log in",
                config.source.display(),
                store.path_of(user).display()
            );
        }
    }
    warn_unreadable_registry_secrets(&config);
    report_helpers(&config);
    report_accounting(&config);
    for (table, home, source) in config.homes_under_writable_mounts() {
        eprintln!(
            "{}: warning: {table} home {home:?} lies under the writable mount source {}: users who can write there could replace a home with a symlink (labgate refuses to start such a container; keep homes outside writable mounts)",
            config.source.display(),
            source.display()
        );
    }
    if report.errors.is_empty() && ca_ok && cluster_ok {
        println!(
            "{}: OK ({} user(s) with keys in {})",
            config.source.display(),
            report.users.len(),
            config.server.keys_dir.display()
        );
        true
    } else {
        false
    }
}

/// `labgate check` on the GPU accounting database: where it is (stdout), or a warning when
/// it cannot be read (the gateway would then count in memory only).
fn report_accounting(config: &Config) {
    let path = config.server.state_dir.join(crate::accounting::FILE_NAME);
    match crate::accounting::store::Store::open_read_only(&path) {
        Ok(_) => println!("GPU accounting: {}", path.display()),
        Err(crate::accounting::AccountingError::Missing(_)) => println!(
            "GPU accounting: {} (made when the gateway starts)",
            path.display()
        ),
        Err(e) => eprintln!(
            "{}: warning: GPU accounting cannot be read ({e}): the gateway would count GPU use in memory only, lost at restart",
            config.source.display()
        ),
    }
}

/// `labgate check` on the helpers: which were found (stdout), and a warning naming what is
/// lost for each one missing or dynamically linked. Neither fails the check: the gateway runs
/// without them, degraded.
fn report_helpers(config: &Config) {
    let docker = &config.docker;
    let helpers = [
        (
            &docker.relay_helper,
            helpers::RELAY,
            "relay_helper",
            "no direct path: sessions without a terminal (scp, rsync, git, sftp) go through the engine's exec stream, and forwards fail where the gateway cannot enter containers' namespaces (forward_via = \"exec\")",
        ),
        (
            &docker.sftp_helper,
            helpers::SFTP,
            "sftp_helper",
            "images without their own sftp-server get no sftp (nor scp, which speaks sftp)",
        ),
    ];
    let file = config.source.display();
    for (helper, name, key, without) in helpers {
        if !helper.found {
            if helper.origin == helpers::Origin::Configured {
                eprintln!(
                    "{file}: warning: [docker] {key} = {:?} does not exist: {without}",
                    helper.path
                );
            } else {
                let searched: Vec<String> = helper
                    .searched
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                eprintln!(
                    "{file}: warning: no {name} helper (looked for {}): {without}",
                    searched.join(", ")
                );
            }
            continue;
        }
        println!(
            "helper {name}: {} ({})",
            helper.path.display(),
            helper.origin
        );
        if helpers::is_dynamically_linked(&helper.path) == Some(true) {
            eprintln!(
                "{file}: warning: helper {} is dynamically linked: it runs only in images whose C library suits it (elsewhere: {without}); build it static as scripts/deb does",
                helper.path.display()
            );
        }
    }
}

/// `labgate check` on `[server] trusted_user_ca_keys`: the file must read and hold at least
/// one CA key; bad lines are reported. True when all is well (or no CA file is set).
fn check_trusted_cas(config: &Config) -> bool {
    let Some(path) = &config.server.trusted_user_ca_keys else {
        return true;
    };
    let cas = match std::fs::read_to_string(path) {
        Ok(text) => crate::auth::TrustedCas::parse(path, &text),
        Err(e) => {
            eprintln!(
                "{}: cannot read trusted_user_ca_keys: {e}: certificate logins are refused",
                path.display()
            );
            return false;
        }
    };
    for e in &cas.errors {
        eprintln!("{e}");
    }
    if cas.is_empty() {
        eprintln!(
            "{}: no usable CA key: certificate logins are refused",
            path.display()
        );
    }
    cas.errors.is_empty() && !cas.is_empty()
}

/// Warns about registry password files that cannot be read (pulls from there would fail).
/// Only the file's readability is checked; its contents are never printed.
fn warn_unreadable_registry_secrets(config: &Config) {
    let mut seen = std::collections::BTreeSet::new();
    let images = crate::runtime::docker::prepull::images_of(config);
    for auth in images.values().filter_map(|(_, auth)| auth.as_ref()) {
        if seen.insert(auth.password_file.clone())
            && let Err(e) = std::fs::File::open(&auth.password_file)
        {
            eprintln!(
                "{}: warning: [registries.\"{}\"] password_file {} cannot be read ({e}): pulls from it will fail",
                config.source.display(),
                auth.registry,
                auth.password_file.display()
            );
        }
    }
}
