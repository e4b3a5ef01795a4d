//! The swarm rig's TLS: a CA of its own, a server certificate for each node (its address and
//! name) and a client certificate, made with `openssl` (EC P-256, valid two days).

use std::path::Path;
use std::process::{Command, Stdio};

use super::NODES;
use super::names::RigNames;

/// The openssl config for the rig's CA, its nodes' server certificates and the client's.
pub(super) fn openssl_config(names: &RigNames) -> String {
    let mut c = String::from(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = x\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [client]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    );
    for (i, node) in NODES.iter().enumerate() {
        c += &format!(
            "[{node}]\nbasicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = IP:{},DNS:{node}\n",
            names.addr(11 + i as u8)
        );
    }
    c
}

/// Makes a key and a certificate (`extensions`: a section of `config`) in `out`, signed by
/// the CA in `ca_dir` (self-signed without).
pub(super) fn certificate(
    config: &Path,
    extensions: &str,
    cn: &str,
    out: &Path,
    ca_dir: Option<&Path>,
) -> Result<(), String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-config"])
        .arg(config)
        .args(["-extensions", extensions, "-newkey", "ec"])
        .args([
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(out.join("key.pem"))
        .arg("-out")
        .arg(out.join("cert.pem"));
    if let Some(ca) = ca_dir {
        cmd.arg("-CA")
            .arg(ca.join("cert.pem"))
            .arg("-CAkey")
            .arg(ca.join("key.pem"));
    }
    let done = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if done.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl req ({extensions}): {}",
            String::from_utf8_lossy(&done.stderr)
        ))
    }
}
