//! The backend conformance suite (#16, #17): one list of what every container backend must do
//! for its users, each behaviour written once as a function of the way in ([`Way`]) and run
//! on every way: the two ways of local Docker and the swarm backend (the macro at the bottom
//! makes `namespace::NAME`, `relay::NAME` and `swarm::NAME` of each). A new backend, or a new
//! way into containers, adds a variant to [`Way`] and a module to the macro, and passes the
//! whole list.
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
//! What a behaviour checks beyond the user's view (how many containers, whether a process
//! still runs, a container's id or `/dev/shm`, that it stopped) is asked through [`Way`] of
//! the engine that knows it (`way`): the machine's Docker and host PIDs for local Docker; for
//! the swarm, the manager (services, tasks, replicas) and the node running the task (its
//! container, `docker top`). Where a cluster means something else by a behaviour, the
//! swarm's meaning is asserted and said: `labgate stop` scales the service to 0 and Swarm
//! removes the container; a changed setting reaches the service when it is next scaled up.
//!
//! Each test also asserts, from the gateway's log, that it went the way it names, so passing
//! on every way means every way was exercised. (On the swarm the log proves only a negative
//! for forwards: no namespace entered, no direct path; the relay exec logs no line.)
//!
//! The swarm tests share one three-node rig (`common::swarm`, torn down when the process
//! ends), run one at a time, and each removes its services, even when it fails; without
//! root or `dockerd` they are skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

#[path = "conformance/forwards.rs"]
mod forwards;
#[path = "conformance/sessions.rs"]
mod sessions;
#[path = "conformance/way.rs"]
mod way;

use common::Gateway;
pub use way::Way;

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

        /// The swarm backend on the rig's three nodes, one test at a time (they share the
        /// rig); skipped where the rig cannot run (no root, no `dockerd`...).
        mod swarm {
            $(
                #[test]
                fn $name() {
                    let _serial = super::way::one_at_a_time();
                    if super::way::shared_rig().is_none() {
                        return;
                    }
                    super::$module::$name(super::Way::Swarm);
                    super::way::assert_no_services_left();
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
