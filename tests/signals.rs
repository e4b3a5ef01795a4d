//! RFC 4254 `signal` requests and `exit-signal` replies. OpenSSH's `ssh` has no way to send a
//! signal request, so this one test drives the protocol with russh's client (the SSH library
//! labgate is built on); everything else in the suite uses the real OpenSSH client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::time::Duration;

use common::client::{connect, ending};
use common::{Gateway, eventually, pids_of};
use russh::Sig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_request_reaches_the_command_and_comes_back_as_exit_signal() {
    let gw = Gateway::start(1, "", "");
    let marker = format!("sleep 4{:04}1", std::process::id() % 10_000);
    let handle = connect(&gw, 0).await;
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
    let (exit_signal, exit_status) =
        tokio::time::timeout(Duration::from_secs(20), ending(&mut channel))
            .await
            .unwrap();
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
    let handle = connect(&gw, 0).await;
    let mut channel = handle.channel_open_session().await.unwrap();
    channel.exec(true, "exit 143").await.unwrap();
    assert_eq!(ending(&mut channel).await, (None, Some(143)));
}
