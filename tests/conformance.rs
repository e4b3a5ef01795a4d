//! The backend conformance suite (#16): one list of what every container backend must do for
//! its users, each behaviour written once as a function of the way in ([`Way`]) and run on
//! every way local Docker has (the macro at the bottom makes `namespace::NAME` and
//! `relay::NAME` of each). A new backend, or a new way into containers, adds a variant to
//! [`Way`] and a line to the macro, and passes the whole list.
//!
//! The list (each checked as a user sees it, with the real OpenSSH client):
//!
//! - sessions ([`sessions`]): concurrent first logins make exactly one container; stdout and
//!   stderr stay apart without a terminal; exit status, death by a signal, and a `signal`
//!   request coming back as `exit-signal`; stdin reaches the command and its EOF ends it; a
//!   terminal has the client's size and follows resizes; a vanished client hangs up its
//!   processes, with or without a terminal; `labgate status` lists the container and its
//!   connection, `labgate stop` stops it and the next login starts it again; the home
//!   survives a recreate.
//! - forwards ([`forwards`]): `-L` to a TCP service on the container's loopback, `-L` to a
//!   unix socket in the container, `-D` (SOCKS) resolving names inside the container, `-R`
//!   listening inside the container and reaching back to the client, agent forwarding
//!   (`ssh -A`, `ssh-add -l` inside).
//!
//! Each test also asserts, from the gateway's log, that it went the way it names, so passing
//! on both ways means both were exercised.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

#[path = "conformance/forwards.rs"]
mod forwards;
#[path = "conformance/sessions.rs"]
mod sessions;

use common::{Gateway, GatewayBuilder};

/// A way into local Docker containers (`[docker] forward_via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// The default (`auto`): as root in the host PID namespace, the gateway enters the
    /// containers' namespaces, and commands without a terminal take the direct path.
    Namespace,
    /// `exec`: everything through `labgate-relay` execs and the engine's exec stream, the
    /// way a remote engine's containers would be reached.
    Relay,
}

impl Way {
    /// A gateway builder set to this way, the static relay installed as deployed.
    pub fn builder(self) -> GatewayBuilder {
        Gateway::builder().docker(match self {
            Way::Namespace => "forward_via = \"auto\"\n",
            Way::Relay => "forward_via = \"exec\"\n",
        })
    }

    /// A gateway of this way with `users` users and nothing else configured.
    pub fn gateway(self, users: usize) -> Gateway {
        self.builder().users(users).start()
    }

    /// Asserts `gw` was started on this way (its log names the `forward_via` it read), for
    /// behaviours that are the same on every way of one backend (terminals: always the
    /// engine's).
    pub fn assert_set(self, gw: &Gateway) {
        let log = gw.log();
        let line = match self {
            Way::Namespace => "forwards: entering containers' namespaces when possible",
            Way::Relay => "forwards: path fixed by [docker] forward_via",
        };
        assert!(
            log.contains(line),
            "not started on the {self:?} way:\n{log}"
        );
    }

    /// Asserts the commands `gw` ran without a terminal went this way: the direct path
    /// (a socket as stdin/stdout) on the namespace way, the exec stream on the relay way.
    pub fn assert_commands_went_this_way(self, gw: &Gateway) {
        let log = gw.log();
        let direct = log.contains("on the direct path");
        match self {
            Way::Namespace => assert!(direct, "no command took the direct path:\n{log}"),
            Way::Relay => assert!(!direct, "a command took the direct path:\n{log}"),
        }
    }

    /// Asserts the forwards `gw` made went this way: into the container's namespaces, or
    /// through relay execs only.
    pub fn assert_forwards_went_this_way(self, gw: &Gateway) {
        let log = gw.log();
        let entered = log.contains("forwards enter containers' network namespaces");
        match self {
            Way::Namespace => assert!(entered, "forwards did not enter namespaces:\n{log}"),
            Way::Relay => {
                assert!(
                    log.contains("forwards: path fixed by [docker] forward_via") && !entered,
                    "forwards did not go through the relay only:\n{log}"
                )
            }
        }
    }
}

/// `conformance!(module::behaviour, ...)`: a `#[test]` of each behaviour on each way.
macro_rules! conformance {
    ($($module:ident :: $name:ident),* $(,)?) => {
        /// The default way: the containers' namespaces, entered from the host.
        mod namespace {
            $(
                #[test]
                fn $name() {
                    super::$module::$name(super::Way::Namespace);
                }
            )*
        }

        /// Relay only: `labgate-relay` execs and the engine's exec stream.
        mod relay {
            $(
                #[test]
                fn $name() {
                    super::$module::$name(super::Way::Relay);
                }
            )*
        }
    };
}

conformance!(
    sessions::concurrent_first_logins_make_exactly_one_container,
    sessions::stdout_and_stderr_stay_apart_without_a_terminal,
    sessions::exit_status_and_death_by_a_signal_come_back,
    sessions::a_signal_request_comes_back_as_exit_signal,
    sessions::stdin_reaches_the_command_and_its_eof_ends_it,
    sessions::a_terminal_has_the_clients_size_and_follows_resizes,
    sessions::a_vanished_client_hangs_up_its_command,
    sessions::a_vanished_client_hangs_up_its_terminal,
    sessions::status_lists_the_container_and_stop_stops_it,
    sessions::the_home_survives_a_recreate,
    forwards::local_forward_reaches_a_service_on_the_containers_loopback,
    forwards::local_forward_reaches_a_unix_socket_in_the_container,
    forwards::socks_resolves_names_inside_the_container,
    forwards::remote_forward_listens_inside_the_container_and_reaches_back,
    forwards::agent_forwarding_lists_the_clients_keys_inside,
);
