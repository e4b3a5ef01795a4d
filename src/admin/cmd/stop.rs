//! `labgate stop USER` (`POST /users/NAME/stop`): ends the user's connections, then stops
//! their running containers (kept, with their homes: the next login starts them again).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::admin::client::{self, ClientError};
use crate::auth::Username;
use crate::login::Context;
use crate::runtime::RuntimeError;

/// The action's name in its route, `/users/NAME/stop`.
pub(crate) const ACTION: &str = "stop";

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    /// Connections asked to end.
    pub kicked: usize,
    /// Names of the containers stopped.
    pub stopped: Vec<String>,
}

/// The handler: kicks `user`, then stops their running containers (audited).
pub(crate) async fn stop(ctx: &Context, user: &Username) -> Result<Stopped, RuntimeError> {
    let kicked = ctx.connections.kick(user);
    let stopped = stop_containers(ctx, user).await?;
    info!(target: "audit", user = %user, connections = kicked, containers = ?stopped, "admin stop");
    Ok(Stopped { kicked, stopped })
}

/// Stops every running container of `user` (their connections were asked to end first);
/// returns the names of those stopped.
pub(crate) async fn stop_containers(
    ctx: &Context,
    user: &Username,
) -> Result<Vec<String>, RuntimeError> {
    let mut stopped = Vec::new();
    for c in ctx.runtime.list_managed().await? {
        let Some((owner, _)) = c.owner() else {
            continue;
        };
        if &owner != user || !c.state.is_running() {
            continue;
        }
        if ctx.runtime.stop(&c, Box::new(|| true)).await? {
            ctx.gpu_line.freed();
            stopped.push(c.name);
        }
    }
    Ok(stopped)
}

/// The line `labgate stop` prints.
pub fn render(user: &str, answer: &Stopped) -> String {
    let stopped = if answer.stopped.is_empty() {
        "nothing was running".to_owned()
    } else {
        answer.stopped.join(", ")
    };
    format!(
        "{user}: {} connection(s) ended, stopped: {stopped}\n",
        answer.kicked
    )
}

/// The CLI side: asks the gateway at `socket` to stop `user`; returns what to print.
pub async fn call(socket: &Path, user: &str) -> Result<String, ClientError> {
    let path = super::user_path(user, ACTION);
    let body = client::request(socket, hyper::Method::POST, &path).await?;
    Ok(render(user, &client::parse(ACTION, &body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::ensure_container;
    use crate::login::testing::{config, context, login, user};

    #[test]
    fn route_answer_and_line() {
        assert_eq!(super::super::user_path("bob", ACTION), "/users/bob/stop");
        let answer: Stopped = serde_json::from_str(
            "{\"kicked\":1,\"stopped\":[\"labgate-bob\",\"labgate-bob.gpu\"]}\n",
        )
        .unwrap();
        assert_eq!(
            render("bob", &answer),
            "bob: 1 connection(s) ended, stopped: labgate-bob, labgate-bob.gpu\n"
        );
        let none = Stopped {
            kicked: 0,
            stopped: vec![],
        };
        assert_eq!(
            render("bob", &none),
            "bob: 0 connection(s) ended, stopped: nothing was running\n"
        );
    }

    #[tokio::test]
    async fn the_admins_stop_stops_every_running_container_of_that_user_only() {
        let (ctx, fake) = context(config(
            "\n[profiles.big]\nimage = \"lab/big:2\"\nusers = [\"alice\"]\n",
        ));
        for (name, profile) in [("alice", None), ("alice", Some("big")), ("bob", None)] {
            ensure_container(&ctx, &login(&ctx, name, profile))
                .await
                .unwrap();
        }
        let mut stopped = stop_containers(&ctx, &user("alice")).await.unwrap();
        stopped.sort();
        assert_eq!(stopped, vec!["labgate-alice", "labgate-alice.big"]);
        assert!(fake.running("labgate-bob"));
        assert!(
            stop_containers(&ctx, &user("alice"))
                .await
                .unwrap()
                .is_empty(),
            "nothing left running"
        );
    }
}
