//! `labgate node-agent`: what each node of a cluster runs beside its Docker Engine so the
//! gateway's forwards into containers there go straight into the container's network
//! namespace, as they do on one host, instead of through the engine's exec stream (which
//! carries a forward at well under half the speed).
//!
//! It owns one thing: on a request from the gateway ([`wire`]: one request line, one answer
//! line, then raw bytes), it connects from inside a running labgate container on its node
//! (TCP from the container's network namespace, or a unix socket in its mount namespace as
//! the user) and joins that socket to the gateway's connection until both ends close. It
//! also carries the gateway's exec streams: asked to start an exec the gateway created in
//! such a container, it starts it attached on its own engine and joins that stream instead.
//! The gateway sends those over one multiplexed connection ([`mux`]), each stream with a
//! request of its own.
//!
//! **Who may ask.** On `tcp://` it speaks TLS and requires a client certificate signed by
//! its CA: the same CA and the same client certificate as the node's Docker API
//! (`[cluster] tls_dir`), which already lets their holder do anything on the node; the agent
//! grants less than that. On `unix://` the socket is made 0600 (root). It serves only
//! containers carrying labgate's label, running on its own engine (an exec only of the
//! container the request names), and it never listens inside a container or touches files:
//! forwards the gateway would refuse never reach it, since the forward policy is the
//! gateway's.
//!
//! Each operation enters namespaces on a thread of its own (`runtime::docker::netns`), so
//! the agent needs root (CAP_SYS_ADMIN) and the host's PID namespace, as the gateway does on
//! one host.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::cluster::EngineAddr;
use crate::runtime::docker::exec::hijack;
use crate::runtime::docker::labels::LABEL_MANAGED;
use crate::runtime::docker::netns;
use crate::runtime::swarm::mux::{self, MuxStream};
use crate::runtime::swarm::wire::{self, Answer, Failure, Request, Target};

/// How long a client has for its TLS handshake and its request line together.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// The longest a connect may take, whatever the request asks.
const CONNECT_MOST: Duration = Duration::from_secs(60);

/// Connections served at once; further ones wait to be accepted.
const MAX_CONNECTIONS: usize = 4096;

/// Bytes read from the target at a time, for the gateway (downloads are what forwards
/// mostly carry: large reads, few system calls and records sent together).
const PUMP_BUFFER: usize = 256 * 1024;

/// Bytes read from the gateway at a time, for the target.
const UP_BUFFER: usize = 64 * 1024;

/// Bytes read at a time each way of an exec's stream (a multiplexed stream carries at most
/// 16 KiB in a frame).
const EXEC_BUFFER: usize = 16 * 1024;

/// The read buffer of a multiplexed stream's request line.
const STREAM_REQUEST_BUFFER: usize = 1024;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The TLS files could not be read or do not fit together.
    #[error("TLS: {0}")]
    Tls(String),
    /// `tcp://` without TLS files, or other options that do not fit.
    #[error("{0}")]
    Options(String),
    /// The listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
}

/// The TLS files of a `tcp://` agent: the CA its clients' certificates are signed by, its
/// own certificate and key (a node's Docker API server certificate does).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate(s), PEM.
    pub ca: PathBuf,
    /// The agent's certificate chain, PEM.
    pub cert: PathBuf,
    /// The agent's private key, PEM.
    pub key: PathBuf,
}

/// What `labgate node-agent` was asked to do.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where it listens: `tcp://HOST:PORT` (TLS) or `unix:///PATH`.
    pub listen: EngineAddr,
    /// Required for `tcp://`.
    pub tls: Option<TlsFiles>,
    /// The node's Docker Engine socket.
    pub docker: PathBuf,
}

/// Serves until `stop` is cancelled; connections being served then are dropped with it.
pub async fn serve(options: AgentOptions, stop: CancellationToken) -> Result<(), AgentError> {
    let listener = Listener::bind(&options).await?;
    let engine = Engine::new(options.docker.clone());
    // The engine may start after the agent (a node booting): requests ask it when they come.
    let version = match engine.client().await {
        Ok(docker) => docker.version().await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match version {
        Ok(v) => tracing::info!(
            listen = %options.listen,
            engine = %v.version.unwrap_or_default(),
            "labgate node agent ready"
        ),
        Err(e) => tracing::warn!(
            listen = %options.listen,
            docker = %options.docker.display(),
            error = %e,
            "labgate node agent ready; the node's Docker Engine does not answer yet"
        ),
    }
    let engine = Arc::new(engine);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let engine = engine.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::select! {
                () = serve_one(stream, peer, engine) => {}
                () = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
    tracing::info!("labgate node agent stopping");
    Ok(())
}

/// The node's Docker Engine, its client made at the first request that finds its socket.
struct Engine {
    socket: PathBuf,
    client: tokio::sync::OnceCell<Docker>,
}

impl Engine {
    fn new(socket: PathBuf) -> Self {
        Engine {
            socket,
            client: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&Docker, String> {
        self.client
            .get_or_try_init(|| async {
                Docker::connect_with_unix(
                    &self.socket.to_string_lossy(),
                    10,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| format!("the node's Docker Engine: {e}"))
            })
            .await
    }
}

/// A connection accepted, TLS done where the agent speaks it.
type Accepted = Box<dyn Io>;

/// A byte stream both ways.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Where the agent listens.
enum Listener {
    Tcp(TcpListener, TlsAcceptor),
    Unix(UnixListener),
}

impl Listener {
    async fn bind(options: &AgentOptions) -> Result<Listener, AgentError> {
        let listen_error = |source| AgentError::Listen {
            addr: options.listen.to_string(),
            source,
        };
        match &options.listen {
            EngineAddr::Tcp { host, port } => {
                let files = options.tls.as_ref().ok_or_else(|| {
                    AgentError::Options(format!(
                        "{}: a tcp:// agent needs --tls-ca, --tls-cert and --tls-key (clients must present a certificate its CA signed)",
                        options.listen
                    ))
                })?;
                let acceptor = TlsAcceptor::from(server_tls(files).map_err(AgentError::Tls)?);
                let listener = TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(listen_error)?;
                Ok(Listener::Tcp(listener, acceptor))
            }
            EngineAddr::Unix(path) => {
                if options.tls.is_some() {
                    return Err(AgentError::Options(format!(
                        "{}: TLS applies to tcp:// only (a unix socket is reached by root alone)",
                        options.listen
                    )));
                }
                Ok(Listener::Unix(bind_private(path).map_err(listen_error)?))
            }
        }
    }

    /// The next connection and who it came from, TLS not done yet.
    async fn accept(&self) -> io::Result<(Pending, String)> {
        match self {
            Listener::Tcp(l, acceptor) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                // A gateway that vanished does not hold its containers' sockets for ever.
                crate::runtime::docker::dial::keepalive(&s)?;
                Ok((Pending::Tls(s, acceptor.clone()), peer.to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Pending::Plain(s), "unix".to_owned()))
            }
        }
    }
}

/// An accepted connection before its handshake.
enum Pending {
    Tls(tokio::net::TcpStream, TlsAcceptor),
    Plain(tokio::net::UnixStream),
}

impl Pending {
    async fn open(self) -> io::Result<Accepted> {
        match self {
            Pending::Tls(s, acceptor) => {
                // rustls reads the socket 4 KiB at a time: from a buffer, not a system call.
                let s = BufReader::with_capacity(crate::runtime::docker::dial::BULK_READ, s);
                Ok(Box::new(acceptor.accept(s).await?))
            }
            Pending::Plain(s) => Ok(Box::new(s)),
        }
    }
}

/// Binds a unix socket at `path` that only root can connect to: made in a private umask
/// (no moment with a wider mode), a stale socket from an earlier run replaced.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    bound
}

/// The agent's TLS: its certificate, and client certificates required, signed by `ca`.
fn server_tls(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, String> {
    use crate::runtime::docker::dial::{read_certs, read_key, read_roots, ring};
    let provider = ring();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(read_roots(&files.ca)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("{}: {e}", files.ca.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(&files.cert)?, read_key(&files.key)?)
        .map_err(|e| format!("{} and {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(Arc::new(config))
}

/// Serves one connection: its request, the answer, then the bytes both ways; or, asked to
/// multiplex, each of its streams so.
async fn serve_one(pending: Pending, peer: String, engine: Arc<Engine>) {
    let started = Instant::now();
    let opened = tokio::time::timeout(REQUEST_WAIT, async {
        let mut io = BufReader::new(pending.open().await?);
        let req = wire::read_line::<_, Request>(&mut io).await;
        Ok::<_, io::Error>((io, req))
    })
    .await;
    let (mut io, req) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "connection refused before its request");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "no request in time");
            return;
        }
    };
    let Some(req) = understood(&mut io, &peer, req).await else {
        return;
    };
    if req.to == Target::Mux {
        if let Err(e) = wire::write_line(&mut io, &Answer::Ok).await {
            tracing::debug!(%peer, error = %e, "the gateway went before the answer");
            return;
        }
        tracing::debug!(%peer, "multiplexing");
        mux::serve(io, &peer, |s| serve_stream(s, peer.clone(), engine.clone())).await;
        tracing::debug!(%peer, "multiplexed connection closed");
        return;
    }
    serve_request(io, req, &peer, &engine, started).await;
}

/// Serves one stream of a multiplexed connection: its request, the answer, the bytes.
async fn serve_stream(stream: MuxStream, peer: String, engine: Arc<Engine>) {
    let started = Instant::now();
    // Small: a request line, and what the gateway sends before the answer (nothing).
    let mut io = BufReader::with_capacity(STREAM_REQUEST_BUFFER, stream);
    let Ok(req) = tokio::time::timeout(REQUEST_WAIT, wire::read_line::<_, Request>(&mut io)).await
    else {
        tracing::info!(%peer, "no request in time on a stream");
        return;
    };
    let Some(req) = understood(&mut io, &peer, req).await else {
        return;
    };
    if req.to == Target::Mux {
        let message = "mux only as a connection's first request".to_owned();
        refuse(&mut io, &peer, Failure::BadRequest, message).await;
        return;
    }
    serve_request(io, req, &peer, &engine, started).await;
}

/// `req` when it was read and speaks this agent's version; otherwise the refusal sent.
async fn understood<W: AsyncWrite + Unpin>(
    io: &mut W,
    peer: &str,
    req: io::Result<Request>,
) -> Option<Request> {
    match req {
        Ok(req) if req.v == wire::VERSION => Some(req),
        Ok(req) => {
            let message = format!(
                "this agent speaks version {} of the protocol, the gateway version {}: run the same labgate release on the gateway and the nodes",
                wire::VERSION,
                req.v
            );
            refuse(io, peer, Failure::BadRequest, message).await;
            None
        }
        Err(e) => {
            refuse(io, peer, Failure::BadRequest, format!("bad request: {e}")).await;
            None
        }
    }
}

/// Connects where `req` asks, answers, and carries the bytes until both ends close.
async fn serve_request<T>(
    mut io: BufReader<T>,
    req: Request,
    peer: &str,
    engine: &Engine,
    started: Instant,
) where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    let within = Duration::from_millis(req.within_ms).min(CONNECT_MOST);
    let target = match connect(engine, &req, Instant::now() + within).await {
        Ok(t) => t,
        Err((kind, message)) => {
            refuse(&mut io, peer, kind, message).await;
            return;
        }
    };
    if let Err(e) = wire::write_line(&mut io, &Answer::Ok).await {
        tracing::debug!(%peer, error = %e, "the gateway went before the answer");
        return;
    }
    let ms = started.elapsed().as_millis();
    tracing::debug!(%peer, container = %req.container, to = ?req.to, ms, "joined");
    let joined = if matches!(req.to, Target::Exec { .. }) {
        join_exec(io, target).await
    } else {
        join(io, target).await
    };
    match joined {
        Ok((up, down)) => tracing::debug!(%peer, up, down, "closed"),
        Err(e) => tracing::debug!(%peer, error = %e, "ended"),
    }
}

/// Answers `Failed` and logs it.
async fn refuse<W: AsyncWrite + Unpin>(io: &mut W, peer: &str, kind: Failure, message: String) {
    tracing::debug!(%peer, ?kind, %message, "request refused");
    let _ = wire::write_line(io, &Answer::Failed { kind, message }).await;
}

/// Connects where `req` asks, from inside its container, within `deadline`.
async fn connect(
    engine: &Engine,
    req: &Request,
    deadline: Instant,
) -> Result<Accepted, (Failure, String)> {
    let docker = engine.client().await.map_err(|e| (Failure::Other, e))?;
    let (id, pid) = running_container(docker, &req.container).await?;
    let failed = |e: io::Error| (Failure::of(&e), e.to_string());
    // Nothing waits on the gateway's side of a connect: the deadline bounds it.
    let gone = CancellationToken::new();
    match &req.to {
        Target::Tcp(addrs) => {
            if addrs.is_empty() || addrs.len() > 64 {
                return Err((Failure::BadRequest, "between 1 and 64 addresses".into()));
            }
            let s = netns::connect_tcp(pid, addrs.clone(), deadline, &gone)
                .await
                .map_err(failed)?;
            Ok(Box::new(s))
        }
        Target::Unix { path, user } => {
            if !path.starts_with('/') {
                return Err((
                    Failure::BadRequest,
                    format!("{path:?} is not an absolute path"),
                ));
            }
            let who = user.clone().map(crate::runtime::Identity::from);
            let s = netns::connect_unix(pid, PathBuf::from(path), who.as_ref(), deadline, &gone)
                .await
                .map_err(failed)?;
            Ok(Box::new(s))
        }
        Target::Exec { id: exec, tty } => {
            let inspected = docker.inspect_exec(exec).await.map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => (Failure::NotFound, format!("no exec {exec} on this node")),
                other => (Failure::Other, format!("the node's Docker Engine: {other}")),
            })?;
            // Only a process of the container asked about, which is labgate's.
            if inspected.container_id.as_deref() != Some(id.as_str()) {
                return Err((
                    Failure::NoContainer,
                    format!("exec {exec} is not one of container {}", req.container),
                ));
            }
            let dial = crate::runtime::docker::dial::Dial::Unix(engine.socket.clone());
            let started = tokio::time::timeout_at(deadline, hijack(&dial, None, exec, *tty))
                .await
                .map_err(|_| {
                    (
                        Failure::TimedOut,
                        "the engine did not start the exec in time".to_owned(),
                    )
                })?
                .map_err(|e| (Failure::Other, e.to_string()))?;
            Ok(Box::new(TokioIo::new(started)))
        }
        Target::Mux => Err((Failure::BadRequest, "mux is not a place to connect".into())),
    }
}

/// The full id and the host PID of container `id`'s init, when it is a running labgate
/// container.
async fn running_container(docker: &Docker, id: &str) -> Result<(String, i32), (Failure, String)> {
    let no = |why: String| (Failure::NoContainer, why);
    let c = docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            } => no(format!("no container {id} on this node")),
            other => (Failure::Other, format!("the node's Docker Engine: {other}")),
        })?;
    let managed = c
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .and_then(|l| l.get(LABEL_MANAGED))
        .is_some_and(|v| v == "true");
    if !managed {
        return Err(no(format!("container {id} is not one labgate manages")));
    }
    let state = c.state.unwrap_or_default();
    match state.pid {
        Some(pid) if state.running == Some(true) && pid > 0 => {
            Ok((c.id.unwrap_or_else(|| id.to_owned()), pid as i32))
        }
        _ => Err(no(format!("container {id} is not running"))),
    }
}

/// Carries bytes both ways between the gateway's connection and the target until both
/// directions have ended, each end's write side shut down when its reader ends.
async fn join<A, B>(gateway: A, target: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Send + Unpin,
    B: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut from_gateway, mut to_gateway) = tokio::io::split(gateway);
    let (mut from_target, mut to_target) = tokio::io::split(target);
    let up = async {
        let n = tokio::io::copy_buf(
            &mut BufReader::with_capacity(UP_BUFFER, &mut from_gateway),
            &mut to_target,
        )
        .await?;
        to_target.shutdown().await?;
        Ok::<_, io::Error>(n)
    };
    let down = async {
        let n = copy_for_tls(&mut from_target, &mut to_gateway).await?;
        to_gateway.shutdown().await?;
        Ok::<_, io::Error>(n)
    };
    tokio::try_join!(up, down)
}

/// Carries an exec's stream both ways (stdin up, output down) until both directions have
/// ended: small buffers, since most sessions sit idle and each holds its own.
async fn join_exec<A, B>(mut gateway: A, mut target: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Send + Unpin,
    B: AsyncRead + AsyncWrite + Send + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(&mut gateway, &mut target, EXEC_BUFFER, EXEC_BUFFER)
        .await
}

/// Where in a buffer reads land, relative to a 64-byte line: rustls copies each record's
/// plaintext to just past its 5-byte header, and a copy between addresses equally placed in
/// their cache lines runs at full speed (`rep movsb`); misplaced, it took a third of the
/// agent's time.
const RECORD_ALIGN: usize = 5;

/// Copies `from` to `to` (a TLS stream) until `from` ends.
async fn copy_for_tls<R, W>(from: &mut R, to: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; PUMP_BUFFER + 64];
    let at = (64 + RECORD_ALIGN - buf.as_ptr() as usize % 64) % 64;
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf[at..at + PUMP_BUFFER]).await?;
        if n == 0 {
            to.flush().await?;
            return Ok(total);
        }
        to.write_all(&buf[at..at + n]).await?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[tokio::test]
    async fn the_unix_socket_is_roots_alone_replaces_a_stale_one_and_spares_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let first = bind_private(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(first);
        // A socket left by an earlier run is replaced.
        let _second = bind_private(&path).unwrap();
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "keep").unwrap();
        let e = bind_private(&file).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }

    #[tokio::test]
    async fn a_tcp_agent_without_tls_files_and_a_unix_one_with_them_are_refused() {
        let tcp = AgentOptions {
            listen: EngineAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
            tls: None,
            docker: "/nonexistent.sock".into(),
        };
        let e = serve(tcp, CancellationToken::new()).await.unwrap_err();
        assert!(e.to_string().contains("needs --tls-ca"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let unix = AgentOptions {
            listen: EngineAddr::Unix(dir.path().join("a.sock")),
            tls: Some(TlsFiles {
                ca: "ca.pem".into(),
                cert: "cert.pem".into(),
                key: "key.pem".into(),
            }),
            docker: "/nonexistent.sock".into(),
        };
        let e = serve(unix, CancellationToken::new()).await.unwrap_err();
        assert!(e.to_string().contains("TLS applies to tcp:// only"), "{e}");
    }

    #[tokio::test]
    async fn a_multiplexed_stream_cannot_multiplex_again_and_says_why_an_exec_failed() {
        let (gateway, agent) = tokio::io::duplex(1 << 16);
        let engine = Arc::new(Engine::new("/nonexistent/docker.sock".into()));
        tokio::spawn(async move {
            mux::serve(agent, "test", |s| {
                serve_stream(s, "test".into(), engine.clone())
            })
            .await;
        });
        let mux = mux::Mux::start(Box::new(gateway), "test".into());
        let ask = |to: Target| {
            let mux = &mux;
            async move {
                let mut s = BufReader::new(mux.open().await.unwrap());
                let req = Request {
                    v: wire::VERSION,
                    container: "c".into(),
                    to,
                    within_ms: 1000,
                };
                wire::write_line(&mut s, &req).await.unwrap();
                wire::read_line::<_, Answer>(&mut s).await.unwrap()
            }
        };
        let Answer::Failed { kind, message } = ask(Target::Mux).await else {
            panic!("a second mux was accepted");
        };
        assert_eq!(kind, Failure::BadRequest);
        assert!(message.contains("first request"), "{message}");
        let exec = Target::Exec {
            id: "e".into(),
            tty: false,
        };
        let Answer::Failed { kind, message } = ask(exec).await else {
            panic!("an exec without an engine was started");
        };
        assert_eq!(kind, Failure::Other);
        assert!(message.contains("Docker Engine"), "{message}");
    }

    #[tokio::test]
    async fn joined_streams_carry_both_ways_and_pass_each_half_close_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (gateway, mut gateway_far) = tokio::io::duplex(1 << 16);
        let (target, mut target_far) = tokio::io::duplex(1 << 16);
        let joined = tokio::spawn(join(gateway, target));
        gateway_far.write_all(b"request").await.unwrap();
        gateway_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        target_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the target saw the request and its end");
        // The answer still flows after the gateway's half-close.
        let answer = vec![9u8; 300_000];
        let sent = answer.clone();
        let writer = tokio::spawn(async move {
            target_far.write_all(&sent).await.unwrap();
            target_far.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        gateway_far.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back, answer);
        assert_eq!(joined.await.unwrap().unwrap(), (7, 300_000));
    }
}
