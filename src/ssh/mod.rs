//! The SSH server: algorithms and limits, the accept loop, one task per connection.
//!
//! The accept loop is labgate's own (not russh's `run_on_socket`, which ends the server on the
//! first accept error): it never waits for a place (`admission` bounds unauthenticated
//! connections by closing the oldest, authenticated ones at login), accept errors back off,
//! every connection runs in its own task under a tracing span (`conn`, `peer`, `user`) and is
//! disconnected if it has not authenticated within `login_grace` of its TCP connect.

pub mod admission;
pub mod handler;
pub mod hostkey;
pub mod quickack;
pub mod throttle;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey};
use russh::server::Config as RusshConfig;
use russh::{MethodKind, MethodSet, Preferred, cipher, kex, mac};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, warn};

use crate::config::ServerConfig;
use crate::login::Context;
use admission::{Admission, PreAuthHandle};
use handler::ConnectionHandler;

/// The russh server configuration labgate uses: public key only, modern algorithms,
/// AES-128-GCM offered (OpenSSH clients like it), TCP_NODELAY, keepalives instead of russh's
/// 10-minute inactivity cut.
///
/// What a scanner sees: curve25519 (and ML-KEM hybrid) key exchange with strict KEX (the
/// Terrapin countermeasure), AEAD or CTR ciphers, encrypt-then-MAC SHA-2 MACs only, and host
/// key algorithms without SHA-1 (`ssh-rsa` is never offered; RSA keys sign with SHA-2).
/// ECDSA (NIST curves) is offered only when the admin's host key is an ECDSA key.
pub fn russh_config(server: &ServerConfig, host_key: PrivateKey) -> RusshConfig {
    const KEX: &[kex::Name] = &[
        kex::MLKEM768X25519_SHA256,
        kex::CURVE25519,
        kex::CURVE25519_PRE_RFC_8731,
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
    ];
    const CIPHERS: &[cipher::Name] = &[
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
        cipher::AES_256_GCM,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ];
    const MACS: &[mac::Name] = &[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM];
    const HOST_KEY_ALGORITHMS: &[Algorithm] = &[
        Algorithm::Ed25519,
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha256),
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        },
    ];
    RusshConfig {
        server_id: russh::SshId::Standard(Cow::Borrowed(concat!(
            "SSH-2.0-labgate_",
            env!("CARGO_PKG_VERSION")
        ))),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        inactivity_timeout: None,
        keepalive_interval: Some(server.keepalive),
        keepalive_max: 3,
        nodelay: true,
        max_auth_attempts: 6,
        preferred: Preferred {
            kex: Cow::Borrowed(KEX),
            cipher: Cow::Borrowed(CIPHERS),
            mac: Cow::Borrowed(MACS),
            key: Cow::Borrowed(HOST_KEY_ALGORITHMS),
            ..Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// Serves SSH on `listener` until `shutdown` turns true; then asks every connection to close
/// and returns once they have (or after a few seconds). The loop never waits for a place:
/// [`admission::Admission`] bounds unauthenticated connections by closing the oldest.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    config: Arc<RusshConfig>,
    server: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission = Admission::new(
        server.max_startups,
        server.max_connections,
        server.max_connections_per_user,
    );
    let next_id = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(10);
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    warn!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = socket.set_nodelay(true);
        let local = socket.local_addr().unwrap_or(server.listen);
        let conn = next_id.fetch_add(1, Ordering::Relaxed);
        let (ticket, pre_auth) = match admission.admit(conn, peer, &socket) {
            Ok(x) => x,
            Err(e) => {
                warn!(%peer, "connection dropped: {e}");
                continue;
            }
        };
        let end = tokio_util::sync::CancellationToken::new();
        let span = tracing::info_span!("conn", conn, peer = %peer, user = tracing::field::Empty);
        let handler = ConnectionHandler::new(
            ctx.clone(),
            peer,
            local,
            conn,
            span.clone(),
            end.clone(),
            ticket,
        );
        let gone = handler.gone();
        let watch = ConnectionWatch {
            grace: server.login_grace,
            pre_auth,
            end,
            gone,
            shutdown: shutdown.clone(),
        };
        tasks.spawn(run_connection(config.clone(), socket, handler, watch).instrument(span));
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        warn!("some connections did not close in time");
    }
}

/// What a connection's task watches besides its session.
struct ConnectionWatch {
    /// `login_grace`, counted from the TCP accept.
    grace: Duration,
    /// Whether it authenticated; closes it while it has not.
    pre_auth: PreAuthHandle,
    /// Cancelled to end the connection (admin kick, key removed).
    end: tokio_util::sync::CancellationToken,
    /// The handler's token for "the connection is over" (see [`ConnectionHandler`]).
    gone: tokio_util::sync::CancellationToken,
    /// The gateway's shutdown.
    shutdown: watch::Receiver<bool>,
}

/// One connection from accept to close: the version exchange and the session, under the
/// login grace timer, an admin kick and the gateway's shutdown.
async fn run_connection(
    config: Arc<RusshConfig>,
    socket: TcpStream,
    handler: ConnectionHandler,
    mut w: ConnectionWatch,
) {
    debug!("connected");
    let grace = w.grace;
    let login_timer = tokio::time::sleep(grace);
    tokio::pin!(login_timer);
    // A client that never sends its version line waits here: the timer covers it too.
    let session = tokio::select! {
        r = russh::server::run_stream(config, quickack::QuickAck::new(socket), handler) => match r {
            Ok(s) => s,
            Err(e) => {
                debug!("handshake failed: {e}");
                log_alive_tasks();
                return;
            }
        },
        _ = &mut login_timer => {
            info!("no SSH version line within {grace:?}: disconnecting");
            log_alive_tasks();
            return;
        }
        _ = stopped(&mut w.shutdown) => return,
    };
    let handle = session.handle();
    tokio::pin!(session);
    let mut timer_armed = !w.pre_auth.is_authenticated();
    loop {
        tokio::select! {
            result = &mut session => {
                match result {
                    Ok(()) => debug!("disconnected"),
                    Err(e) => debug!("connection ended: {e}"),
                }
                break;
            }
            _ = &mut login_timer, if timer_armed => {
                timer_armed = false;
                if !w.pre_auth.is_authenticated() {
                    info!("no login within {grace:?}: disconnecting");
                    let _ = tokio::time::timeout(Duration::from_secs(1), handle.disconnect(russh::Disconnect::ByApplication, "login grace time exceeded".into(), String::new())).await;
                    // russh does not act on a disconnect in the middle of a key exchange:
                    // close the socket if the session has not ended by itself.
                    if tokio::time::timeout(Duration::from_secs(1), &mut session).await.is_ok() {
                        break;
                    }
                    w.pre_auth.close();
                }
            }
            _ = w.end.cancelled() => {
                info!("ended by the gateway (admin kick or key removed)");
                let _ = tokio::time::timeout(Duration::from_secs(1), handle.disconnect(russh::Disconnect::ByApplication, "connection ended by labgate (admin kick, or its key was removed)".into(), String::new())).await;
                end_after_disconnect(&mut session, &w).await;
                break;
            }
            _ = stopped(&mut w.shutdown) => {
                // One stalled in its key exchange would not act on the disconnect.
                w.pre_auth.close();
                let _ = tokio::time::timeout(Duration::from_secs(1), handle.disconnect(russh::Disconnect::ByApplication, "labgate is shutting down".into(), String::new())).await;
                // Let the session end so its channels hang up their processes.
                end_after_disconnect(&mut session, &w).await;
                break;
            }
        }
    }
    log_alive_tasks();
}

/// Waits up to 3 s for a session sent a disconnect to end, then ends it. russh runs it in a
/// task of its own, which dropping its future would leave running, and its loop reads nothing
/// while a channel's queue is full (a forward into a target that does not read). So the
/// channels' tasks end (their queues go with them), and the session, free to go on, acts on
/// the disconnect it was sent.
async fn end_after_disconnect<F: std::future::Future + Unpin>(
    session: &mut F,
    w: &ConnectionWatch,
) {
    if tokio::time::timeout(Duration::from_secs(3), &mut *session)
        .await
        .is_ok()
    {
        return;
    }
    debug!("the session did not end: ending its channels");
    w.gone.cancel();
    if tokio::time::timeout(Duration::from_secs(3), session)
        .await
        .is_err()
    {
        warn!("the session did not end after its channels did");
    }
}

/// Logs how many tokio tasks are alive, at debug level under the `labgate::leaks` target,
/// when a connection ends: the leak tests compare it against a baseline after many
/// connections (`LABGATE_LOG=labgate::leaks=debug`). The count includes the ending
/// connection's own task and any of its channel tasks still winding down.
fn log_alive_tasks() {
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    debug!(target: "labgate::leaks", alive_tasks = alive, "connection closed");
}

/// Resolves once `rx` holds `true` (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
