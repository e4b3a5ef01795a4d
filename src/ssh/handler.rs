//! The russh [`Handler`]: a thin translator from protocol callbacks to session operations.
//!
//! It decides authentication (through [`crate::auth`]), answers channel requests in order,
//! and hands each session channel to its own task. It never awaits Docker: a callback runs
//! on the connection's read loop, and anything slow would freeze the whole connection.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use russh::keys::PublicKey;
use russh::keys::ssh_key::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::auth::{self, AuthorizedKey, KeyOrigin, KeyStore, Refusal, Username};
use crate::forward::agent::AgentForward;
use crate::forward::{self, RemoteForwards};
use crate::login::registry::{ConnectionInfo, Registration};
use crate::login::{Context, Login};
use crate::metrics::metrics;
use crate::session::limits::{self, EnvBudget, EnvVerdict};
use crate::session::{channel, subsystem};
use crate::ssh::admission::Ticket;

/// SSH_OPEN_RESOURCE_SHORTAGE (RFC 4254): the reason code of a session past `max_sessions`.
const RESOURCE_SHORTAGE: u32 = 4;

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The SSH protocol layer failed.
    #[error(transparent)]
    Ssh(#[from] russh::Error),
}

/// One client connection.
pub struct ConnectionHandler {
    /// Shared gateway state.
    ctx: Arc<Context>,
    /// Client address.
    peer: SocketAddr,
    /// Our address, for `SSH_CONNECTION`.
    local: SocketAddr,
    /// Connection id, for logs.
    conn: u64,
    /// The login, once authenticated.
    login: Option<Arc<Login>>,
    /// Channels that already run a program: a second shell/exec on them is refused.
    started: HashSet<ChannelId>,
    /// Session channels, against `[server] max_sessions`: each channel's task holds the
    /// strong side of its token while it lives, so a channel counts until its task ends
    /// (russh does not call `channel_close` for a channel the server closed first).
    sessions: HashMap<ChannelId, Weak<()>>,
    /// The `env` each open session channel has been given, against the per-channel bounds
    /// (the channel task keeps the values and counts the same way).
    env: HashMap<ChannelId, EnvBudget>,
    /// The connection's tracing span; channel tasks run inside it.
    span: tracing::Span,
    /// The last refused `(user, reason)`, logged once when an unauthenticated connection
    /// ends (one line per failed login, as sshd does, not one per offered key).
    refused: Option<(String, auth::Refusal)>,
    /// This connection's `-R` listeners; dropped (closed) with the connection.
    remote: RemoteForwards,
    /// Whether a `-R` request past the per-connection bound was refused (and logged) yet.
    listeners_refused: bool,
    /// This connection's agent socket (`-A`), made by the first channel that asks for it.
    agent: Arc<AgentForward>,
    /// Cancelled to disconnect this connection (admin kick, key removed).
    end: CancellationToken,
    /// Cancelled when this handler is dropped, that is once the connection has ended by any
    /// means, or by the connection's task when the session does not end when told to: tasks
    /// of its channels that may wait on the client (a full window) or on a target (a full
    /// queue) end on it instead of waiting for ever.
    gone: CancellationToken,
    /// Keeps the connection in the live registry while the handler lives.
    registration: Option<Registration>,
    /// The connection's place among unauthenticated, then authenticated connections, and
    /// the back-off of its refusals.
    ticket: Ticket,
}

impl Drop for ConnectionHandler {
    fn drop(&mut self) {
        self.gone.cancel();
        self.agent.close();
        if self.login.is_none()
            && let Some((user, reason)) = self.refused.take()
        {
            let _e = self.span.enter();
            metrics().login("refused");
            info!(target: "audit", user = %user, peer = %self.peer, %reason, "login refused");
        }
    }
}

impl ConnectionHandler {
    /// A handler for a new connection.
    pub fn new(
        ctx: Arc<Context>,
        peer: SocketAddr,
        local: SocketAddr,
        conn: u64,
        span: tracing::Span,
        end: CancellationToken,
        ticket: Ticket,
    ) -> Self {
        Self {
            ctx,
            peer,
            local,
            conn,
            login: None,
            started: HashSet::new(),
            sessions: HashMap::new(),
            env: HashMap::new(),
            span,
            refused: None,
            remote: RemoteForwards::default(),
            listeners_refused: false,
            agent: Arc::default(),
            end,
            gone: CancellationToken::new(),
            registration: None,
            ticket,
        }
    }

    /// The token cancelled once this connection is over (see the field's doc); the
    /// connection's task may cancel it itself, when the session will not end.
    pub fn gone(&self) -> CancellationToken {
        self.gone.clone()
    }

    fn keys(&self) -> KeyStore {
        KeyStore::new(self.ctx.config.borrow().server.keys_dir.clone())
    }

    fn publickey_only() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    fn trusted_ca(&self) -> Option<PathBuf> {
        self.ctx.config.borrow().server.trusted_user_ca_keys.clone()
    }

    /// Keeps the reason logged when the connection ends unauthenticated: the latest, except
    /// that a plain "key not authorized" (a client trying its next key) does not hide a more
    /// telling reason (an option or a certificate that refused) for the same user.
    fn note_refusal(&mut self, user: &str, reason: Refusal) {
        let user: String = user.chars().take(64).collect();
        let keep = matches!(&self.refused, Some((u, old)) if *u == user && *old != Refusal::WrongKey)
            && reason == Refusal::WrongKey;
        if !keep {
            self.refused = Some((user, reason));
        }
    }

    /// Accepts the login `checked` allows (as `user+profile` when `profile` is given), or
    /// notes why it was refused (and waits the address's back-off).
    async fn decide(
        &mut self,
        login: &str,
        profile: Option<auth::ProfileName>,
        checked: Result<(Username, AuthorizedKey), Refusal>,
    ) -> Auth {
        let (user, key) = match checked {
            Ok(ok) => ok,
            Err(reason) => {
                debug!(conn = self.conn, user = login, peer = %self.peer, %reason, "authentication refused");
                self.note_refusal(login, reason);
                self.ticket.refused().await;
                return Self::publickey_only();
            }
        };
        if let Err(refused) = self.ticket.authenticate(&user) {
            warn!(conn = self.conn, user = %user, peer = %self.peer, "login refused: {refused}");
            return Self::publickey_only();
        }
        let (quota, denied) = crate::login::login_quota(&self.ctx, &user, profile.as_ref());
        let config = self.ctx.config.borrow().clone();
        let identity = self.ctx.identities.resolve(&user, &quota, &config).await;
        if let Err(e) = &identity {
            warn!(conn = self.conn, user = %user, "login has no identity to run as: {e}");
        }
        self.span.record("user", user.as_str());
        let _e = self.span.enter();
        metrics().login("accepted");
        let profile = profile.as_ref().map(|p| p.as_str());
        match &key.origin {
            KeyOrigin::Line(line) => {
                info!(target: "audit", user = %user, profile, peer = %self.peer, fingerprint = %key.fingerprint(), key_line = line, "login accepted")
            }
            KeyOrigin::Certificate { key_id, serial, ca } => {
                info!(target: "audit", user = %user, profile, peer = %self.peer, fingerprint = %key.fingerprint(), key_id = %key_id, serial, ca = %ca, "login accepted (certificate)")
            }
        }
        let login = Arc::new(Login {
            user,
            key,
            quota,
            denied,
            peer: self.peer,
            local: self.local,
            conn: self.conn,
            stats: Arc::default(),
            gone: self.gone.clone(),
            opening: Arc::default(),
            identity,
        });
        self.registration = Some(self.ctx.connections.register(
            ConnectionInfo {
                conn: self.conn,
                user: login.user.clone(),
                container: login.container_name(),
                peer: self.peer,
                fingerprint: login.key.fingerprint(),
                key: matches!(login.key.origin, KeyOrigin::Line(_)).then(|| login.key.key.clone()),
                since: std::time::SystemTime::now(),
                stats: login.stats.clone(),
            },
            self.end.clone(),
        ));
        self.login = Some(login);
        Auth::Accept
    }

    /// Drops what is kept about session channels whose task has ended.
    fn forget_ended_sessions(&mut self) {
        self.sessions.retain(|_, alive| alive.strong_count() > 0);
        let live = &self.sessions;
        self.started.retain(|c| live.contains_key(c));
        self.env.retain(|c, _| live.contains_key(c));
    }

    /// Marks `channel` as running a program; false if it already was.
    fn begin_program(&mut self, channel: ChannelId) -> bool {
        self.started.insert(channel)
    }
}

impl Handler for ConnectionHandler {
    type Error = HandlerError;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Self::publickey_only())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        debug!(conn = self.conn, user, peer = %self.peer, "password authentication refused: disabled");
        self.ticket.refused().await;
        Ok(Self::publickey_only())
    }

    /// A probe (or the first look at a signed request). Certificates arrive here as their bare
    /// key (russh does not say which it is), so when user CAs are trusted a key that is not
    /// in the user's file is let through to the signed request, which decides.
    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        let (account, _) = split_login(user);
        let now = SystemTime::now();
        match auth::check_key(
            &self.keys(),
            &account,
            offer.public_key,
            self.peer.ip(),
            now,
        )
        .await
        {
            Ok(_) => Ok(Auth::Accept),
            Err(_) if self.trusted_ca().is_some() => Ok(Auth::Accept),
            Err(reason) => {
                debug!(conn = self.conn, user, peer = %self.peer, %reason, "key offer refused");
                self.note_refusal(user, reason);
                self.ticket.refused().await;
                Ok(Self::publickey_only())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let public: &PublicKey = key.public_key;
        let (account, profile) = split_login(user);
        let now = SystemTime::now();
        let checked = auth::check_key(&self.keys(), &account, public, self.peer.ip(), now).await;
        Ok(self.decide(user, profile, checked).await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let (account, profile) = split_login(user);
        let config = self.ctx.config.borrow().clone();
        let checked = auth::check_certificate(
            &self.keys(),
            config.server.trusted_user_ca_keys.as_deref(),
            |name| config.configured_users().any(|u| u == name),
            &account,
            certificate,
            self.peer.ip(),
            SystemTime::now(),
        )
        .await;
        Ok(self.decide(user, profile, checked).await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(login) = self.login.clone() else {
            return Ok(()); // dropping `reply` refuses the channel
        };
        self.forget_ended_sessions();
        let max = self.ctx.config.borrow().server.max_sessions;
        if self.sessions.len() >= max {
            let reason = format!(
                "{} session channels are open on this connection (max_sessions)",
                self.sessions.len()
            );
            let _e = self.span.enter();
            info!(user = %login.user, "session refused: {reason}");
            reply
                .reject(ChannelOpenFailure::Other {
                    code: RESOURCE_SHORTAGE,
                    reason,
                })
                .await;
            return Ok(());
        }
        let alive = Arc::new(());
        self.sessions.insert(channel.id(), Arc::downgrade(&alive));
        reply.accept().await;
        tokio::spawn(
            channel::run(
                channel,
                login,
                self.ctx.clone(),
                session.handle(),
                self.agent.clone(),
                alive,
            )
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(login) = self.login.clone() else {
            return Ok(());
        };
        // Connecting may mean starting the container: answer from a task.
        tokio::spawn(
            forward::direct_tcpip(
                self.ctx.clone(),
                login,
                channel,
                reply,
                host_to_connect.to_owned(),
                port_to_connect,
            )
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(login) = self.login.clone() else {
            return Ok(());
        };
        tokio::spawn(
            forward::direct_streamlocal(
                self.ctx.clone(),
                login,
                channel,
                reply,
                socket_path.to_owned(),
            )
            .instrument(self.span.clone()),
        );
        Ok(())
    }

    /// `-R`. The reply must carry the bound port, so this one waits for the container to be
    /// running (only this connection waits; a client sends it before opening a shell).
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(login) = self.login.clone() else {
            return Ok(false);
        };
        let ctx = self.ctx.clone();
        match self
            .remote
            .listen(&ctx, &login, session.handle(), address, *port)
            .instrument(self.span.clone())
            .await
        {
            Ok(bound) => {
                *port = bound;
                Ok(true)
            }
            Err(e) => {
                // Past the bound, only the connection's first refusal is logged.
                let over = matches!(
                    e,
                    forward::ForwardError::Denied(crate::config::policy::Denied::TooManyListeners(
                        _
                    ))
                );
                if !(over && std::mem::replace(&mut self.listeners_refused, true)) {
                    let _e = self.span.enter();
                    info!(target: "audit", user = %login.user, address, port = *port, error = %e, "remote forward refused");
                }
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.remote.cancel(address, port))
    }

    /// `-A`. The channel task makes the socket when its program starts; refused under the
    /// key's `no-agent-forwarding` (or `restrict`).
    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self
            .login
            .as_ref()
            .is_some_and(|l| l.key.options().agent_forwarding))
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Under `no-pty` (or `restrict`) the request fails and the session runs without a
        // terminal, as with sshd; the channel task ignores the request too.
        let allowed = self.login.as_ref().is_some_and(|l| l.key.options().pty);
        if self.started.contains(&channel) || !allowed {
            session.channel_failure(channel)?;
        } else {
            session.channel_success(channel)?;
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let mut accepted = self
            .login
            .as_ref()
            .is_some_and(|l| l.quota.accepts_env(name))
            && !self.started.contains(&channel);
        if accepted {
            match self.env.entry(channel).or_default().admit(name, value) {
                EnvVerdict::Accept => {}
                EnvVerdict::Refuse { first } => {
                    accepted = false;
                    if first {
                        let _e = self.span.enter();
                        warn!(
                            channel = %channel,
                            "env requests past {} variables or {} bytes on one channel: refused (logged once per channel)",
                            limits::MAX_ENV_VARS,
                            limits::MAX_ENV_BYTES
                        );
                    }
                }
            }
        }
        if accepted {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.begin_program(channel) {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.shell_request(channel, session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The channel task runs it; only the names it serves are accepted.
        if subsystem::is_supported(name) && self.begin_program(channel) {
            session.channel_success(channel)?;
        } else {
            debug!(name, "subsystem refused");
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        _channel: ChannelId,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // No reply: window-change never wants one. The channel task applies it.
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.started.remove(&channel);
        self.sessions.remove(&channel);
        self.env.remove(&channel);
        Ok(())
    }
}

/// `alice+gpu` → (`alice`, `gpu`): the key file is the user's. A malformed `+` form stays
/// whole, so it fails the user name rule like any invalid name.
fn split_login(login: &str) -> (String, Option<auth::ProfileName>) {
    match auth::LoginName::parse(login) {
        Ok(l) => (l.user.to_string(), l.profile),
        Err(_) => (login.to_owned(), None),
    }
}
