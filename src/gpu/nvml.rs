//! The GPU inventory over NVML (through nvml-wrapper, which `dlopen`s the library).
//!
//! NVML calls block (a GPU that fell off the bus can take seconds to answer), so every call
//! runs in `spawn_blocking` and is bounded by [`QUERY_TIMEOUT`]; the async runtime never waits
//! on the driver. The library is loaded once, from `[gpu] nvml_library`.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::{GpuError, GpuInfo, GpuInventory, GpuProcess, GpuUuid};

/// Bound on one inventory query (all GPUs).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// NVML, loaded and initialized.
pub struct NvmlInventory {
    /// Shared with the blocking tasks that query it.
    nvml: Arc<Nvml>,
}

impl NvmlInventory {
    /// Loads `library` (a path, or a bare name the dynamic loader searches) and initializes
    /// NVML. The error says why in words an admin can act on.
    pub async fn open(library: OsString) -> Result<Self, String> {
        let shown = library.to_string_lossy().into_owned();
        let init = tokio::task::spawn_blocking(move || Nvml::builder().lib_path(&library).init());
        match tokio::time::timeout(QUERY_TIMEOUT, init).await {
            Err(_) => Err(format!("NVML initialization ({shown}) did not answer")),
            Ok(Err(e)) => Err(format!("NVML initialization ({shown}) failed: {e}")),
            Ok(Ok(Err(e))) => Err(describe_init_error(&shown, &e)),
            Ok(Ok(Ok(nvml))) => Ok(Self {
                nvml: Arc::new(nvml),
            }),
        }
    }
}

fn describe_init_error(library: &str, e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(inner) => format!("cannot load the NVML library ({inner})"),
        NvmlError::DriverNotLoaded => format!("{library}: the NVIDIA driver is not loaded"),
        NvmlError::NoPermission => format!("{library}: no permission to talk to the NVIDIA driver"),
        other => format!("{library}: {other}"),
    }
}

/// Reads every GPU. A GPU that fails its identity queries is skipped with a warning (a lost
/// GPU must not hide the others); optional live values that are not supported are `None`.
fn query(nvml: &Nvml) -> Result<Vec<GpuInfo>, GpuError> {
    let count = nvml
        .device_count()
        .map_err(|e| GpuError::Inventory(format!("device count: {e}")))?;
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        match query_device(nvml, index) {
            Ok(info) => gpus.push(info),
            Err(e) => tracing::warn!(index, "GPU skipped: {e}"),
        }
    }
    Ok(gpus)
}

fn query_device(nvml: &Nvml, index: u32) -> Result<GpuInfo, String> {
    let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
    let uuid = device.uuid().map_err(|e| format!("uuid: {e}"))?;
    let uuid = GpuUuid::parse(&uuid)?;
    let name = device.name().map_err(|e| format!("name: {e}"))?;
    let memory = device.memory_info().map_err(|e| format!("memory: {e}"))?;
    let mig_mode = match device.mig_mode() {
        Ok(mode) => Some(mode.current == 1),
        Err(NvmlError::NotSupported) => None,
        Err(e) => return Err(format!("MIG mode: {e}")),
    };
    let utilization = match device.utilization_rates() {
        Ok(u) => Some(u.gpu),
        Err(e) => {
            tracing::debug!(index, "utilization: {e}");
            None
        }
    };
    let processes = match device.running_compute_processes() {
        Ok(list) => list
            .into_iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                memory_used: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect(),
        Err(e) => {
            tracing::debug!(index, "processes: {e}");
            Vec::new()
        }
    };
    Ok(GpuInfo {
        index,
        uuid,
        name,
        memory_total: memory.total,
        mig_mode,
        utilization,
        memory_used: memory.used,
        processes,
    })
}

#[async_trait]
impl GpuInventory for NvmlInventory {
    async fn list(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let nvml = self.nvml.clone();
        let task = tokio::task::spawn_blocking(move || query(&nvml));
        match tokio::time::timeout(QUERY_TIMEOUT, task).await {
            Err(_) => Err(GpuError::Inventory(format!(
                "NVML did not answer within {}s",
                QUERY_TIMEOUT.as_secs()
            ))),
            Ok(Err(e)) => Err(GpuError::Inventory(format!("NVML query failed: {e}"))),
            Ok(Ok(result)) => result,
        }
    }
}
