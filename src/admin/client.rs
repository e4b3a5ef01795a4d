//! The client side of the admin socket, shared by the commands of [`super::cmd`]: one
//! HTTP/1.1 request over the Unix socket, the answer as text, and its JSON read into the
//! command's answer type.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket does not answer.
    #[error(
        "cannot reach the gateway's admin socket {path}: {source} (is labgate running with this config? the socket is root-only)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("admin socket {path}: {message}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The gateway refused or failed the request.
    #[error("the gateway answered {status}: {message}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Its error message.
        message: String,
    },
    /// The gateway's answer does not parse as this labgate's answer to the command.
    #[error("the gateway's {command} answer is not what this labgate expects")]
    Answer {
        /// The command.
        command: &'static str,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads a successful answer's JSON `body` as `command`'s answer type.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    command: &'static str,
    body: &str,
) -> Result<T, ClientError> {
    serde_json::from_str(body).map_err(|source| ClientError::Answer { command, source })
}

/// Sends `method path` to the gateway at `socket`; returns the body of a successful answer.
pub(crate) async fn request(
    socket: &Path,
    method: Method,
    path: &str,
) -> Result<String, ClientError> {
    let protocol = |message: String| ClientError::Protocol {
        path: socket.to_owned(),
        message,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "labgate")
        .body(Empty::<Bytes>::new())
        .map_err(|e| protocol(e.to_string()))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| protocol(e.to_string()))?
        .to_bytes();
    driver.abort();
    let text = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(text)
    } else {
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(ClientError::Refused { status, message })
    }
}
