//! labgate: an SSH gateway that gives every member of a GPU lab their own container behind one
//! SSH address.
//!
//! `ssh alice@lab` authenticates alice by public key, starts or resumes her container (created
//! on first login from the image and quota the admin configured), and bridges the session to a
//! process in it through the Docker Engine API.
//!
//! # Layout
//!
//! - [`config`]: the admin's TOML file: parsing, validation with `file:line:column` errors,
//!   per-user quota resolution, pull policies, registry credentials, profiles.
//! - [`auth`]: user names, key files (`keys/NAME.pub`), key options, trusted user CAs, the
//!   key and certificate checks, `user+profile` logins.
//! - [`ssh`]: host key, russh server settings, accept loop, and the russh `Handler` that only
//!   translates protocol events.
//! - [`login`]: who is logged in (`Login`), what all connections share (`Context`), the one
//!   way a login gets its container, the GPU queue, and GPU reclaim carried out.
//! - [`session`]: the task that bridges one session channel to a process, the text a user
//!   reads from labgate, idle stop.
//! - [`forward`]: port, unix-socket and agent forwarding into the user's container.
//! - [`runtime`]: the container backend seam ([`runtime::ContainerRuntime`], the way in
//!   [`runtime::reach::Reach`]) and its Docker implementation (with shared image pulls, and
//!   the host's GPU pool).
//! - [`gpu`]: the GPU inventory (NVML), the allocator (exclusive or shared, by UUID, never
//!   oversubscribed), and the pure decisions of the GPU queue and of reclaiming idle GPUs.
//! - [`admin`]: the admin socket (`labgate status | stop | kick | gpus`, one module each in
//!   [`admin::cmd`]), `/metrics` and `/healthz`, the read-only lab page
//!   ([`admin::dashboard`]: `/`, `/api/lab`), the audit log.
//! - [`metrics`]: the process-wide Prometheus metrics; [`codes`]: the stable error codes.
//! - [`check`]: `labgate check`, the config and key files validated like `sshd -t`.
//! - [`demo`]: the embedded demo setup (locally built busybox image, demo user and key).
//! - [`node_agent`]: `labgate node-agent`, which a cluster's nodes run so forwards enter
//!   their containers directly (a TLS request per forward, then raw bytes).
//! - [`app`]: the composition root: wires config, backend and server, runs until a signal.
//!
//! See ARCHITECTURE.md for the flow and the invariants.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounting;
pub mod admin;
pub mod app;
pub mod auth;
pub mod check;
pub mod codes;
pub mod config;
pub mod demo;
pub mod forward;
pub mod gpu;
pub mod login;
pub mod metrics;
pub mod node_agent;
pub mod runtime;
pub mod session;
pub mod ssh;
