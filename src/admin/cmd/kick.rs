//! `labgate kick USER` (`POST /users/NAME/kick`): ends the user's connections; their
//! containers keep running.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::admin::client::{self, ClientError};
use crate::auth::Username;
use crate::login::Context;

/// The action's name in its route, `/users/NAME/kick`.
pub(crate) const ACTION: &str = "kick";

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kicked {
    /// Connections asked to end.
    pub kicked: usize,
}

/// The handler: asks every connection of `user` to end (audited).
pub(crate) fn kick(ctx: &Context, user: &Username) -> Kicked {
    let kicked = ctx.connections.kick(user);
    info!(target: "audit", user = %user, connections = kicked, "admin kick");
    Kicked { kicked }
}

/// The line `labgate kick` prints.
pub fn render(user: &str, answer: &Kicked) -> String {
    format!("{user}: {} connection(s) ended\n", answer.kicked)
}

/// The CLI side: asks the gateway at `socket` to kick `user`; returns what to print.
pub async fn call(socket: &Path, user: &str) -> Result<String, ClientError> {
    let path = super::user_path(user, ACTION);
    let body = client::request(socket, hyper::Method::POST, &path).await?;
    Ok(render(user, &client::parse(ACTION, &body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_answer_and_line() {
        assert_eq!(
            super::super::user_path("alice", ACTION),
            "/users/alice/kick"
        );
        let answer: Kicked = serde_json::from_str("{\"kicked\":2}\n").unwrap();
        assert_eq!(render("alice", &answer), "alice: 2 connection(s) ended\n");
    }
}
