//! The bridge of each session channel to a process in the user's container, and idle stop.
//!
//! Every session channel (of a [`crate::login::Login`]) is served by one task
//! ([`channel::run`]) that owns the russh `Channel` (its only reader, so the connection never
//! stalls on an unread queue), collects pty/env requests, starts the shell or command through
//! the [`crate::runtime::ContainerRuntime`], and carries bytes, resizes, signals, EOF and the exit status.

pub mod channel;
pub mod idle;
pub mod limits;
pub mod progress;
pub mod subsystem;
pub mod text;

#[cfg(test)]
mod tests;
