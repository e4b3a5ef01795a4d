//! `labgate gpus` (`GET /gpus`): the host's GPUs with the users whose containers hold each.
//! The answer is the table itself (text, not JSON); without a gateway on the socket the CLI
//! reads NVML and the containers' labels directly.

use std::path::Path;

use crate::admin::client::{self, ClientError};
use crate::config::ConfigError;
use crate::gpu::GpuError;
use crate::login::Context;

/// The route on the admin socket.
pub(crate) const PATH: &str = "/gpus";

/// Why `labgate gpus` printed no table.
#[derive(Debug, thiserror::Error)]
pub enum GpusError {
    /// The gateway answered with an error, or the exchange failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// No gateway answered and the config (for NVML and the engine) did not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No gateway answered and NVML or the engine could not be read.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// The handler: the GPU table with this gateway's holdings.
pub(crate) async fn table(ctx: &Context) -> Result<String, GpuError> {
    let gpus = ctx.runtime.gpus().await?;
    Ok(crate::gpu::render_table(
        &gpus,
        Some(&ctx.runtime.gpu_holders()),
    ))
}

/// The CLI side: the table from the gateway at `socket`; when none answers there, says so on
/// stderr and builds it from NVML and the engine as the config at `config` describes them.
pub async fn call(socket: &Path, config: &Path) -> Result<String, GpusError> {
    match client::request(socket, hyper::Method::GET, PATH).await {
        Ok(table) => Ok(table),
        Err(ClientError::Connect { .. }) => {
            eprintln!(
                "labgate: no gateway answers on {}: reading NVML and container labels directly",
                socket.display()
            );
            let loaded = crate::config::load(config)?;
            Ok(crate::runtime::gpu_report(&loaded).await?)
        }
        Err(e) => Err(e.into()),
    }
}
