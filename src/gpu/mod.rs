//! GPUs: what the host has, who holds which, and handing them to containers.
//!
//! Owns the GPU inventory ([`GpuInventory`], implemented over NVML in [`nvml`]), the pure
//! allocation rules ([`allocator`]: exclusive or shared, least-used first, pinned GPUs,
//! rebuilt from container labels, resume of a container whose GPUs were taken), and the
//! GPU pool of the local backend (`runtime::docker::pool`), which ties them to container starts. GPUs are always named by
//! UUID ([`GpuUuid`]) when they leave this module: indices change with driver and PCI order.
//! The pure decisions above the seam live here too: the order of the GPU queue ([`queue`])
//! and which idle holder is warned and stopped for it ([`reclaim`]).
//!
//! NVML is optional: a host without the library (every CPU-only machine) runs the gateway
//! normally; logins whose quota asks for GPUs are refused with a message saying why.

pub mod allocator;
pub mod nvml;
pub mod queue;
pub mod reclaim;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::auth::Username;
pub use crate::config::GpuUuid;

/// One GPU as the inventory saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// NVML index (what `nvidia-smi` shows; may change across reboots).
    pub index: u32,
    /// Stable identity, what containers are given.
    pub uuid: GpuUuid,
    /// Product name (`NVIDIA A100-SXM4-80GB`).
    pub name: String,
    /// Memory in bytes.
    pub memory_total: u64,
    /// MIG mode: `None` when the GPU has no MIG support, else whether it is enabled.
    pub mig_mode: Option<bool>,
    /// Percent of time a kernel ran over the last sample period, if the GPU reports it.
    pub utilization: Option<u32>,
    /// Memory in use, in bytes.
    pub memory_used: u64,
    /// Compute processes running on it (host PIDs).
    pub processes: Vec<GpuProcess>,
}

impl GpuInfo {
    /// Whether containers can be given this GPU whole: not in MIG mode (a MIG-enabled GPU
    /// only runs work through its MIG instances, which labgate does not hand out).
    pub fn allocatable(&self) -> bool {
        self.mig_mode != Some(true)
    }
}

/// A compute process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcess {
    /// Host PID.
    pub pid: u32,
    /// GPU memory it uses, in bytes, when the driver says.
    pub memory_used: Option<u64>,
}

/// Lists the host's GPUs with their live use. Implemented over NVML ([`nvml::NvmlInventory`]);
/// tests use fakes.
#[async_trait]
pub trait GpuInventory: Send + Sync {
    /// The GPUs, ordered by index.
    async fn list(&self) -> Result<Vec<GpuInfo>, GpuError>;
}

/// What can go wrong with GPUs, phrased for the user who asked for them.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML could not be loaded or initialized on this host.
    #[error(
        "your quota asks for {wanted} GPU(s), but GPUs are not available on this host ({reason}); ask your admin"
    )]
    Unavailable {
        /// GPUs the quota asks for.
        wanted: usize,
        /// Why NVML is unavailable.
        reason: String,
    },
    /// NVML could not be loaded (for the admin's `labgate gpus`).
    #[error("GPUs are not available on this host: {0}")]
    NoNvml(String),
    /// NVML is loaded but a query failed.
    #[error("the GPU inventory failed ({0}); ask your admin")]
    Inventory(String),
    /// Not enough GPUs are free, or a pinned one is unknown or taken.
    #[error(transparent)]
    Allocation(#[from] allocator::AllocError),
    /// The container engine has no GPU support (no NVIDIA container runtime).
    #[error(
        "the container engine on this host cannot give containers GPUs ({0}): the NVIDIA container toolkit is not set up; ask your admin"
    )]
    NoGpuRuntime(String),
    /// Other logins wait for GPUs ahead of this one (the queue decides who takes free GPUs).
    #[error("other logins are waiting for GPUs ahead of yours")]
    Waiting,
    /// The login waited in line for GPUs as long as `[gpu] max_wait` allows.
    #[error(
        "no GPU became free for you within {} ([gpu] max_wait); try again later, or ask your admin",
        humantime::format_duration(*.0)
    )]
    WaitedTooLong(std::time::Duration),
}

impl GpuError {
    /// Whether waiting can help: the GPUs exist but are held by others (not: too many asked
    /// for, an unknown pin, no NVML, no GPU runtime).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            GpuError::Waiting
                | GpuError::Allocation(
                    allocator::AllocError::NotEnough { .. }
                        | allocator::AllocError::PinnedTaken { .. }
                )
        )
    }
}

impl crate::codes::Coded for GpuError {
    fn code(&self) -> crate::codes::Code {
        use crate::codes::Code;
        match self {
            GpuError::Unavailable { .. } | GpuError::NoNvml(_) => Code::GpuUnavailable,
            GpuError::Inventory(_) => Code::GpuInventory,
            GpuError::Allocation(_) => Code::GpuBusy,
            GpuError::NoGpuRuntime(_) => Code::GpuNoRuntime,
            GpuError::Waiting => Code::GpuBusy,
            GpuError::WaitedTooLong(_) => Code::GpuWaitedTooLong,
        }
    }
}

/// The GPU table of `labgate gpus`: one line per GPU with its memory, use and holders.
/// `holders` is `None` when they are unknown (Docker unreachable): shown as `?`.
pub fn render_table(
    gpus: &[GpuInfo],
    holders: Option<&BTreeMap<GpuUuid, Vec<Username>>>,
) -> String {
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    let mut rows = vec![[
        "INDEX".to_owned(),
        "UUID".to_owned(),
        "NAME".to_owned(),
        "MEMORY".to_owned(),
        "UTIL".to_owned(),
        "MIG".to_owned(),
        "PROCS".to_owned(),
        "HOLDER".to_owned(),
    ]];
    for g in gpus {
        let held = match holders {
            None => "?".to_owned(),
            Some(holders) => holders
                .get(&g.uuid)
                .filter(|h| !h.is_empty())
                .map(|h| h.iter().map(Username::as_str).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "-".to_owned()),
        };
        rows.push([
            g.index.to_string(),
            g.uuid.to_string(),
            g.name.clone(),
            format!("{:.1}/{:.1} GiB", gib(g.memory_used), gib(g.memory_total)),
            g.utilization
                .map_or_else(|| "-".to_owned(), |u| format!("{u}%")),
            match g.mig_mode {
                None => "-",
                Some(true) => "on",
                Some(false) => "off",
            }
            .to_owned(),
            g.processes.len().to_string(),
            held,
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// One line per GPU for a login banner: index, name, use and memory.
pub fn render_banner(gpus: &[GpuInfo]) -> String {
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    gpus.iter()
        .map(|g| {
            let util = g
                .utilization
                .map_or_else(|| "?".to_owned(), |u| format!("{u}%"));
            format!(
                "GPU {} {} ({}): {util} busy, {:.1}/{:.1} GiB used\n",
                g.index,
                g.name,
                g.uuid,
                gib(g.memory_used),
                gib(g.memory_total)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn uuid(s: &str) -> GpuUuid {
        GpuUuid::parse(s).unwrap()
    }

    #[test]
    fn uuids_are_checked() {
        assert!(GpuUuid::parse("GPU-8c5a3b1e-0f9d-4d5e-9b1a-2f3c4d5e6f70").is_ok());
        assert!(GpuUuid::parse("MIG-GPU-8c5a3b1e/1/0").is_ok());
        for bad in [
            "",
            "GPU-",
            "gpu-1",
            "8c5a3b1e",
            "GPU-a,GPU-b",
            "GPU-a b",
            "GPU-ä",
        ] {
            assert!(GpuUuid::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_lists_round_trip_and_skip_garbage() {
        let list = vec![uuid("GPU-a"), uuid("GPU-b")];
        assert_eq!(GpuUuid::join(&list), "GPU-a,GPU-b");
        assert_eq!(GpuUuid::parse_list("GPU-a, GPU-b"), list);
        assert_eq!(
            GpuUuid::parse_list("GPU-a,nonsense,,GPU-b"),
            list,
            "a hand-edited label cannot inject anything"
        );
        assert!(GpuUuid::parse_list("").is_empty());
    }

    fn info(index: u32, uuid_s: &str) -> GpuInfo {
        GpuInfo {
            index,
            uuid: uuid(uuid_s),
            name: "NVIDIA A100-SXM4-80GB".into(),
            memory_total: 80 << 30,
            mig_mode: Some(false),
            utilization: Some(30),
            memory_used: 1 << 30,
            processes: vec![GpuProcess {
                pid: 42,
                memory_used: Some(1 << 30),
            }],
        }
    }

    #[test]
    fn the_table_shows_use_and_holders() {
        let gpus = vec![info(0, "GPU-aaaa"), {
            let mut g = info(1, "GPU-bbbb");
            g.utilization = None;
            g.mig_mode = None;
            g.processes.clear();
            g
        }];
        let holders = BTreeMap::from([(
            uuid("GPU-aaaa"),
            vec![
                Username::parse("alice").unwrap(),
                Username::parse("bob").unwrap(),
            ],
        )]);
        let table = render_table(&gpus, Some(&holders));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("INDEX  UUID"), "{table}");
        assert!(lines[1].starts_with("0      GPU-aaaa  NVIDIA A100-SXM4-80GB  1.0/80.0 GiB  30%"));
        assert!(lines[1].ends_with("off  1      alice,bob"), "{table}");
        assert!(lines[2].ends_with("-     -    0      -"), "{table}");
        let unknown = render_table(&gpus, None);
        assert!(
            unknown.lines().nth(1).unwrap().ends_with("  ?"),
            "{unknown}"
        );
    }

    #[test]
    fn the_banner_names_each_gpu() {
        let banner = render_banner(&[info(3, "GPU-cccc")]);
        assert_eq!(
            banner,
            "GPU 3 NVIDIA A100-SXM4-80GB (GPU-cccc): 30% busy, 1.0/80.0 GiB used\n"
        );
    }

    #[test]
    fn mig_enabled_gpus_are_not_handed_out_whole() {
        let mut g = info(0, "GPU-a");
        assert!(g.allocatable());
        g.mig_mode = None;
        assert!(g.allocatable());
        g.mig_mode = Some(true);
        assert!(!g.allocatable());
    }
}
