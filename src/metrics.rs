//! The gateway's Prometheus metrics: one process-wide set, updated where things happen
//! (logins in the SSH handler, sessions in the channel task, forwards in the pump, container
//! starts in the Docker backend, reloads in the watcher) and rendered by `/metrics`.
//!
//! Gauges of live things (connections, sessions, forwards) move through RAII guards, so a
//! task that ends by any path — error, abort, panic — gives its count back.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label with a fixed set of values (`result="accepted"`).
type Label = [(&'static str, &'static str); 1];

/// The gauges of a cluster's nodes, labelled `node`.
#[derive(Default)]
struct NodeGauges {
    up: Family<Vec<(&'static str, String)>, Gauge>,
    gpus: Family<Vec<(&'static str, String)>, Gauge>,
    gpus_held: Family<Vec<(&'static str, String)>, Gauge>,
    containers: Family<Vec<(&'static str, String)>, Gauge>,
}

/// Every metric labgate exports.
pub struct Metrics {
    registry: Registry,
    logins: Family<Label, Counter>,
    connections: Gauge,
    sessions: Gauge,
    forwards: Gauge,
    forwarded_bytes: Family<Label, Counter>,
    container_create: Histogram,
    container_start: Histogram,
    gpus_allocated: Gauge,
    gpus_total: Gauge,
    node: NodeGauges,
    reloads: Family<Label, Counter>,
    user_errors: Family<Label, Counter>,
    gpu_queue: Gauge,
    gpu_wait: Histogram,
    gpu_seconds: Family<Vec<(&'static str, String)>, Counter<f64, std::sync::atomic::AtomicU64>>,
    idle_stops: Counter,
    gpu_reclaims: Counter,
    unauthenticated: Gauge,
    startups_closed: Counter,
    auth_backoffs: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Container operations take from tens of milliseconds (start) to minutes (a first pull).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.025, 2.0, 14)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("labgate");
        let m = Metrics {
            logins: Family::default(),
            connections: Gauge::default(),
            sessions: Gauge::default(),
            forwards: Gauge::default(),
            forwarded_bytes: Family::default(),
            container_create: Histogram::new(latency_buckets()),
            container_start: Histogram::new(latency_buckets()),
            gpus_allocated: Gauge::default(),
            gpus_total: Gauge::default(),
            node: NodeGauges::default(),
            reloads: Family::default(),
            user_errors: Family::default(),
            gpu_queue: Gauge::default(),
            gpu_wait: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            gpu_seconds: Family::default(),
            idle_stops: Counter::default(),
            gpu_reclaims: Counter::default(),
            unauthenticated: Gauge::default(),
            startups_closed: Counter::default(),
            auth_backoffs: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "logins",
            "Authentication results (accepted, refused)",
            m.logins.clone(),
        );
        registry.register(
            "connections",
            "Authenticated SSH connections open now",
            m.connections.clone(),
        );
        registry.register(
            "sessions",
            "Session channels running a shell, command or subsystem now",
            m.sessions.clone(),
        );
        registry.register(
            "forwards",
            "Port and socket forwards open now (-L, -D, -R, streamlocal)",
            m.forwards.clone(),
        );
        registry.register(
            "forwarded_bytes",
            "Bytes carried by forwards, by direction (to_target, to_client)",
            m.forwarded_bytes.clone(),
        );
        registry.register(
            "container_create_seconds",
            "Time to create and start a user's container that did not exist",
            m.container_create.clone(),
        );
        registry.register(
            "container_start_seconds",
            "Time to start a user's existing, stopped container",
            m.container_start.clone(),
        );
        registry.register(
            "gpus_allocated",
            "GPUs held by running containers",
            m.gpus_allocated.clone(),
        );
        registry.register(
            "gpus",
            "GPUs NVML reports on this host",
            m.gpus_total.clone(),
        );
        registry.register(
            "node_up",
            "Whether each cluster node is up (1) or not (0), as its engine sees it",
            m.node.up.clone(),
        );
        registry.register(
            "node_gpus",
            "GPUs each cluster node announces",
            m.node.gpus.clone(),
        );
        registry.register(
            "node_gpus_allocated",
            "GPUs of each cluster node held by labgate's containers",
            m.node.gpus_held.clone(),
        );
        registry.register(
            "node_containers",
            "labgate's containers running on each cluster node",
            m.node.containers.clone(),
        );
        registry.register(
            "gpu_queue_length",
            "Users waiting for GPUs",
            m.gpu_queue.clone(),
        );
        registry.register(
            "gpu_wait_seconds",
            "How long logins waited in the GPU queue (served or not)",
            m.gpu_wait.clone(),
        );
        registry.register(
            "gpu_seconds",
            "GPU-seconds held by each user's containers (profiles count with their user)",
            m.gpu_seconds.clone(),
        );
        registry.register(
            "user_errors",
            "Errors users met, by stable code (README.md, \"Error codes\")",
            m.user_errors.clone(),
        );
        registry.register(
            "reloads",
            "Config reloads by result (applied, rejected)",
            m.reloads.clone(),
        );
        registry.register(
            "idle_stops",
            "Containers stopped for being idle",
            m.idle_stops.clone(),
        );
        registry.register(
            "gpu_reclaims",
            "Containers stopped to give their idle GPUs to waiting logins ([gpu] reclaim_idle)",
            m.gpu_reclaims.clone(),
        );
        registry.register(
            "unauthenticated_connections",
            "Connections that have not authenticated yet (bounded by max_startups)",
            m.unauthenticated.clone(),
        );
        registry.register(
            "startups_closed",
            "Unauthenticated connections closed because max_startups was reached",
            m.startups_closed.clone(),
        );
        registry.register(
            "auth_backoffs",
            "Times an address started backing off after repeated authentication failures",
            m.auth_backoffs.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a login decision (`accepted` or `refused`).
    pub fn login(&self, result: &'static str) {
        self.logins.get_or_create(&[("result", result)]).inc();
    }

    /// Sets how many users wait for GPUs.
    pub fn gpu_queue(&self, waiting: usize) {
        self.gpu_queue
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Records how long a login waited in the GPU queue.
    pub fn gpu_waited(&self, took: Duration) {
        self.gpu_wait.observe(took.as_secs_f64());
    }

    /// Adds GPU-seconds held by `user`.
    pub fn gpu_held(&self, user: &str, seconds: f64) {
        self.gpu_seconds
            .get_or_create(&vec![("user", user.to_owned())])
            .inc_by(seconds);
    }

    /// Counts an error a user met, by its stable code (see [`crate::codes`]).
    pub fn user_error(&self, code: &'static str) {
        self.user_errors.get_or_create(&[("code", code)]).inc();
    }

    /// Counts a reload (`applied` or `rejected`).
    pub fn reload(&self, result: &'static str) {
        self.reloads.get_or_create(&[("result", result)]).inc();
    }

    /// Adds bytes a forward carried.
    pub fn forwarded(&self, to_target: u64, to_client: u64) {
        self.forwarded_bytes
            .get_or_create(&[("direction", "to_target")])
            .inc_by(to_target);
        self.forwarded_bytes
            .get_or_create(&[("direction", "to_client")])
            .inc_by(to_client);
    }

    /// Records how long creating (`created`) or starting a container took.
    pub fn container_ready(&self, created: bool, took: Duration) {
        let h = if created {
            &self.container_create
        } else {
            &self.container_start
        };
        h.observe(took.as_secs_f64());
    }

    /// Sets the GPU gauges (at scrape time, from the pool).
    pub fn gpus(&self, total: usize, allocated: usize) {
        self.gpus_total
            .set(i64::try_from(total).unwrap_or(i64::MAX));
        self.gpus_allocated
            .set(i64::try_from(allocated).unwrap_or(i64::MAX));
    }

    /// Sets the per-node gauges of a cluster (at scrape time); nodes gone from the cluster
    /// lose their series.
    pub fn nodes(&self, nodes: &[crate::runtime::NodeSummary]) {
        let g = &self.node;
        for family in [&g.up, &g.gpus, &g.gpus_held, &g.containers] {
            family.clear();
        }
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        for node in nodes {
            let label = vec![("node", node.name.clone())];
            g.up.get_or_create(&label).set(i64::from(node.ready));
            g.gpus.get_or_create(&label).set(n(node.gpus));
            g.gpus_held.get_or_create(&label).set(n(node.gpus_held));
            g.containers.get_or_create(&label).set(n(node.containers));
        }
    }

    /// Counts a container stopped for idleness.
    pub fn idle_stop(&self) {
        self.idle_stops.inc();
    }

    /// Counts a container stopped to reclaim its idle GPUs.
    pub fn gpu_reclaim(&self) {
        self.gpu_reclaims.inc();
    }

    /// Sets how many connections wait unauthenticated.
    pub fn unauthenticated(&self, n: usize) {
        self.unauthenticated
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts an unauthenticated connection closed by `max_startups`.
    pub fn startup_closed(&self) {
        self.startups_closed.inc();
    }

    /// Counts an address starting to back off.
    pub fn auth_backoff(&self) {
        self.auth_backoffs.inc();
    }

    /// Holds one open connection in the gauge until dropped.
    pub fn connection(&'static self) -> Live {
        Live::new(&self.connections)
    }

    /// Holds one running session in the gauge until dropped.
    pub fn session(&'static self) -> Live {
        Live::new(&self.sessions)
    }

    /// Holds one open forward in the gauge until dropped.
    pub fn forward(&'static self) -> Live {
        Live::new(&self.forwards)
    }
}

/// One live thing counted in a gauge; dropping it gives the count back.
#[must_use = "the count is given back when this is dropped"]
pub struct Live(&'static Gauge);

impl Live {
    fn new(gauge: &'static Gauge) -> Self {
        gauge.inc();
        Live(gauge)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_follow_guards_and_render_as_prometheus_text() {
        let m = metrics();
        let before = m.sessions.get();
        let a = m.session();
        let b = m.session();
        assert_eq!(m.sessions.get(), before + 2);
        drop(a);
        assert_eq!(m.sessions.get(), before + 1);
        drop(b);
        assert_eq!(m.sessions.get(), before);
        m.login("accepted");
        m.container_ready(true, Duration::from_millis(300));
        let text = m.render();
        assert!(text.contains("# TYPE labgate_logins counter"), "{text}");
        assert!(
            text.contains("labgate_logins_total{result=\"accepted\"}"),
            "{text}"
        );
        assert!(
            text.contains("labgate_container_create_seconds_bucket{le=\"0.4\"} "),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
