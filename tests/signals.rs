//! RFC 4254 `signal` requests and `exit-signal` replies. OpenSSH's `ssh` has no way to send a
//! signal request, so this one test drives the protocol with russh's client (the SSH library
//! labgate is built on); everything else in the suite uses the real OpenSSH client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, eventually, pids_of};
use russh::keys::PrivateKeyWithHashAlg;
use russh::{ChannelMsg, Sig};

struct AcceptAnyHostKey;

impl russh::client::Handler for AcceptAnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

async fn session(gw: &Gateway) -> russh::client::Handle<AcceptAnyHostKey> {
    let config = Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect(config, gw.addr, AcceptAnyHostKey)
        .await
        .unwrap();
    let key = russh::keys::load_secret_key(&gw.keys[0].private, None).unwrap();
    let auth = handle
        .authenticate_publickey(
            gw.users[0].clone(),
            PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success());
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_request_reaches_the_command_and_comes_back_as_exit_signal() {
    let gw = Gateway::start(1, "", "");
    let marker = format!("sleep 4{:04}1", std::process::id() % 10_000);
    let handle = session(&gw).await;
    let mut channel = handle.channel_open_session().await.unwrap();
    channel.exec(true, marker.as_bytes()).await.unwrap();
    let m = marker.clone();
    let running = tokio::task::spawn_blocking(move || {
        eventually(Duration::from_secs(20), || !pids_of(&m).is_empty())
    })
    .await
    .unwrap();
    assert!(running, "{}", gw.log());
    channel.signal(Sig::TERM).await.unwrap();
    let mut exit_signal = None;
    let mut exit_status = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), channel.wait())
        .await
        .unwrap()
    {
        match msg {
            ChannelMsg::ExitSignal { signal_name, .. } => {
                exit_signal = Some(format!("{signal_name:?}"))
            }
            ChannelMsg::ExitStatus { exit_status: s } => exit_status = Some(s),
            _ => {}
        }
    }
    assert_eq!(
        exit_signal.as_deref(),
        Some("TERM"),
        "exit status was {exit_status:?}"
    );
    assert!(pids_of(&marker).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_exit_code_above_128_stays_an_exit_status() {
    let gw = Gateway::start(1, "", "");
    let handle = session(&gw).await;
    let mut channel = handle.channel_open_session().await.unwrap();
    channel.exec(true, "exit 143").await.unwrap();
    let mut got = (None, None);
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::ExitSignal { signal_name, .. } => got.0 = Some(format!("{signal_name:?}")),
            ChannelMsg::ExitStatus { exit_status } => got.1 = Some(exit_status),
            _ => {}
        }
    }
    assert_eq!(got, (None, Some(143)));
}
