//! `labgate status [--json]` (`GET /status`): the gateway's containers (state, image, GPUs,
//! idle timers) and connections, gathered from its live state (connections, idle timers, GPU
//! holdings) and the engine (containers); the answer ([`Status`]) and the tables printed
//! from it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::admin::client::{self, ClientError};
use crate::login::Context;
use crate::runtime::RuntimeError;

/// The route on the admin socket.
pub(crate) const PATH: &str = "/status";

/// The gateway's state, as served at `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Every container labgate manages.
    pub containers: Vec<ContainerStatus>,
    /// Every authenticated connection.
    pub connections: Vec<ConnectionStatus>,
    /// Logins waiting for GPUs, in the order they are served (absent from older gateways).
    #[serde(default)]
    pub queue: Vec<QueueStatus>,
    /// Containers warned that their idle GPUs are about to be reclaimed (absent from older
    /// gateways).
    #[serde(default)]
    pub reclaims: Vec<ReclaimStatus>,
}

/// A standing reclaim warning: the container is stopped at its deadline unless its GPUs
/// are used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReclaimStatus {
    /// Container name.
    pub container: String,
    /// Seconds its GPUs have been idle.
    pub idle_secs: u64,
    /// Seconds until it is stopped (0: due now).
    pub stops_in_secs: u64,
}

/// One place in the GPU queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueStatus {
    /// 1: served next.
    pub position: usize,
    /// The user (or `user+profile`).
    pub user: String,
    /// GPUs it waits for.
    pub gpus: usize,
    /// Seconds it has waited.
    pub waited_secs: u64,
    /// Its logins waiting (VS Code opens several).
    pub logins: usize,
}

/// One managed container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerStatus {
    /// Container name.
    pub name: String,
    /// Its user.
    pub user: String,
    /// Engine state (`running`, `exited`...).
    pub state: String,
    /// Image it was created from.
    pub image: String,
    /// GPUs it holds (UUIDs).
    pub gpus: Vec<String>,
    /// The node it runs on, on a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Connections working in it now.
    pub connections: usize,
    /// The user's `idle_stop`, in seconds (`None`: never stopped).
    pub idle_stop_secs: Option<u64>,
    /// Seconds it has been idle, when it is running and unused.
    pub idle_secs: Option<u64>,
}

/// One authenticated connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionStatus {
    /// Connection id (as in the logs).
    pub conn: u64,
    /// User.
    pub user: String,
    /// Container it works in.
    pub container: String,
    /// Client address.
    pub peer: String,
    /// Key fingerprint it logged in with.
    pub fingerprint: String,
    /// When it logged in (RFC 3339).
    pub since: String,
    /// Sessions (shells, commands, sftp) open now.
    pub sessions: usize,
    /// Forwards open now.
    pub forwards: usize,
}

/// The handler: gathers the status (needs the engine for the container list).
pub(crate) async fn collect(ctx: &Context) -> Result<Status, RuntimeError> {
    let managed = ctx.runtime.list_managed().await?;
    let connections = ctx.connections.list();
    let config = ctx.config.borrow().clone();
    let now = SystemTime::now();
    let mut containers: Vec<ContainerStatus> = managed
        .into_iter()
        .map(|c| {
            let idle_stop = c
                .owner()
                .and_then(|(user, _)| c.quota(&config, &user).idle_stop);
            ContainerStatus {
                connections: connections.iter().filter(|k| k.container == c.name).count(),
                idle_secs: ctx
                    .idle
                    .idle_since(&c.name)
                    .filter(|_| c.state.is_running())
                    .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                idle_stop_secs: idle_stop.map(|d| d.as_secs()),
                gpus: c.gpus.iter().map(ToString::to_string).collect(),
                node: c.node,
                name: c.name,
                user: c.user,
                state: c.state.to_string(),
                image: c.image,
            }
        })
        .collect();
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    let queue = ctx
        .gpu_line
        .line()
        .into_iter()
        .enumerate()
        .map(|(i, p)| QueueStatus {
            position: i + 1,
            user: p.holder.to_string(),
            gpus: p.wants,
            waited_secs: now.duration_since(p.since).unwrap_or_default().as_secs(),
            logins: p.logins,
        })
        .collect();
    let reclaims = ctx
        .notices
        .warnings()
        .into_iter()
        .map(|(container, idle_since, deadline)| ReclaimStatus {
            container,
            idle_secs: now.duration_since(idle_since).unwrap_or_default().as_secs(),
            stops_in_secs: deadline.duration_since(now).unwrap_or_default().as_secs(),
        })
        .collect();
    Ok(Status {
        queue,
        reclaims,
        containers,
        connections: connections
            .into_iter()
            .map(|c| ConnectionStatus {
                conn: c.conn,
                user: c.user.to_string(),
                container: c.container,
                peer: c.peer.to_string(),
                fingerprint: c.fingerprint,
                since: humantime::format_rfc3339_seconds(c.since).to_string(),
                sessions: c.stats.sessions(),
                forwards: c.stats.forwards(),
            })
            .collect(),
    })
}

/// `1h2m`-style rendering of whole seconds.
fn human(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The text `labgate status` prints.
pub fn render(status: &Status) -> String {
    let mut rows = vec![
        [
            "CONTAINER",
            "USER",
            "STATE",
            "IMAGE",
            "GPUS",
            "CONNS",
            "IDLE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    // A cluster's containers say where they run.
    let nodes = status.containers.iter().any(|c| c.node.is_some());
    if nodes {
        rows[0].insert(3, "NODE".to_owned());
    }
    for c in &status.containers {
        let idle = match (c.idle_stop_secs, c.idle_secs) {
            (None, _) => "never stopped".to_owned(),
            (Some(limit), Some(idle)) => format!(
                "idle {}, stops in {}",
                human(idle),
                human(limit.saturating_sub(idle))
            ),
            (Some(limit), None) if c.state == "running" => {
                format!("in use (stops after {} idle)", human(limit))
            }
            (Some(_), None) => "-".to_owned(),
        };
        let mut row = vec![
            c.name.clone(),
            c.user.clone(),
            c.state.clone(),
            c.image.clone(),
            if c.gpus.is_empty() {
                "-".to_owned()
            } else {
                c.gpus.join(",")
            },
            c.connections.to_string(),
            idle,
        ];
        if nodes {
            row.insert(3, c.node.clone().unwrap_or_else(|| "-".to_owned()));
        }
        rows.push(row);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![
        [
            "CONN",
            "USER",
            "CONTAINER",
            "PEER",
            "SINCE",
            "SESSIONS",
            "FORWARDS",
            "KEY",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in &status.connections {
        rows.push(vec![
            c.conn.to_string(),
            c.user.clone(),
            c.container.clone(),
            c.peer.clone(),
            c.since.clone(),
            c.sessions.to_string(),
            c.forwards.to_string(),
            c.fingerprint.clone(),
        ]);
    }
    out.push_str(&table(&rows));
    if !status.queue.is_empty() {
        let mut rows = vec![
            ["WAITING", "USER", "GPUS", "WAITED", "LOGINS"]
                .map(String::from)
                .to_vec(),
        ];
        for q in &status.queue {
            rows.push(vec![
                q.position.to_string(),
                q.user.clone(),
                q.gpus.to_string(),
                human(q.waited_secs),
                q.logins.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    if !status.reclaims.is_empty() {
        let mut rows = vec![
            ["RECLAIMING", "GPUS IDLE", "STOPPED IN"]
                .map(String::from)
                .to_vec(),
        ];
        for r in &status.reclaims {
            rows.push(vec![
                r.container.clone(),
                human(r.idle_secs),
                human(r.stops_in_secs),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

/// The CLI side: asks the gateway at `socket` and returns what `labgate status` prints: the
/// gateway's JSON as it came (`json`), else the tables.
pub async fn call(socket: &Path, json: bool) -> Result<String, ClientError> {
    let body = client::request(socket, hyper::Method::GET, PATH).await?;
    if json {
        return Ok(body);
    }
    let status: Status = client::parse("status", &body)?;
    Ok(render(&status))
}

/// Left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let mut widths = vec![0usize; cols];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_idle_timers_and_connections() {
        let status = Status {
            containers: vec![
                ContainerStatus {
                    name: "labgate-alice".into(),
                    user: "alice".into(),
                    state: "running".into(),
                    image: "lab/cuda:12".into(),
                    gpus: vec!["GPU-1".into()],
                    node: None,
                    connections: 0,
                    idle_stop_secs: Some(7200),
                    idle_secs: Some(600),
                },
                ContainerStatus {
                    name: "labgate-bob".into(),
                    user: "bob".into(),
                    state: "exited".into(),
                    image: "lab/cuda:12".into(),
                    gpus: vec![],
                    node: None,
                    connections: 0,
                    idle_stop_secs: None,
                    idle_secs: None,
                },
            ],
            connections: vec![ConnectionStatus {
                conn: 3,
                user: "alice".into(),
                container: "labgate-alice".into(),
                peer: "10.0.0.7:50000".into(),
                fingerprint: "SHA256:abc".into(),
                since: "2026-11-23T10:00:00Z".into(),
                sessions: 1,
                forwards: 2,
            }],
            queue: vec![],
            reclaims: vec![],
        };
        let text = render(&status);
        assert!(!text.contains("RECLAIMING"), "{text}");
        assert!(
            !text.contains("WAITING"),
            "no queue table when nobody waits: {text}"
        );
        assert!(text.contains("idle 10m, stops in 1h 50m"), "{text}");
        assert!(text.contains("never stopped"), "{text}");
        let conn_line = text.lines().find(|l| l.starts_with("3 ")).unwrap();
        assert!(conn_line.contains("10.0.0.7:50000"), "{conn_line}");
        assert!(conn_line.contains("SHA256:abc"), "{conn_line}");
        assert!(!text.contains("NODE"), "one host: no node column: {text}");
        let mut on_cluster = status.clone();
        on_cluster.containers[0].node = Some("gpu2".into());
        let text = render(&on_cluster);
        let header = text.lines().next().unwrap();
        assert!(header.contains("NODE"), "{text}");
        let alice = text
            .lines()
            .find(|l| l.starts_with("labgate-alice"))
            .unwrap();
        assert!(alice.contains("gpu2"), "{text}");
    }

    #[test]
    fn the_queue_is_listed_in_order_and_older_answers_still_parse() {
        let status = Status {
            containers: vec![],
            connections: vec![],
            queue: vec![
                QueueStatus {
                    position: 1,
                    user: "bob".into(),
                    gpus: 1,
                    waited_secs: 90,
                    logins: 2,
                },
                QueueStatus {
                    position: 2,
                    user: "carol+big".into(),
                    gpus: 2,
                    waited_secs: 30,
                    logins: 1,
                },
            ],
            reclaims: vec![ReclaimStatus {
                container: "labgate-dave".into(),
                idle_secs: 7500,
                stops_in_secs: 600,
            }],
        };
        let text = render(&status);
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("WAITING"))
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("1        bob"), "{text}");
        assert!(lines[1].contains("1m 30s"), "{text}");
        assert!(lines[2].starts_with("2        carol+big  2"), "{text}");
        let reclaim = text
            .lines()
            .find(|l| l.starts_with("labgate-dave"))
            .unwrap();
        assert!(
            reclaim.contains("2h 5m") && reclaim.ends_with("10m"),
            "{text}"
        );
        let old: Status = serde_json::from_str("{\"containers\":[],\"connections\":[]}").unwrap();
        assert!(old.queue.is_empty() && old.reclaims.is_empty());
    }
}
