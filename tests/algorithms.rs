//! What a scanner of SSH server algorithms checks, with the real OpenSSH client: the server's
//! KEXINIT (read from `ssh -vvv`) offers strict KEX (`kex-strict-s-v00@openssh.com`, the
//! Terrapin countermeasure) and only modern algorithms; a client that insists on a weak one
//! cannot connect; password and keyboard-interactive authentication are never offered.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::process::Stdio;

use common::{Gateway, stderr_of};

/// The server's proposal as `ssh -vvv` prints it: `(label, algorithms)` for each line after
/// "peer server KEXINIT proposal" (`KEX algorithms`, `host key algorithms`, `ciphers ctos`,
/// `MACs ctos`...).
fn server_proposal(verbose: &str) -> Vec<(String, Vec<String>)> {
    verbose
        .lines()
        .skip_while(|l| !l.contains("peer server KEXINIT proposal"))
        .skip(1)
        .map_while(|l| l.strip_prefix("debug2: "))
        .filter_map(|l| l.split_once(": "))
        .take_while(|(label, _)| !label.contains("KEXINIT"))
        .map(|(label, list)| {
            let algs = list
                .split(',')
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect();
            (label.to_owned(), algs)
        })
        .collect()
}

fn offered<'a>(proposal: &'a [(String, Vec<String>)], label: &str) -> &'a [String] {
    proposal
        .iter()
        .find(|(l, _)| l == label)
        .map(|(_, a)| a.as_slice())
        .unwrap_or_else(|| panic!("no `{label}` in the server's KEXINIT: {proposal:?}"))
}

#[test]
fn the_server_offers_strict_kex_and_only_modern_algorithms() {
    let gw = Gateway::start(1, "", "");
    let out = gw
        .ssh(0)
        .args(["-vvv", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let verbose = stderr_of(&out);
    assert!(out.status.success(), "login failed: {verbose}");
    let proposal = server_proposal(&verbose);

    let kex = offered(&proposal, "KEX algorithms");
    assert!(
        kex.iter().any(|k| k == "kex-strict-s-v00@openssh.com"),
        "strict KEX (Terrapin countermeasure) not offered: {kex:?}"
    );
    let modern_kex = [
        "mlkem768x25519-sha256",
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ext-info-s",
        "kex-strict-s-v00@openssh.com",
    ];
    for k in kex {
        assert!(
            modern_kex.contains(&k.as_str()),
            "weak or unexpected kex {k}"
        );
    }

    assert_eq!(
        offered(&proposal, "host key algorithms"),
        ["ssh-ed25519"],
        "host key algorithms for an ed25519 host key"
    );
    for dir in ["ciphers ctos", "ciphers stoc"] {
        for c in offered(&proposal, dir) {
            let aead = c.ends_with("-gcm@openssh.com") || c == "chacha20-poly1305@openssh.com";
            assert!(
                aead || c.ends_with("-ctr"),
                "weak cipher offered ({dir}): {c}"
            );
        }
    }
    for dir in ["MACs ctos", "MACs stoc"] {
        for m in offered(&proposal, dir) {
            assert!(
                m.starts_with("hmac-sha2-") && m.ends_with("-etm@openssh.com"),
                "weak or non-EtM MAC offered ({dir}): {m}"
            );
        }
    }
    // The client saw the server's strict KEX marker and kept the session (OpenSSH aborts a
    // strict session on any out-of-order packet); it logs the negotiation as such.
    assert!(
        verbose.contains("kex-strict-s-v00@openssh.com"),
        "{verbose}"
    );
}

#[test]
fn a_client_insisting_on_a_weak_algorithm_cannot_connect() {
    let gw = Gateway::start(1, "", "");
    let weak: &[&[&str]] = &[
        &["-o", "Ciphers=3des-cbc"],
        &["-o", "Ciphers=aes128-cbc"],
        &["-o", "KexAlgorithms=diffie-hellman-group1-sha1"],
        &["-o", "KexAlgorithms=diffie-hellman-group14-sha1"],
        &["-o", "KexAlgorithms=diffie-hellman-group-exchange-sha1"],
        &["-o", "KexAlgorithms=ecdh-sha2-nistp256"],
        // A MAC only matters with a non-AEAD cipher.
        &["-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-md5"],
        &["-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha1"],
        &["-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha2-256"],
        &["-o", "HostKeyAlgorithms=ssh-rsa"],
    ];
    for opts in weak {
        // INFO level: OpenSSH logs "Unable to negotiate" at that level.
        let out = gw
            .ssh_info(0)
            .args(*opts)
            .arg("echo connected")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(255), "{opts:?}: {err}");
        assert!(
            err.contains("Unable to negotiate") && err.contains("no matching"),
            "{opts:?} should fail negotiation, got: {err}"
        );
        assert!(out.stdout.is_empty(), "{opts:?} ran the command");
    }
    // The same client with its defaults gets in: the refusals are about the algorithms.
    assert_eq!(gw.ok(0, "echo connected"), "connected\n");
}

#[test]
fn password_and_keyboard_interactive_are_never_offered() {
    let gw = Gateway::start(1, "", "");
    for method in ["password", "keyboard-interactive"] {
        let out = gw
            .ssh(0)
            .args(["-o", &format!("PreferredAuthentications={method}")])
            .args(["-o", "PubkeyAuthentication=no", "-v", "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(255), "{method}: {err}");
        assert!(err.contains("Permission denied (publickey)."), "{err}");
        // The server's list of methods that can continue names public key only.
        assert!(
            err.lines()
                .any(|l| l.trim_end() == "debug1: Authentications that can continue: publickey"),
            "{method}: {err}"
        );
    }
}
