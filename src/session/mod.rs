//! Per-connection state after login, and the bridge of each session channel to a process in
//! the user's container.
//!
//! A [`Login`] is the snapshot taken when a user authenticates: who, with which key, from
//! where, under which quota. Every session channel is served by one task
//! ([`channel::run`]) that owns the russh `Channel` (its only reader, so the connection never
//! stalls on an unread queue), collects pty/env requests, starts the shell or command through
//! the [`ContainerRuntime`], and carries bytes, resizes, signals, EOF and the exit status.

pub mod channel;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::{AuthorizedKey, Username};
use crate::config::{Config, Quota};
use crate::runtime::ContainerRuntime;

/// What every connection shares: the current config and the container backend.
pub struct Context {
    /// The config in force; a login snapshots it.
    pub config: watch::Receiver<Arc<Config>>,
    /// The container backend.
    pub runtime: Arc<dyn ContainerRuntime>,
}

/// An authenticated user on one connection.
#[derive(Debug, Clone)]
pub struct Login {
    /// The user.
    pub user: Username,
    /// The key they proved, with its options.
    pub key: AuthorizedKey,
    /// Quota snapshot taken at login.
    pub quota: Arc<Quota>,
    /// Client address.
    pub peer: SocketAddr,
    /// Gateway address the client connected to.
    pub local: SocketAddr,
    /// Connection id, for logs.
    pub conn: u64,
}
