//! The GPU parts of the config: the `[gpu]` section and the `gpus` quota field.
//!
//! `gpus` is either a count (`gpus = 2`: any two free GPUs) or a list that pins GPUs by UUID
//! or index (`gpus = ["GPU-8c5a...", 3]`). The section says where NVML is and how GPUs are
//! shared: `mode = "exclusive"` (one running container per GPU, the default) or `"shared"`
//! with `max_per_gpu`.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::ConfigError;
use super::raw::Positive;
use super::validation::Validator;

/// The library name NVIDIA's driver installs (the unversioned `.so` needs the dev package).
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// `max_per_gpu` when `mode = "shared"` does not set it.
pub const DEFAULT_MAX_PER_GPU: u32 = 2;

/// Default of `[gpu] busy_utilization`, in percent.
pub const DEFAULT_BUSY_UTILIZATION: u32 = 5;

/// Default of `[gpu] max_wait`: how long a login waits in the GPU queue.
pub const DEFAULT_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Default of `[gpu] fair_share_half_life`: how fast past GPU use stops counting.
pub const DEFAULT_FAIR_SHARE_HALF_LIFE: std::time::Duration =
    std::time::Duration::from_secs(7 * 86_400);

/// Default of `[gpu] reclaim_warning`: how long before a reclaim its owner is warned.
pub const DEFAULT_RECLAIM_WARNING: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// `[gpu]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuConfig {
    /// A login whose GPUs are not free waits in line (`true`) or is refused at once.
    pub queue: bool,
    /// Longest wait in line; past it the login ends with a message.
    pub max_wait: std::time::Duration,
    /// Recent GPU use, which orders the line, halves every this long.
    pub fair_share_half_life: std::time::Duration,
    /// The NVML library: a path (relative ones resolved against the config directory), or a
    /// bare file name that the dynamic loader searches for.
    pub nvml_library: OsString,
    /// How GPUs are shared between running containers.
    pub mode: GpuMode,
    /// A container whose GPUs are this busy (percent utilisation, any of them) counts as in
    /// use for idle stop even with no SSH connection open.
    pub busy_utilization: u32,
    /// While a login waits for GPUs, a container whose GPUs have all been idle (at most
    /// `busy_utilization`) this long is warned and then stopped for it; `None` (the default,
    /// `"never"`): GPUs are never reclaimed.
    pub reclaim_idle: Option<std::time::Duration>,
    /// How long a reclaim's warning comes before the stop: use in that window calls it off.
    pub reclaim_warning: std::time::Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            queue: true,
            max_wait: DEFAULT_MAX_WAIT,
            fair_share_half_life: DEFAULT_FAIR_SHARE_HALF_LIFE,
            nvml_library: DEFAULT_NVML_LIBRARY.into(),
            mode: GpuMode::Exclusive,
            busy_utilization: DEFAULT_BUSY_UTILIZATION,
            reclaim_idle: None,
            reclaim_warning: DEFAULT_RECLAIM_WARNING,
        }
    }
}

/// How many running containers may hold one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuMode {
    /// A GPU belongs to one running container at a time.
    Exclusive,
    /// A GPU may be held by up to `max_per_gpu` running containers.
    Shared {
        /// Containers per GPU, at least 1.
        max_per_gpu: u32,
    },
}

impl GpuMode {
    /// Running containers one GPU may serve.
    pub fn capacity(self) -> usize {
        match self {
            GpuMode::Exclusive => 1,
            GpuMode::Shared { max_per_gpu } => max_per_gpu as usize,
        }
    }
}

/// The `gpus` quota field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    /// This many GPUs, whichever are free (0: none).
    Count(u32),
    /// Exactly these GPUs (never empty; an empty list reads as `Count(0)`).
    Pinned(Vec<GpuPin>),
}

impl Default for GpuRequest {
    fn default() -> Self {
        GpuRequest::Count(0)
    }
}

impl GpuRequest {
    /// How many GPUs this asks for.
    pub fn count(&self) -> usize {
        match self {
            GpuRequest::Count(n) => *n as usize,
            GpuRequest::Pinned(pins) => pins.len(),
        }
    }
}

/// A request equals a number when it asks for that many GPUs (`quota.gpus == 0`).
impl PartialEq<u32> for GpuRequest {
    fn eq(&self, n: &u32) -> bool {
        self.count() == *n as usize
    }
}

/// A GPU's UUID as NVML reports it (`GPU-8c5a3b1e-...`), the only stable name of a GPU.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuUuid(String);

impl GpuUuid {
    /// Checks `s` is a GPU UUID: `GPU-` or `MIG-` followed by letters, digits, `-` or `/`
    /// (never a comma or space: UUIDs are joined with commas in a container label).
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("GPU-").or_else(|| s.strip_prefix("MIG-"));
        match rest {
            Some(rest)
                if !rest.is_empty()
                    && s.len() <= 96
                    && rest
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '/') =>
            {
                Ok(GpuUuid(s.to_owned()))
            }
            _ => Err(format!(
                "invalid GPU UUID {s:?}: expected GPU-... as `nvidia-smi -L` prints it"
            )),
        }
    }

    /// The UUID text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a comma-separated list, as stored in the container label; invalid entries are
    /// skipped (a label is not trusted input).
    pub fn parse_list(s: &str) -> Vec<GpuUuid> {
        s.split(',')
            .map(str::trim)
            .filter_map(|u| GpuUuid::parse(u).ok())
            .collect()
    }

    /// `uuids` joined with commas, the label form.
    pub fn join(uuids: &[GpuUuid]) -> String {
        uuids
            .iter()
            .map(GpuUuid::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for GpuUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One pinned GPU.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GpuPin {
    /// By UUID: stable across reboots.
    Uuid(GpuUuid),
    /// By NVML index, as `nvidia-smi` numbers them.
    Index(u32),
}

impl fmt::Display for GpuPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuPin::Uuid(u) => write!(f, "{u}"),
            GpuPin::Index(i) => write!(f, "GPU {i}"),
        }
    }
}

impl<'de> Deserialize<'de> for GpuPin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PinVisitor;
        impl Visitor<'_> for PinVisitor {
            type Value = GpuPin;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPU UUID (\"GPU-...\") or a GPU index")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<GpuPin, E> {
                GpuUuid::parse(s).map(GpuPin::Uuid).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<GpuPin, E> {
                u32::try_from(n)
                    .map(GpuPin::Index)
                    .map_err(|_| E::custom(format!("GPU index must be 0 or more, not {n}")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<GpuPin, E> {
                u32::try_from(n)
                    .map(GpuPin::Index)
                    .map_err(|_| E::custom(format!("GPU index {n} is out of range")))
            }
        }
        d.deserialize_any(PinVisitor)
    }
}

impl<'de> Deserialize<'de> for GpuRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RequestVisitor;
        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = GpuRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of GPUs, or a list of GPU UUIDs (\"GPU-...\") and indices")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<GpuRequest, E> {
                u32::try_from(n)
                    .map(GpuRequest::Count)
                    .map_err(|_| E::custom(format!("gpus must be 0 or more, not {n}")))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<GpuRequest, E> {
                u32::try_from(n)
                    .map(GpuRequest::Count)
                    .map_err(|_| E::custom(format!("gpus = {n} is out of range")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GpuRequest, A::Error> {
                let mut pins: Vec<GpuPin> = Vec::new();
                while let Some(pin) = seq.next_element::<GpuPin>()? {
                    if pins.contains(&pin) {
                        return Err(de::Error::custom(format!("{pin} is listed twice in gpus")));
                    }
                    pins.push(pin);
                }
                Ok(if pins.is_empty() {
                    GpuRequest::Count(0)
                } else {
                    GpuRequest::Pinned(pins)
                })
            }
        }
        d.deserialize_any(RequestVisitor)
    }
}

/// `[gpu]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGpu {
    nvml_library: Option<String>,
    mode: Option<RawMode>,
    max_per_gpu: Option<Spanned<Positive>>,
    busy_utilization: Option<Spanned<u32>>,
    queue: Option<bool>,
    max_wait: Option<Spanned<super::HumanDuration>>,
    fair_share_half_life: Option<Spanned<super::HumanDuration>>,
    reclaim_idle: Option<Spanned<String>>,
    reclaim_warning: Option<Spanned<super::HumanDuration>>,
}

/// `reclaim_idle` as written: `"never"`, or a duration of at least a second.
fn parse_reclaim_idle(s: &str) -> Result<Option<std::time::Duration>, String> {
    if s == "never" {
        return Ok(None);
    }
    let d = humantime::parse_duration(s).map_err(|e| {
        format!("reclaim_idle {s:?}: {e} (a duration such as \"2h\", or \"never\", the default)")
    })?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!(
            "reclaim_idle {s:?} is too short: at least 1s (or \"never\")"
        ));
    }
    Ok(Some(d))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Exclusive,
    Shared,
}

impl Validator<'_> {
    /// Validates `[gpu]`; `base` is the config file's directory.
    pub(super) fn gpu(&self, raw: RawGpu, base: &Path) -> Result<GpuConfig, ConfigError> {
        let max_per_gpu = match (raw.mode, raw.max_per_gpu) {
            (Some(RawMode::Shared), m) => {
                let m = m.map_or(i64::from(DEFAULT_MAX_PER_GPU), |m| m.into_inner().0);
                Some(u32::try_from(m).unwrap_or(u32::MAX))
            }
            (_, Some(m)) => {
                return Err(self.at(
                    m.span(),
                    "max_per_gpu applies only with mode = \"shared\" (GPUs are exclusive by default)"
                        .into(),
                ));
            }
            (_, None) => None,
        };
        let nvml_library = match raw.nvml_library {
            None => DEFAULT_NVML_LIBRARY.into(),
            // A bare name is for the dynamic loader's search path; a path is a file.
            Some(lib) if !lib.contains('/') => lib.into(),
            Some(lib) => base.join(lib).into_os_string(),
        };
        let busy_utilization = match raw.busy_utilization {
            None => DEFAULT_BUSY_UTILIZATION,
            Some(b) if *b.get_ref() <= 100 => b.into_inner(),
            Some(b) => {
                return Err(self.at(
                    b.span(),
                    format!(
                        "busy_utilization is a percentage (0 to 100), not {}",
                        b.get_ref()
                    ),
                ));
            }
        };
        let at_least_a_second = |d: Option<Spanned<super::HumanDuration>>,
                                 key: &str,
                                 default: std::time::Duration|
         -> Result<std::time::Duration, ConfigError> {
            match d {
                None => Ok(default),
                Some(d) if d.get_ref().0 >= std::time::Duration::from_secs(1) => {
                    Ok(d.into_inner().0)
                }
                Some(d) => Err(self.at(d.span(), format!("{key} must be at least 1s"))),
            }
        };
        let reclaim_idle = match raw.reclaim_idle {
            None => None,
            Some(r) => {
                let span = r.span();
                parse_reclaim_idle(r.get_ref()).map_err(|m| self.at(span, m))?
            }
        };
        Ok(GpuConfig {
            reclaim_idle,
            reclaim_warning: at_least_a_second(
                raw.reclaim_warning,
                "reclaim_warning",
                DEFAULT_RECLAIM_WARNING,
            )?,
            queue: raw.queue.unwrap_or(true),
            max_wait: at_least_a_second(raw.max_wait, "max_wait", DEFAULT_MAX_WAIT)?,
            fair_share_half_life: at_least_a_second(
                raw.fair_share_half_life,
                "fair_share_half_life",
                DEFAULT_FAIR_SHARE_HALF_LIFE,
            )?,
            busy_utilization,
            nvml_library,
            mode: match max_per_gpu {
                Some(max_per_gpu) => GpuMode::Shared { max_per_gpu },
                None => GpuMode::Exclusive,
            },
        })
    }
}
