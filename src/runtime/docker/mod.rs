//! The Docker Engine backend: one bollard client over the unix socket, API version negotiated
//! once (lazily, so the gateway starts and says something useful while the daemon is down),
//! per-user locks so concurrent first logins create exactly one container.

mod account;
mod direct;
pub mod exec;
pub mod gpus;
pub mod hostpath;
pub mod netns;
pub mod pool;
pub mod prepull;
pub mod process;
pub mod pull;
mod reach;
mod relay;
pub mod rootfs;
pub mod spec;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::exec::CreateExecOptions;
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions,
};
use tokio::sync::OnceCell;

use crate::auth::Username;
use crate::config::{DockerConfig, ForwardVia};
use crate::config::{PullPolicy, RegistryAuth};
use crate::runtime::{
    ContainerHandle, ContainerRuntime, ContainerSpec, EnsureOutcome, Exec, ExecRequest, LABEL_GPUS,
    LABEL_IMAGE, LABEL_MANAGED, LABEL_PROFILE, LABEL_SETTINGS, LABEL_USER, ManagedContainer,
    PullEvent, RuntimeError,
};
use hostpath::{Checked, Refused};

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
    shells: Mutex<HashMap<String, String>>,
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
            shells: Mutex::new(HashMap::new()),
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

    /// Pulls `image` in the background (a config change named it), unless `policy` says
    /// never, or says missing and the image is here. Progress goes to the log only.
    pub async fn prepull(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: Option<RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        if policy == PullPolicy::Never {
            return Ok(());
        }
        let (docker, _) = self.client().await?;
        self.puller
            .pull(docker, image, auth, policy == PullPolicy::Missing)
            .finish(|_| {})
            .await
            .map_err(|reason| RuntimeError::Pull {
                image: image.to_owned(),
                reason,
            })
    }

    /// Makes sure `spec.image` is on the host as its pull policy says, publishing progress
    /// for `spec.name`'s waiters. `Some(id)`: the image's id, when no pull ran (after a pull
    /// the reference may name another image).
    async fn ensure_image(
        &self,
        docker: &Docker,
        spec: &ContainerSpec,
    ) -> Result<Option<String>, RuntimeError> {
        let (present, id) = match docker.inspect_image(&spec.image).await {
            Ok(image) => (true, image.id),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => (false, None),
            Err(e) => return Err(engine(e)),
        };
        match (spec.pull_policy, present) {
            (PullPolicy::Never, false) => Err(RuntimeError::ImageMissing(spec.image.clone())),
            (PullPolicy::Never | PullPolicy::Missing, true) => Ok(id),
            (policy, _) => {
                let events = self.pull_events.clone();
                let container = spec.name.clone();
                let pulled = self
                    .puller
                    .pull(
                        docker,
                        &spec.image,
                        spec.registry.clone(),
                        policy == PullPolicy::Missing,
                    )
                    .finish(|progress| {
                        let _ = events.send(PullEvent {
                            container: container.clone(),
                            progress,
                        });
                    })
                    .await;
                match pulled {
                    Ok(()) => Ok(None),
                    // "always" keeps users working from the copy here when the registry fails.
                    Err(reason) if present => {
                        tracing::warn!(image = %spec.image, %reason, "pull failed; using the image already on this host");
                        Ok(id)
                    }
                    Err(reason) => Err(RuntimeError::Pull {
                        image: spec.image.clone(),
                        reason,
                    }),
                }
            }
        }
    }

    /// For a stopped container about to start: `Some(old image)` when the configured image
    /// is another one than the container's (another reference, or the reference now names
    /// another image, say after a pull), so it must be made again.
    async fn image_changed(
        &self,
        docker: &Docker,
        info: &bollard::models::ContainerInspectResponse,
        spec: &ContainerSpec,
    ) -> Result<Option<String>, RuntimeError> {
        let known = self.ensure_image(docker, spec).await?;
        let old = image_of(info).unwrap_or_default();
        if old != spec.image {
            return Ok(Some(old));
        }
        let wanted = match known {
            Some(id) => Some(id),
            None => docker.inspect_image(&spec.image).await.map_err(engine)?.id,
        };
        Ok((wanted.is_some() && wanted != info.image).then_some(old))
    }

    /// Removes a stopped container and makes it again from `spec` (home and mounts are host
    /// directories and stay): its image (`old_image` it was) or the `settings` named changed.
    async fn recreate(
        &self,
        docker: &Docker,
        id: &str,
        spec: &ContainerSpec,
        binds: &[Checked],
        old_image: Option<&str>,
        settings: &[&'static str],
    ) -> Result<(String, bollard::models::ContainerInspectResponse), RuntimeError> {
        // Not forced: a container that started meanwhile is refused (409), never killed.
        let opts = bollard::query_parameters::RemoveContainerOptions {
            force: false,
            v: false,
            link: false,
        };
        docker
            .remove_container(id, Some(opts))
            .await
            .map_err(engine)?;
        match old_image {
            Some(old) => {
                tracing::info!(target: "audit", container = %spec.name, from = %old, to = %spec.image, settings = ?settings, "container recreated: image changed")
            }
            None => {
                tracing::info!(target: "audit", container = %spec.name, settings = ?settings, "container recreated: settings changed")
            }
        }
        let id = self.create(docker, spec).await?;
        let info = self.start(docker, &id, spec, binds).await?;
        Ok((id, info))
    }

    /// Creates labgate's network if missing (a bridge with inter-container traffic disabled,
    /// so a user's container cannot reach another's, not even by bridge IP) and returns its id.
    /// Docker allows two networks of one name: if gateways raced to create it, every gateway
    /// keeps the oldest and removes the others, so all agree.
    async fn ensure_network(&self, docker: &Docker) -> Result<String, RuntimeError> {
        self.network_id
            .get_or_try_init(|| async {
                let mut found = self.networks_named(docker).await?;
                if found.is_empty() {
                    let req = bollard::models::NetworkCreateRequest {
                        name: self.network.clone(),
                        driver: Some("bridge".into()),
                        options: Some(HashMap::from([(
                            "com.docker.network.bridge.enable_icc".to_owned(),
                            "false".to_owned(),
                        )])),
                        labels: Some(HashMap::from([(
                            LABEL_MANAGED.to_owned(),
                            "true".to_owned(),
                        )])),
                        ..Default::default()
                    };
                    match docker.create_network(req).await {
                        Ok(_) => tracing::info!(network = %self.network, "created the isolated container network"),
                        Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => {}
                        Err(e) => return Err(engine(e)),
                    }
                    found = self.networks_named(docker).await?;
                }
                found.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
                let Some(keep) = found.first() else {
                    return Err(RuntimeError::Engine(format!("network {} vanished", self.network)));
                };
                for extra in found.iter().skip(1) {
                    if let Some(id) = &extra.id {
                        let _ = docker.remove_network(id).await;
                    }
                }
                let icc = keep
                    .options
                    .as_ref()
                    .and_then(|o| o.get("com.docker.network.bridge.enable_icc"))
                    .map(String::as_str);
                if icc != Some("false") {
                    tracing::warn!(network = %self.network, "network allows inter-container traffic: users' containers can reach each other");
                }
                keep.id
                    .clone()
                    .ok_or_else(|| RuntimeError::Engine("network without id".into()))
            })
            .await
            .cloned()
    }

    /// Networks whose name is exactly ours (the engine's name filter matches substrings).
    async fn networks_named(
        &self,
        docker: &Docker,
    ) -> Result<Vec<bollard::models::Network>, RuntimeError> {
        let filters = HashMap::from([("name".to_owned(), vec![self.network.clone()])]);
        let list = docker
            .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(engine)?;
        Ok(list
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(self.network.as_str()))
            .collect())
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

    /// The containers labgate manages (by label); stopped ones too when `all`.
    async fn managed_containers(
        &self,
        all: bool,
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        let (docker, _) = self.client().await?;
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")])]);
        docker
            .list_containers(Some(ListContainersOptions {
                all,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(engine)
    }

    /// The container named `name`, or `None` when there is none.
    async fn inspect_named(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<Option<bollard::models::ContainerInspectResponse>, RuntimeError> {
        match docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => Ok(Some(info)),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(engine(e)),
        }
    }

    /// Renames the container `from` to `to` if its labels say it is `user`'s container of
    /// `profile` (a container from before profile containers were named with `.`); true
    /// when it was renamed.
    async fn migrate_name(
        &self,
        docker: &Docker,
        from: &str,
        to: &str,
        user: &str,
        profile: &str,
    ) -> Result<bool, RuntimeError> {
        let Some(info) = self.inspect_named(docker, from).await? else {
            return Ok(false);
        };
        if !is_ours(&info, user, Some(profile)) {
            return Ok(false);
        }
        let id = info.id.unwrap_or_else(|| from.to_owned());
        docker
            .rename_container(
                &id,
                bollard::query_parameters::RenameContainerOptions {
                    name: to.to_owned(),
                },
            )
            .await
            .map_err(engine)?;
        tracing::info!(target: "audit", user, profile, from, to, "container renamed");
        Ok(true)
    }

    /// Renames every profile container still under its old name (`labgate-USER-PROFILE`) to
    /// `labgate-USER.PROFILE`; the number renamed.
    pub async fn migrate_names(&self) -> Result<usize, RuntimeError> {
        let (docker, _) = self.client().await?;
        let mut renamed = 0;
        for c in self.list_managed().await? {
            let (Some(profile), Ok(user)) = (&c.profile, Username::parse(&c.user)) else {
                continue;
            };
            let (old, new) = (
                crate::runtime::legacy_profile_name(&user, profile),
                crate::runtime::container_name(&user, Some(profile)),
            );
            if c.name == old {
                let lock = self.lock_for(&new);
                let _guard = lock.lock().await;
                if self
                    .migrate_name(docker, &old, &new, user.as_str(), profile.as_str())
                    .await?
                {
                    renamed += 1;
                }
            }
        }
        Ok(renamed)
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

    async fn create(&self, docker: &Docker, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let opts = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let network = self.ensure_network(docker).await?;
        let mut body = spec::create_body(spec, &network);
        if let Some(mounts) = body.host_config.as_mut().and_then(|h| h.mounts.as_mut()) {
            if self.relay_helper.is_file() {
                mounts.push(spec::relay_mount(&self.relay_helper));
            }
            if self.sftp_helper.is_file() {
                mounts.push(spec::helper_mount(
                    &self.sftp_helper,
                    crate::runtime::SFTP_SERVER_PATH,
                ));
            }
        }
        let t0 = Instant::now();
        match docker.create_container(Some(opts), body).await {
            Ok(r) => {
                tracing::info!(container = %spec.name, image = %spec.image, ms = t0.elapsed().as_millis() as u64, "container created");
                Ok(r.id)
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            }) if message.contains("image") => Err(RuntimeError::Create(message)),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                // Someone else (another gateway) created it meanwhile: use theirs.
                let info = docker
                    .inspect_container(&spec.name, None::<InspectContainerOptions>)
                    .await
                    .map_err(engine)?;
                Ok(info.id.unwrap_or_else(|| spec.name.clone()))
            }
            Err(BollardError::DockerResponseServerError { message, .. }) => {
                Err(RuntimeError::Create(message))
            }
            Err(e) => Err(engine(e)),
        }
    }

    /// Starts container `id` and returns the engine's view of it once started (one inspect
    /// serves both the checks below and the caller's placement). A container that got other
    /// files at its binds than `binds` as checked is killed before anything runs in it.
    async fn start(
        &self,
        docker: &Docker,
        id: &str,
        spec: &ContainerSpec,
        binds: &[Checked],
    ) -> Result<bollard::models::ContainerInspectResponse, RuntimeError> {
        let name = &spec.name;
        let t0 = Instant::now();
        match docker.start_container(id, None).await {
            Ok(()) => {}
            Err(BollardError::DockerResponseServerError { message, .. }) => {
                return Err(RuntimeError::Start(message));
            }
            Err(e) => return Err(engine(e)),
        }
        let info = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(engine)?;
        // A container can start and die at once (no /bin/sh in the image, say).
        if let Some(dead) = ended(&info) {
            return Err(dead);
        }
        if let Err(refused) = verify_binds(&info, binds) {
            tracing::warn!(target: "audit", user = %spec.user, container = %name, error = %refused, "container stopped at start: a bind source changed");
            if let Err(e) = docker
                .kill_container(id, None::<bollard::query_parameters::KillContainerOptions>)
                .await
            {
                tracing::error!(container = %name, error = %e, "cannot kill a container whose bind changed");
            }
            return Err(RuntimeError::Unsafe(refused));
        }
        tracing::info!(container = %name, ms = t0.elapsed().as_millis() as u64, "container started");
        Ok(info)
    }

    /// Explains a failed exec: a container that died right after starting (an image without
    /// `/bin/sh`, say) is a start failure with its exit code, not an engine error.
    async fn exec_failure(&self, docker: &Docker, id: &str, err: BollardError) -> RuntimeError {
        if let Some(dead) = self.not_running(docker, id).await {
            return dead;
        }
        match err {
            BollardError::DockerResponseServerError { message, .. } => RuntimeError::Exec(message),
            other => engine(other),
        }
    }

    /// `Some(error)` when the container is not running, describing how it ended.
    async fn not_running(&self, docker: &Docker, id: &str) -> Option<RuntimeError> {
        let info = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        ended(&info)
    }

    /// The login shell: the configured one, else `/bin/bash` when the container has it, else
    /// `/bin/sh`. Asked of the container's filesystem from the host when its init process
    /// (`pid`) can be looked into, else of the container with an exec; remembered per id.
    async fn shell_of(
        &self,
        docker: &Docker,
        id: &str,
        pid: Option<i32>,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        if let Some(shell) = &spec.shell {
            return Ok(shell.clone());
        }
        if let Some(s) = self
            .shells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(s.clone());
        }
        let bash = match pid.and_then(|pid| rootfs::executable_in(pid, "/bin/bash")) {
            Some(bash) => bash,
            None => self.probe_bash(docker, id).await?,
        };
        let shell = if bash { "/bin/bash" } else { "/bin/sh" };
        self.shells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), shell.to_owned());
        Ok(shell.to_owned())
    }

    /// Whether `/bin/bash` is executable in container `id`, asked with an exec.
    async fn probe_bash(&self, docker: &Docker, id: &str) -> Result<bool, RuntimeError> {
        let probe = CreateExecOptions::<String> {
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "test -x /bin/bash".into(),
            ]),
            ..Default::default()
        };
        let status = match exec::run_detached(docker, id, probe, HANGUP_GRACE).await {
            Ok(status) => status,
            Err(exec::DetachedError::Engine(e)) => {
                return Err(self.exec_failure(docker, id, e).await);
            }
            Err(exec::DetachedError::Wait(e)) => return Err(e),
        };
        Ok(status == crate::runtime::ExitStatus::Code(0))
    }
}

/// Wraps `argv` so the terminal has its size before the program starts. Engine API 1.41 has
/// no console size on exec create, and a resize after start races with the program (`stty
/// size` would print `0 0`). The wrapper execs `argv`, so the process tree is unchanged.
fn sized_terminal(size: crate::runtime::TtySize, argv: &[String]) -> Vec<String> {
    let mut out: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        "stty rows \"$1\" cols \"$2\" 2>/dev/null; shift 2; exec \"$@\"".into(),
        "labgate".into(),
        size.rows.to_string(),
        size.cols.to_string(),
    ];
    out.extend(argv.iter().cloned());
    out
}

/// Checks every bind source of `spec` on the host (see [`hostpath`]): the
/// home, made if missing, and the admin's mounts. A refusal is logged with its path for the
/// admin; the user is told one line.
async fn check_binds(spec: &ContainerSpec) -> Result<Vec<Checked>, RuntimeError> {
    let spec = spec.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut binds = vec![hostpath::ensure_home(
            &spec.home_source,
            &spec.home_target,
            spec.uid_gid,
        )?];
        for m in &spec.mounts {
            binds.push(hostpath::check_mount(&m.source, &m.target)?);
        }
        Ok::<_, Refused>(binds)
    })
    .await
    .map_err(|e| RuntimeError::Home(e.to_string()))?;
    checked.map_err(|refused| {
        tracing::warn!(target: "audit", user = %spec.user, container = %spec.name, error = %refused, "container start refused: a bind source failed its check");
        RuntimeError::Unsafe(refused)
    })
}

/// Whether the container that `info` shows running has, at each bind's target, the file
/// that was checked; `Err` names the first that it does not.
fn verify_binds(
    info: &bollard::models::ContainerInspectResponse,
    binds: &[Checked],
) -> Result<(), Refused> {
    let Some(pid) = placement(info).0 else {
        return Ok(());
    };
    for bind in binds {
        if hostpath::bound_in(pid, bind) == Some(false) {
            return Err(Refused::Swapped {
                checked: bind.source.clone(),
                target: bind.target.clone(),
            });
        }
    }
    Ok(())
}

/// Whether `info` is labgate's container of `user` (and `profile`), by its labels: a
/// container with our name but not our labels is never touched.
fn is_ours(
    info: &bollard::models::ContainerInspectResponse,
    user: &str,
    profile: Option<&str>,
) -> bool {
    let labels = info.config.as_ref().and_then(|c| c.labels.as_ref());
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    label(LABEL_MANAGED) == Some("true")
        && label(LABEL_USER) == Some(user)
        && label(LABEL_PROFILE) == profile
}

/// The host PID of the container's init process and the container's own addresses.
fn placement(info: &bollard::models::ContainerInspectResponse) -> (Option<i32>, Vec<IpAddr>) {
    let pid = info
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 0);
    let ips = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|nets| {
            nets.values()
                .flat_map(|n| [n.ip_address.as_deref(), n.global_ipv6_address.as_deref()])
                .flatten()
                .filter_map(|a| a.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    (pid, ips)
}

/// `Some(error)` when `info` shows a container that is not running, describing how it ended.
fn ended(info: &bollard::models::ContainerInspectResponse) -> Option<RuntimeError> {
    let state = info.state.clone().unwrap_or_default();
    if state.running == Some(true) {
        return None;
    }
    let code = state.exit_code.unwrap_or(-1);
    Some(RuntimeError::Start(
        match state.error.filter(|e| !e.is_empty()) {
            Some(e) => e,
            None => format!("it exited at once with code {code} (does the image have /bin/sh?)"),
        },
    ))
}

/// The image reference a container was made from: its label, else the engine's record.
fn image_of(info: &bollard::models::ContainerInspectResponse) -> Option<String> {
    let config = info.config.as_ref()?;
    config
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_IMAGE).cloned())
        .or_else(|| config.image.clone())
}

/// Maps a bollard error: engine answers stay engine errors, the rest means unreachable.
fn engine(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { message, .. } => RuntimeError::Engine(message),
        other => RuntimeError::Unavailable(other.to_string()),
    }
}

impl DockerRuntime {
    /// Finds or creates `spec`'s container with exactly `spec.gpus` (the pool decided them)
    /// and makes sure it runs.
    async fn start_with_gpus(&self, spec: &ContainerSpec) -> Result<ContainerHandle, RuntimeError> {
        let lock = self.lock_for(&spec.name);
        let _guard = lock.lock().await;
        let (docker, _) = self.client().await?;
        let binds = check_binds(spec).await?;
        let mut found = self.inspect_named(docker, &spec.name).await?;
        if found.is_none()
            && let Some(profile) = &spec.profile
            && self
                .migrate_name(
                    docker,
                    &crate::runtime::legacy_profile_name(&spec.user, profile),
                    &spec.name,
                    spec.user.as_str(),
                    profile.as_str(),
                )
                .await?
        {
            // Made before profile containers were named with `.`, and renamed now.
            found = self.inspect_named(docker, &spec.name).await?;
        }
        let mut recreated_from = None;
        let mut remade_for = Vec::new();
        let mut pending_image = None;
        let (id, outcome, info) = match found {
            Some(info) => {
                let labels = info
                    .config
                    .as_ref()
                    .and_then(|c| c.labels.clone())
                    .unwrap_or_default();
                if !is_ours(
                    &info,
                    spec.user.as_str(),
                    spec.profile.as_ref().map(|p| p.as_str()),
                ) {
                    return Err(RuntimeError::NameTaken(spec.name.clone()));
                }
                let id = info.id.clone().unwrap_or_else(|| spec.name.clone());
                let state = info.state.clone().unwrap_or_default();
                if state.paused == Some(true) {
                    docker.unpause_container(&id).await.map_err(engine)?;
                    (id, EnsureOutcome::Started, None)
                } else if state.running == Some(true) {
                    pending_image = image_of(&info).filter(|running| *running != spec.image);
                    (id, EnsureOutcome::Running, Some(info))
                } else if let (old_image, changed) = (
                    self.image_changed(docker, &info, spec).await?,
                    labels
                        .get(LABEL_SETTINGS)
                        .map(|l| spec::changed_settings(l, spec))
                        .unwrap_or_default(),
                ) && (old_image.is_some() || !changed.is_empty())
                {
                    let (id, info) = self
                        .recreate(docker, &id, spec, &binds, old_image.as_deref(), &changed)
                        .await?;
                    recreated_from = old_image;
                    remade_for = changed;
                    (id, EnsureOutcome::Created, Some(info))
                } else {
                    let t0 = Instant::now();
                    if spec::limits_differ(info.host_config.as_ref(), spec) {
                        // Changed by a reload while it was stopped: the new limits from now.
                        docker
                            .update_container(&id, spec::limits_update(spec))
                            .await
                            .map_err(engine)?;
                        tracing::info!(container = %spec.name, "limits updated before start (memory, cpus, pids)");
                    }
                    let info = self.start(docker, &id, spec, &binds).await?;
                    crate::metrics::metrics().container_ready(false, t0.elapsed());
                    tracing::info!(target: "audit", container = %spec.name, "container started");
                    (id, EnsureOutcome::Started, Some(info))
                }
            }
            None => {
                self.ensure_image(docker, spec).await?;
                let t0 = Instant::now();
                let id = self.create(docker, spec).await?;
                let info = self.start(docker, &id, spec, &binds).await?;
                crate::metrics::metrics().container_ready(true, t0.elapsed());
                tracing::info!(target: "audit", container = %spec.name, image = %spec.image, "container created");
                (id, EnsureOutcome::Created, Some(info))
            }
        };
        let info = match info {
            Some(info) => info,
            None => docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                .map_err(engine)?,
        };
        let (pid, ips) = placement(&info);
        let shell = self.shell_of(docker, &id, pid, spec).await?;
        if let Err(e) = self.accounts.ensure(docker, &id, pid, spec, &shell).await {
            // Shells and commands still work without it; sftp-server and scp do not.
            tracing::warn!(container = %spec.name, error = %e, "no account entry for the uid");
        }
        let mut handle = ContainerHandle::new(id, spec.name.clone(), shell, outcome);
        handle.engine_data = Some(Arc::new(Local { pid }));
        handle.ips = ips;
        handle.recreated_from = recreated_from;
        handle.remade_for = remade_for;
        handle.pending_image = pending_image;
        handle.gpus = spec.gpus.clone();
        Ok(handle)
    }

    /// Stops the container `name` (SIGTERM, then SIGKILL after a grace period); `Ok(false)`
    /// when it was not running.
    async fn stop_named(&self, name: &str) -> Result<bool, RuntimeError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let (docker, _) = self.client().await?;
        let running = self
            .inspect_named(docker, name)
            .await?
            .and_then(|i| i.state)
            .is_some_and(|s| s.running == Some(true));
        if !running {
            return Ok(false);
        }
        let opts = bollard::query_parameters::StopContainerOptions {
            t: Some(STOP_GRACE_SECS),
            signal: None,
        };
        match docker.stop_container(name, Some(opts)).await {
            Ok(()) => {
                tracing::info!(target: "audit", container = %name, "container stopped");
                Ok(true)
            }
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(engine(e)),
        }
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
                Some(size) => sized_terminal(size, &req.argv),
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
        let (output, stdin) =
            exec::start_attached(&self.socket, version, &created.id, req.tty.is_some()).await?;
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
        Ok(list
            .into_iter()
            .map(|c| {
                let label = |key: &str| {
                    c.labels
                        .as_ref()
                        .and_then(|l| l.get(key).cloned())
                        .unwrap_or_default()
                };
                ManagedContainer {
                    id: c.id.clone().unwrap_or_default(),
                    name: c
                        .names
                        .as_ref()
                        .and_then(|n| n.first())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    user: label(LABEL_USER),
                    profile: crate::auth::ProfileName::parse(&label(LABEL_PROFILE)).ok(),
                    gpus: crate::gpu::GpuUuid::parse_list(&label(LABEL_GPUS)),
                    state: crate::runtime::ContainerState::from_engine(
                        &c.state.map(|s| s.to_string()).unwrap_or_default(),
                    ),
                    image: c.image.clone().unwrap_or_default(),
                }
            })
            .collect())
    }
}
