//! The SSH server: algorithms and limits, the accept loop, one task per connection.
//!
//! The accept loop is labgate's own (not russh's `run_on_socket`, which ends the server on the
//! first accept error): a semaphore bounds connections, accept errors back off, every
//! connection runs in its own task under a tracing span (`conn`, `peer`, `user`) and is
//! disconnected if it has not authenticated within `login_grace`.

pub mod handler;
pub mod hostkey;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::Config as RusshConfig;
use russh::{MethodKind, MethodSet, Preferred, cipher, kex};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug, info, warn};

use crate::config::ServerConfig;
use crate::session::Context;
use handler::ConnectionHandler;

/// The russh server configuration labgate uses: public key only, modern algorithms,
/// AES-128-GCM offered (OpenSSH clients like it), TCP_NODELAY, keepalives instead of russh's
/// 10-minute inactivity cut.
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
            ..Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// Serves SSH on `listener` until `shutdown` turns true; then asks every connection to close
/// and returns once they have (or after a few seconds).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    config: Arc<RusshConfig>,
    server: ServerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(server.max_connections));
    let next_id = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(10);
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped(&mut shutdown) => break,
        };
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
        let authenticated = Arc::new(AtomicBool::new(false));
        let end = tokio_util::sync::CancellationToken::new();
        let span = tracing::info_span!("conn", conn, peer = %peer, user = tracing::field::Empty);
        let handler = ConnectionHandler::new(
            ctx.clone(),
            peer,
            local,
            conn,
            authenticated.clone(),
            span.clone(),
            end.clone(),
        );
        let config = config.clone();
        let grace = server.login_grace;
        let mut shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                let _permit = permit;
                debug!("connected");
                let session = match russh::server::run_stream(config, socket, handler).await {
                    Ok(s) => s,
                    Err(e) => {
                        debug!("handshake failed: {e}");
                        return;
                    }
                };
                let handle = session.handle();
                tokio::pin!(session);
                let login_timer = tokio::time::sleep(grace);
                tokio::pin!(login_timer);
                let mut timer_armed = true;
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
                            if !authenticated.load(Ordering::SeqCst) {
                                info!("no login within {grace:?}: disconnecting");
                                let _ = handle.disconnect(russh::Disconnect::ByApplication, "login grace time exceeded".into(), String::new()).await;
                            }
                        }
                        _ = end.cancelled() => {
                            info!("ended by the gateway (admin kick or key removed)");
                            let _ = handle.disconnect(russh::Disconnect::ByApplication, "connection ended by labgate (admin kick, or its key was removed)".into(), String::new()).await;
                            let _ = tokio::time::timeout(Duration::from_secs(3), &mut session).await;
                            break;
                        }
                        _ = stopped(&mut shutdown) => {
                            let _ = handle.disconnect(russh::Disconnect::ByApplication, "labgate is shutting down".into(), String::new()).await;
                            // Let the session end so its channels hang up their processes.
                            let _ = tokio::time::timeout(Duration::from_secs(3), &mut session).await;
                            break;
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        warn!("some connections did not close in time");
    }
}

/// Resolves once `rx` holds `true` (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}
