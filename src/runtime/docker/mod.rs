//! The Docker Engine backend: one bollard client over the unix socket, API version negotiated
//! once (lazily, so the gateway starts and says something useful while the daemon is down),
//! per-user locks so concurrent first logins create exactly one container. This module holds
//! [`DockerRuntime`] and its [`ContainerRuntime`] impl; `lifecycle` makes containers run (a
//! pure `lifecycle::plan` carried out), `image`, `network`, `shell`, `binds`, `inspect`,
//! `list` and `legacy` each own what their names say.

pub(crate) mod account;
pub(crate) mod binds;
pub mod dial;
mod direct;
pub mod exec;
pub mod gpus;
pub mod hostpath;
mod image;
pub(crate) mod inspect;
pub mod labels;
mod legacy;
mod lifecycle;
mod list;
pub mod netns;
mod network;
pub mod pool;
pub mod prepull;
pub mod process;
pub mod pull;
mod reach;
pub mod rootfs;
pub(crate) mod shell;
pub mod spec;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::exec::CreateExecOptions;
use tokio::sync::OnceCell;

use crate::config::{DockerConfig, ForwardVia};
use crate::runtime::{
    ContainerHandle, ContainerRuntime, ContainerSpec, Exec, ExecRequest, ManagedContainer,
    PullEvent, RuntimeError,
};

/// How long an exec's processes get between SIGHUP and SIGKILL after a hangup.
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// Seconds a stopped container's processes get between SIGTERM and SIGKILL.
const STOP_GRACE_SECS: i32 = 10;

/// The Docker backend.
pub struct DockerRuntime {
    /// Bound on each API call.
    timeout: Duration,
    /// Negotiated client, made on first use (and retried until the daemon answers).
    client: OnceCell<(Docker, String)>,
    /// Socket path, for the hijacked exec connections.
    socket: PathBuf,
    /// One lock per container name: creating and starting are serialized per user.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Resolved login shell per container id (probed once per container).
    shells: shell::Shells,
    /// Containers given a `passwd` entry for the configured uid (sftp-server, scp and ssh
    /// refuse to run without one).
    accounts: account::Accounts,
    /// The network containers join, and whether it is known to exist.
    network: String,
    /// The static relay binary mounted into containers (if the file exists).
    relay_helper: PathBuf,
    /// The static fallback SFTP server mounted into containers (if the file exists).
    sftp_helper: PathBuf,
    /// Its id, once found or created.
    network_id: OnceCell<String>,
    /// Image pulls in flight, shared by everyone waiting for the same image.
    puller: Arc<pull::Puller>,
    /// Progress of the pulls container starts wait for (see [`ContainerRuntime::pull_events`]).
    pull_events: tokio::sync::broadcast::Sender<PullEvent>,
    /// How the way in ([`reach`]) gets into containers.
    forward_via: ForwardVia,
    /// Whether this gateway may enter containers' namespaces (probed once, by the first way
    /// in that would); when not, ways in use the relay exec.
    namespaces: OnceCell<bool>,
    /// Containers whose direct path failed once (their commands use the exec stream).
    direct_refused: direct::Refusals,
    /// The host's GPUs (NVML) and who holds them: every container start goes through it.
    gpus: pool::GpuPool,
}

/// What a local Docker handle carries below the seam ([`ContainerHandle::engine_data`]).
#[derive(Debug, Clone, Copy)]
struct Local {
    /// Host PID of the container's init, when visible: the way into its namespaces.
    pid: Option<i32>,
}

/// The host PID of `container`'s init, if this backend made the handle and saw one.
fn pid_of(container: &ContainerHandle) -> Option<i32> {
    container
        .engine_data
        .as_ref()
        .and_then(|d| d.downcast_ref::<Local>())
        .and_then(|l| l.pid)
}

impl DockerRuntime {
    /// A backend talking to the engine at `cfg.socket`. Does no I/O and never fails: the
    /// socket may appear later (a stopped daemon removes it), and until then each login is
    /// told the engine is not reachable. Containers get their GPUs from `gpus`.
    pub fn new(cfg: &DockerConfig, gpus: pool::GpuPool) -> Self {
        Self {
            timeout: cfg.timeout,
            client: OnceCell::new(),
            socket: cfg.socket.clone(),
            locks: Mutex::new(HashMap::new()),
            shells: shell::Shells::default(),
            accounts: account::Accounts::default(),
            network: cfg.network.clone(),
            relay_helper: cfg.relay_helper.path.clone(),
            sftp_helper: cfg.sftp_helper.path.clone(),
            network_id: OnceCell::new(),
            puller: Arc::default(),
            pull_events: tokio::sync::broadcast::channel(1024).0,
            forward_via: cfg.forward_via,
            namespaces: OnceCell::new(),
            direct_refused: direct::Refusals::default(),
            gpus,
        }
    }

    /// The negotiated client and its API version prefix (`v1.41`).
    async fn client(&self) -> Result<&(Docker, String), RuntimeError> {
        self.client
            .get_or_try_init(|| async {
                let socket = self.socket.to_string_lossy();
                let docker = Docker::connect_with_unix(
                    &socket,
                    self.timeout.as_secs().max(1),
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| RuntimeError::Unavailable(e.to_string()))?
                .negotiate_version()
                .await
                .map_err(engine)?;
                let v = docker.client_version();
                let version = format!("v{}.{}", v.major_version, v.minor_version);
                tracing::info!(api = %version, socket = %self.socket.display(), "connected to the Docker Engine");
                Ok((docker, version))
            })
            .await
    }

    /// Checks the engine answers (for `labgate check` and start-up logs).
    pub async fn ping(&self) -> Result<(), RuntimeError> {
        let (docker, _) = self.client().await?;
        docker.ping().await.map(|_| ()).map_err(engine)
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }
}

/// Maps a bollard error: engine answers stay engine errors, the rest means unreachable.
fn engine(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { message, .. } => RuntimeError::Engine(message),
        other => RuntimeError::Unavailable(other.to_string()),
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ensure_running(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError> {
        self.gpus.ensure_running(self, spec.clone()).await
    }

    async fn stop(
        &self,
        container: &ManagedContainer,
        still_wanted: crate::runtime::StillWanted,
    ) -> Result<bool, RuntimeError> {
        match container.owner() {
            Some((_, holder)) => {
                self.gpus
                    .stop(self, &container.name, &holder, still_wanted)
                    .await
            }
            // Not a valid owner: it holds no GPUs this gateway gave.
            None if still_wanted() => self.stop_named(&container.name).await,
            None => Ok(false),
        }
    }

    async fn gpus(&self) -> Result<Vec<crate::gpu::GpuInfo>, crate::gpu::GpuError> {
        self.gpus.inventory(0).await
    }

    fn gpu_holders(
        &self,
    ) -> std::collections::BTreeMap<crate::config::GpuUuid, Vec<crate::auth::Username>> {
        self.gpus.holders()
    }

    fn gpu_held_since(&self, holder: &crate::auth::Username) -> Option<std::time::SystemTime> {
        self.gpus.held_since(holder)
    }

    async fn recover(&self) -> Result<(), RuntimeError> {
        match self.migrate_names().await {
            Ok(0) | Err(_) => {}
            Ok(n) => tracing::info!(
                renamed = n,
                "profile containers renamed to labgate-USER.PROFILE"
            ),
        }
        let list = self.list_managed().await?;
        let running = list.iter().filter(|c| c.state.is_running()).count();
        tracing::info!(
            managed = list.len(),
            running,
            "reconciled with the containers labgate manages"
        );
        for c in &list {
            tracing::debug!(user = %c.user, id = %c.id, state = %c.state, "managed container");
        }
        // Who holds which GPU, from the running containers' labels, so a restarted gateway
        // never hands out a GPU a running container has. (Until it succeeds, the first login
        // that involves GPUs does it.)
        if let Err(e) = self.gpus.rebuild(self).await {
            tracing::warn!(
                "cannot rebuild GPU holdings from container labels: {e}; retried at the next GPU login"
            );
        }
        Ok(())
    }

    fn follow_config(
        self: Arc<Self>,
        config: tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
    ) {
        tokio::spawn(prepull::on_change(config, self));
    }

    fn pull_events(&self) -> tokio::sync::broadcast::Receiver<PullEvent> {
        self.pull_events.subscribe()
    }

    async fn reach(
        self: Arc<Self>,
        container: &ContainerHandle,
        who: crate::runtime::reach::Reacher,
    ) -> Arc<dyn crate::runtime::reach::Reach> {
        let pid = self.way_in(container).await;
        Arc::new(reach::DockerReach {
            runtime: self,
            container: container.clone(),
            who,
            pid,
        })
    }

    async fn exec(
        &self,
        container: &ContainerHandle,
        req: ExecRequest,
    ) -> Result<Exec, RuntimeError> {
        let (docker, version) = self.client().await?;
        let t0 = Instant::now();
        let opts = CreateExecOptions::<String> {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(req.tty.is_some()),
            env: Some(req.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: Some(match req.tty {
                Some(size) => shell::sized_terminal(size, &req.argv),
                None => req.argv.clone(),
            }),
            user: req.user.map(|(u, g)| format!("{u}:{g}")),
            working_dir: Some(req.workdir.clone()),
            ..Default::default()
        };
        let created = match docker.create_exec(&container.id, opts).await {
            Ok(c) => c,
            Err(e) => return Err(self.exec_failure(docker, &container.id, e).await),
        };
        let started = exec::start_attached(
            &dial::Dial::Unix(self.socket.clone()),
            version,
            &created.id,
            req.tty.is_some(),
        )
        .await;
        let (output, stdin) = match started {
            Ok(s) => s,
            // The container died between the exec's create and its start (an image
            // without a shell, say): that is what the user is told.
            Err(e) => return Err(self.not_running(docker, &container.id).await.unwrap_or(e)),
        };
        let control = exec::DockerExecControl {
            docker: docker.clone(),
            exec_id: created.id,
            process: tokio::sync::OnceCell::new(),
            delivered: Arc::new(AtomicI32::new(0)),
            grace: HANGUP_GRACE,
        };
        if let Some(size) = req.tty
            && let Err(e) = crate::runtime::ExecControl::resize(&control, size).await
        {
            // A short command can be gone before its terminal is sized: not an error.
            tracing::debug!("initial resize: {e}");
        }
        tracing::debug!(container = %container.name, ms = t0.elapsed().as_millis() as u64, "exec started");
        Ok(exec::assemble(output, stdin, control))
    }

    async fn update_limits(&self, spec: &ContainerSpec) -> Result<bool, RuntimeError> {
        let (docker, _) = self.client().await?;
        let Some(info) = self.inspect_named(docker, &spec.name).await? else {
            return Ok(false);
        };
        if info.state.and_then(|s| s.running) != Some(true) {
            return Ok(false);
        }
        let body = spec::limits_update(spec);
        docker
            .update_container(&spec.name, body)
            .await
            .map_err(|e| match e {
                BollardError::DockerResponseServerError { message, .. } => {
                    RuntimeError::Engine(message)
                }
                other => engine(other),
            })?;
        Ok(true)
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, RuntimeError> {
        let list = self.managed_containers(true).await?;
        Ok(list.into_iter().map(list::managed).collect())
    }
}
