//! The admin commands, one module each. A module owns its whole round trip: the route on the
//! admin socket, the handler the gateway runs for it, the typed answer (serde, the socket's
//! JSON) and the text the CLI prints from it. The socket server ([`super`]) only dispatches
//! on their routes; `main.rs` only maps arguments onto their `call`s.
//!
//! | command                | module      | route                    |
//! |------------------------|-------------|--------------------------|
//! | `labgate status`       | [`status`]  | `GET /status`            |
//! | `labgate gpus`         | [`gpus`]    | `GET /gpus`              |
//! | `labgate kick USER`    | [`kick`]    | `POST /users/NAME/kick`  |
//! | `labgate stop USER`    | [`stop`]    | `POST /users/NAME/stop`  |
//! | `labgate usage`        | [`usage`]   | none: reads `state_dir`'s accounting database |

pub mod gpus;
pub mod kick;
pub mod status;
pub mod stop;
pub mod usage;

/// The route of a per-user action: `POST /users/NAME/ACTION`.
fn user_path(user: &str, action: &str) -> String {
    format!("{}{user}/{action}", super::USERS_PREFIX)
}
