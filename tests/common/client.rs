//! russh's SSH client, for what OpenSSH's `ssh` cannot send (RFC 4254 `signal` requests, login
//! names with control characters) and for reading exactly which exit message a channel ends
//! with.

use std::sync::Arc;

use russh::keys::PrivateKeyWithHashAlg;

use super::Gateway;

/// Accepts any host key (the gateway's is generated per test).
pub struct AcceptAnyHostKey;

impl russh::client::Handler for AcceptAnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An authenticated connection of user `i` to `gw`.
pub async fn connect(gw: &Gateway, i: usize) -> russh::client::Handle<AcceptAnyHostKey> {
    let config = Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect(config, gw.addr, AcceptAnyHostKey)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(&gw.keys[i].private, None).unwrap();
    let auth = handle
        .authenticate_publickey(
            gw.users[i].clone(),
            PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success());
    handle
}

/// Offers user `i`'s key under the login name `name`, as a client other than OpenSSH may
/// (OpenSSH's own client refuses names with control characters since the fix for
/// CVE-2023-51385); whether the gateway accepted it.
pub async fn try_login_as(gw: &Gateway, name: &str, i: usize) -> bool {
    let config = Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect(config, gw.addr, AcceptAnyHostKey)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(&gw.keys[i].private, None).unwrap();
    handle
        .authenticate_publickey(name, PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .is_ok_and(|a| a.success())
}

/// How a channel ended: the `exit-signal` name (if any) and the `exit-status` (if any),
/// read until the channel closes.
pub async fn ending(
    channel: &mut russh::Channel<russh::client::Msg>,
) -> (Option<String>, Option<u32>) {
    let mut got = (None, None);
    while let Some(msg) = channel.wait().await {
        match msg {
            russh::ChannelMsg::ExitSignal { signal_name, .. } => {
                got.0 = Some(format!("{signal_name:?}"))
            }
            russh::ChannelMsg::ExitStatus { exit_status } => got.1 = Some(exit_status),
            _ => {}
        }
    }
    got
}
