//! Connections of labgate's own to a Docker API, for what bollard's client does not carry
//! (the hijacked exec stream): the engine's unix socket, or a swarm node's `tcp://` API with
//! TLS (client certificate from `[cluster] tls_dir`). A TCP connection gets keepalives and a
//! user timeout, so one to a node whose network vanished ends within about
//! [`DEAD_PEER_AFTER`] instead of hanging for the kernel's minutes.

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

/// A bollard client whose requests go over connections of `dial`'s (one per request: TLS
/// with `TCP_NODELAY` and session resumption costs about a round trip, where bollard's own
/// TLS transport, with Nagle's algorithm on, waited for a delayed ACK on every call).
pub fn docker_over(
    dial: Dial,
    timeout: Duration,
) -> Result<bollard::Docker, bollard::errors::Error> {
    let dial = Arc::new(dial);
    bollard::Docker::connect_with_custom_transport(
        move |req: bollard::BollardRequest| {
            let dial = dial.clone();
            async move {
                let io_err = |err: io::Error| bollard::errors::Error::IOError { err };
                let (mut parts, body) = req.into_parts();
                // Origin form and a Host header, as the Engine's HTTP/1.1 server expects.
                let path = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .parse::<hyper::Uri>()
                    .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                parts.uri = path;
                parts.headers.insert(
                    hyper::header::HOST,
                    hyper::header::HeaderValue::from_static("docker"),
                );
                let stream = dial.connect(timeout).await.map_err(io_err)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|err| bollard::errors::Error::HyperResponseError { err })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("engine connection ended: {e}");
                    }
                });
                sender
                    .send_request(hyper::Request::from_parts(parts, body))
                    .await
                    .map_err(|err| bollard::errors::Error::HyperResponseError { err })
            }
        },
        Some("http://docker"),
        timeout.as_secs().max(1),
        bollard::API_DEFAULT_VERSION,
    )
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
