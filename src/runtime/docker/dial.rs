//! Connections of labgate's own to a Docker API: the engine's unix socket, or a swarm node's
//! `tcp://` API with TLS (client certificate from `[cluster] tls_dir`). [`Dial`] opens one
//! (the hijacked exec stream, a forward's bulk bytes); [`Api`] keeps a pool of them for
//! bollard's calls and labgate's own requests. A TCP connection gets keepalives and a user
//! timeout, so one to a node whose network vanished ends within about [`DEAD_PEER_AFTER`]
//! instead of hanging for the kernel's minutes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::sockopt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use crate::runtime::reach::BoxedStream;

/// The read buffer under the TLS of a bulk connection ([`Dial::connect_bulk`]).
pub const BULK_READ: usize = 64 * 1024;

/// How long a peer may stay silent (no ACK, no keepalive answer) before the connection is
/// given up: idle 10 s, then 3 probes 5 s apart; unacknowledged data: 30 s.
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(30);

/// Where to open a connection to a Docker API.
#[derive(Clone)]
pub enum Dial {
    /// A unix socket.
    Unix(PathBuf),
    /// TCP with TLS.
    Tls {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The name the server's certificate must have (a DNS name or an address).
        server: ServerName<'static>,
        /// Client certificate, CA.
        connector: TlsConnector,
    },
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dial::Unix(p) => write!(f, "unix://{}", p.display()),
            Dial::Tls { host, port, .. } => write!(f, "tcp://{host}:{port} (TLS)"),
        }
    }
}

impl Dial {
    /// TLS to `host:port` with `config`.
    pub fn tls(host: &str, port: u16, config: Arc<rustls::ClientConfig>) -> Result<Dial, String> {
        let server = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} is not a host name or address: {e}"))?;
        Ok(Dial::Tls {
            host: host.to_owned(),
            port,
            server,
            connector: TlsConnector::from(config),
        })
    }

    /// A new connection, within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> io::Result<BoxedStream> {
        self.open(timeout, false).await
    }

    /// A new connection for bulk data, within `timeout`: TLS reads its records from a
    /// [`BULK_READ`] buffer (rustls reads the socket 4 KiB at a time, a system call each;
    /// a forward's hundreds of MB/s would spend more on those calls than on the crypto).
    /// Only for connections that live while they carry data: the buffer stays with them.
    pub async fn connect_bulk(&self, timeout: Duration) -> io::Result<BoxedStream> {
        self.open(timeout, true).await
    }

    async fn open(&self, timeout: Duration, bulk: bool) -> io::Result<BoxedStream> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, format!("{self:?}: no answer"));
        match self {
            Dial::Unix(path) => {
                let s = tokio::time::timeout(timeout, UnixStream::connect(path))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                Ok(Box::new(s))
            }
            Dial::Tls {
                host,
                port,
                server,
                connector,
            } => {
                let open = async {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    keepalive(&tcp)?;
                    tcp.set_nodelay(true)?;
                    let s: BoxedStream = if bulk {
                        let tcp = tokio::io::BufReader::with_capacity(BULK_READ, tcp);
                        Box::new(connector.connect(server.clone(), tcp).await?)
                    } else {
                        Box::new(connector.connect(server.clone(), tcp).await?)
                    };
                    Ok(s)
                };
                tokio::time::timeout(timeout, open)
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e: io::Error| io::Error::new(e.kind(), format!("{self:?}: {e}")))
            }
        }
    }
}

/// The request body of bollard's calls, which [`Api`]'s pool also carries for labgate's own.
type Body = http_body_util::Either<
    http_body_util::Full<bytes::Bytes>,
    http_body_util::StreamBody<
        std::pin::Pin<
            Box<
                dyn futures::Stream<Item = Result<hyper::body::Frame<bytes::Bytes>, io::Error>>
                    + Send,
            >,
        >,
    >,
>;

/// A Docker API reached by a [`Dial`], its HTTP/1.1 connections kept open between calls
/// (idle ones closed after [`POOL_IDLE`]): a new TLS connection costs a handshake of several
/// milliseconds, and a warm login makes four calls to its node. Connections get
/// `TCP_NODELAY` and the keepalives of [`keepalive`] (see [`Dial`]), so a pooled connection
/// to a node that vanished errs instead of hanging. Bollard's calls ([`Api::docker`]) and
/// labgate's own ([`Api::call`]) share the pool.
#[derive(Clone)]
pub struct Api {
    client: hyper_util::client::legacy::Client<Connector, Body>,
    dial: Arc<Dial>,
    timeout: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.dial.fmt(f)
    }
}

/// An answer of [`Api::call`]: status, headers, body.
pub struct Answer {
    /// The HTTP status.
    pub status: hyper::StatusCode,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The whole body.
    pub body: bytes::Bytes,
}

impl Api {
    /// The API at `dial`; every call within `timeout`. Nothing is connected yet.
    pub fn new(dial: Dial, timeout: Duration) -> Api {
        let dial = Arc::new(dial);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE)
                .pool_max_idle_per_host(POOL_MAX_IDLE)
                .build(Connector {
                    dial: dial.clone(),
                    timeout,
                });
        Api {
            client,
            dial,
            timeout,
        }
    }

    /// How its connections are opened (also for the streams it does not pool: an exec's).
    pub fn dial(&self) -> &Dial {
        &self.dial
    }

    /// A bollard client whose calls go over the pool.
    pub fn docker(&self) -> Result<bollard::Docker, bollard::errors::Error> {
        let api = self.clone();
        bollard::Docker::connect_with_custom_transport(
            move |req: bollard::BollardRequest| {
                let api = api.clone();
                async move {
                    api.send(req)
                        .await
                        .map_err(|err| bollard::errors::Error::HyperLegacyError { err })
                }
            },
            Some("http://docker"),
            self.timeout.as_secs().max(1),
            bollard::API_DEFAULT_VERSION,
        )
    }

    /// `method path` (origin form, `/v1.41/...`) with no body, its whole answer read, within
    /// the timeout.
    pub async fn call(&self, method: hyper::Method, path: &str) -> io::Result<Answer> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .body(http_body_util::Either::Left(http_body_util::Full::new(
                bytes::Bytes::new(),
            )))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let ask = async {
            use http_body_util::BodyExt;
            let resp = self.send(req).await.map_err(io::Error::other)?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, ask)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
    }

    /// Sends `req` on a pooled connection (its authority replaced: one pool key whatever
    /// bollard wrote; the engine reads no Host).
    async fn send(
        &self,
        mut req: hyper::Request<Body>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        if let Ok(uri) = format!("http://docker{path}").parse() {
            *req.uri_mut() = uri;
        }
        self.client.request(req).await
    }
}

/// `s` escaped for a URL's query.
pub fn escape_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// How long a pooled API connection may sit idle before it is closed.
pub const POOL_IDLE: Duration = Duration::from_secs(30);

/// Idle API connections kept per engine.
const POOL_MAX_IDLE: usize = 4;

/// Opens the connections of an [`Api`]'s pool.
#[derive(Clone)]
struct Connector {
    dial: Arc<Dial>,
    timeout: Duration,
}

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<Pooled>;
    type Error = io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let (dial, timeout) = (self.dial.clone(), self.timeout);
        Box::pin(async move {
            let stream = dial.connect(timeout).await?;
            Ok(hyper_util::rt::TokioIo::new(Pooled(stream)))
        })
    }
}

/// A connection in an [`Api`]'s pool.
struct Pooled(BoxedStream);

impl hyper_util::client::legacy::connect::Connection for Pooled {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl tokio::io::AsyncRead for Pooled {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Pooled {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Keepalives and a user timeout on `tcp` (see [`DEAD_PEER_AFTER`]).
pub(crate) fn keepalive(tcp: &TcpStream) -> io::Result<()> {
    sockopt::set_socket_keepalive(tcp, true)?;
    sockopt::set_tcp_keepidle(tcp, Duration::from_secs(10))?;
    sockopt::set_tcp_keepintvl(tcp, Duration::from_secs(5))?;
    sockopt::set_tcp_keepcnt(tcp, 3)?;
    let ms = u32::try_from(DEAD_PEER_AFTER.as_millis()).unwrap_or(u32::MAX);
    sockopt::set_tcp_user_timeout(tcp, ms)?;
    Ok(())
}

/// The TLS client of the files in `dir` (`ca.pem`, `cert.pem`, `key.pem`: Docker's
/// `DOCKER_CERT_PATH` layout); an error names the file and what is wrong with it.
pub fn tls_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let file = |name: &str| dir.join(name);
    let roots = read_roots(&file("ca.pem"))?;
    let chain = read_certs(&file("cert.pem"))?;
    let key = read_key(&file("key.pem"))?;
    let config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Arc::new(config))
}

/// The certificates in the PEM file at `path` (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The CA certificates in the PEM file at `path`, as trust roots.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(path)? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The private key in the PEM file at `path`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// ring, as bollard's own TLS uses (aws-lc would need a C toolchain with cmake); the
/// deprecation is about post-quantum key exchange, which Docker's API does not offer.
/// AES-128-GCM is put first: as safe here, and cheaper per byte than AES-256 for the
/// forwards that go through a node's agent.
#[allow(deprecated)]
pub fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tls_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = tls_config(dir.path()).unwrap_err();
        assert!(e.contains("ca.pem"), "{e}");
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let e = tls_config(dir.path()).unwrap_err();
        assert!(e.contains("ca.pem: no certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_dead_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = Dial::Unix(dir.path().join("none.sock"))
            .connect(Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("none.sock"), "{e}");
    }
}
