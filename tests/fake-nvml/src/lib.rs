//! A test-only stand-in for `libnvidia-ml.so`, so labgate's real NVML code path (nvml-wrapper,
//! `dlopen`, the C ABI) runs on machines without an NVIDIA GPU.
//!
//! nvml-wrapper resolves every symbol it knows when it loads the library, but keeps a missing
//! one as an error that only surfaces when that function is called (`FailedToLoadSymbol`), with
//! one exception: its `Drop` calls `nvmlShutdown` unconditionally. So this library exports
//! `nvmlShutdown` and the functions labgate's inventory calls; nothing else.
//!
//! # Describing GPUs
//!
//! `FAKE_NVML_GPUS`, or else the file named by `FAKE_NVML_FILE`, or else the file next to the
//! loaded library named like it plus `.gpus` (`libnvidia-ml.so.1.gpus`), lists GPUs separated
//! by `;` or newlines, each as comma-separated fields:
//!
//! ```text
//! UUID,NAME,MEMORY_MIB[,util=PERCENT][,used=MIB][,mig=on|off][,procs=PID:MIB+PID:MIB]
//! GPU-00000000-0000-0000-0000-000000000001,NVIDIA A100-SXM4-80GB,81920,util=30,used=1024
//! ```
//!
//! `util=` is the GPU's utilization in percent (default 0), `used=` the memory in use in MiB
//! (default 0), `procs=` its compute processes as `PID:MIB` pairs joined by `+` (default none).
//! Without `mig=`, the GPU answers "not supported" to the MIG query, as pre-Ampere GPUs do.
//! `FAKE_NVML_INIT=driver-not-loaded` makes `nvmlInit_v2` fail as on a host whose driver is
//! not loaded. A malformed description makes init fail with `NVML_ERROR_UNKNOWN` and a line on
//! stderr.
//!
//! # Changing the GPUs while a process uses the library
//!
//! A description read from a file (`FAKE_NVML_FILE` or the `.gpus` file) is read again on
//! every NVML query after init when the file changed (its modification time, size or inode):
//! a test rewrites it to make a GPU busy or idle, or to give it processes, and the next
//! inventory of the running process sees that. Replace the file whole (write a new one
//! beside it, then rename it over the old), so no reader sees it half-written. A rewrite that
//! does not parse is reported on stderr once and the last good description stays; a missing
//! file keeps it too. `FAKE_NVML_GPUS` (the environment) is read at init only.
//!
//! # Safety
//!
//! The exported functions are `unsafe extern "C"`: callers pass raw pointers as the NVML API
//! defines them. All pointer access goes through three helpers ([`put`], [`put_str`],
//! [`put_slice`]) that check for null and bounds; every handle is an opaque integer (index + 1),
//! never dereferenced.

use std::ffi::{c_char, c_uint, c_ulonglong, c_void};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type Return = c_uint;
/// Opaque device handle: the GPU's index + 1 as an address, never dereferenced.
type Device = *mut c_void;

const SUCCESS: Return = 0;
const ERROR_UNINITIALIZED: Return = 1;
const ERROR_INVALID_ARGUMENT: Return = 2;
const ERROR_NOT_SUPPORTED: Return = 3;
const ERROR_INSUFFICIENT_SIZE: Return = 7;
const ERROR_DRIVER_NOT_LOADED: Return = 9;
const ERROR_UNKNOWN: Return = 999;

/// One fake GPU.
#[derive(Debug, Clone, PartialEq)]
struct Gpu {
    uuid: String,
    name: String,
    memory_total: u64,
    memory_used: u64,
    utilization: u32,
    mig: Option<bool>,
    processes: Vec<(u32, u64)>,
}

/// The GPUs while initialized (`None` after the last shutdown), and the init count.
static STATE: Mutex<(usize, Option<Vec<Gpu>>)> = Mutex::new((0, None));

/// The file the description came from at init, if it came from one, and what that file
/// looked like when last read (so a rewrite is noticed).
static SOURCE: Mutex<Option<(PathBuf, Option<Stamp>)>> = Mutex::new(None);

/// What tells one version of the description file from the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Reads the description file again if it changed since it was last read, and replaces the
/// GPUs with it (while initialized). Called at the start of every query.
fn refresh() {
    let mut source = SOURCE.lock().unwrap_or_else(|p| p.into_inner());
    let Some((path, seen)) = source.as_mut() else {
        return;
    };
    let now = stamp(path);
    if now.is_none() || now == *seen {
        return;
    }
    *seen = now;
    let parsed = std::fs::read_to_string(&*path)
        .map_err(|e| format!("{}: {e}", path.display()))
        .and_then(|spec| parse(&spec));
    match parsed {
        Ok(gpus) => {
            let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
            if state.1.is_some() {
                state.1 = Some(gpus);
            }
        }
        Err(e) => eprintln!("fake-nvml: bad GPU description, keeping the last one: {e}"),
    }
}

fn parse(spec: &str) -> Result<Vec<Gpu>, String> {
    let mib = |s: &str| -> Result<u64, String> {
        s.trim()
            .parse::<u64>()
            .map(|m| m << 20)
            .map_err(|e| format!("{s:?}: {e}"))
    };
    let mut gpus = Vec::new();
    for entry in spec
        .split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let mut fields = entry.split(',');
        let (Some(uuid), Some(name), Some(memory)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("{entry:?}: expected UUID,NAME,MEMORY_MIB"));
        };
        let mut gpu = Gpu {
            uuid: uuid.trim().to_owned(),
            name: name.trim().to_owned(),
            memory_total: mib(memory)?,
            memory_used: 0,
            utilization: 0,
            mig: None,
            processes: Vec::new(),
        };
        for field in fields {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("{field:?}: expected key=value"))?;
            match key.trim() {
                "util" => gpu.utilization = value.trim().parse().map_err(|e| format!("{e}"))?,
                "used" => gpu.memory_used = mib(value)?,
                "mig" => gpu.mig = Some(value.trim() == "on"),
                "procs" => {
                    for p in value.split('+') {
                        let (pid, mem) = p
                            .split_once(':')
                            .ok_or_else(|| format!("{p:?}: expected PID:MIB"))?;
                        let pid = pid.trim().parse().map_err(|e| format!("{pid:?}: {e}"))?;
                        gpu.processes.push((pid, mib(mem)?));
                    }
                }
                other => return Err(format!("unknown field {other:?}")),
            }
        }
        gpus.push(gpu);
    }
    Ok(gpus)
}

/// The file this library was loaded from, found in `/proc/self/maps` by the address of one
/// of its functions (no `dladdr`, so no more unsafe code).
fn own_path() -> Option<PathBuf> {
    let addr = (nvmlInit_v2 as *const ()).addr();
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (lo, hi) = parts.next()?.split_once('-')?;
        let lo = usize::from_str_radix(lo, 16).ok()?;
        let hi = usize::from_str_radix(hi, 16).ok()?;
        let path = parts.nth(4)?;
        ((lo..hi).contains(&addr) && path.starts_with('/')).then(|| PathBuf::from(path))
    })
}

/// The description: `FAKE_NVML_GPUS`, else the file `FAKE_NVML_FILE`, else the file next to
/// this library named like it plus `.gpus` (so each copy of the library can describe its
/// own GPUs without touching the environment of the process that loads it), else no GPUs.
/// Also remembers the file it read, for [`refresh`].
fn describe() -> Result<Vec<Gpu>, String> {
    let read =
        |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()));
    let file = if std::env::var_os("FAKE_NVML_GPUS").is_some() {
        None
    } else if let Some(path) = std::env::var_os("FAKE_NVML_FILE") {
        Some(PathBuf::from(path))
    } else {
        own_path()
            .map(|p| PathBuf::from(format!("{}.gpus", p.display())))
            .filter(|p| p.exists())
    };
    let spec = match &file {
        None => std::env::var("FAKE_NVML_GPUS").unwrap_or_default(),
        Some(path) => {
            let seen = stamp(path);
            let spec = read(path)?;
            *SOURCE.lock().unwrap_or_else(|p| p.into_inner()) = Some((path.clone(), seen));
            spec
        }
    };
    parse(&spec)
}

/// Runs `f` on the GPU a handle names, or answers as NVML does for a bad handle.
fn with_gpu(device: Device, f: impl FnOnce(&Gpu) -> Return) -> Return {
    refresh();
    let state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(gpus) = &state.1 else {
        return ERROR_UNINITIALIZED;
    };
    match device.addr().checked_sub(1).and_then(|i| gpus.get(i)) {
        Some(gpu) => f(gpu),
        None => ERROR_INVALID_ARGUMENT,
    }
}

/// Writes `value` to `ptr` unless it is null.
///
/// # Safety
/// `ptr` is null or valid for a write of `T`.
unsafe fn put<T>(ptr: *mut T, value: T) -> Return {
    if ptr.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null, and valid for writes by the caller's contract.
    unsafe { ptr.write(value) };
    SUCCESS
}

/// Copies `s` and a terminating NUL into the caller's buffer of `len` bytes.
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Return {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if s.len() + 1 > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` holds `len` bytes (caller's contract) and we write `s.len() + 1 <= len`.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        buf.add(s.len()).write(0);
    }
    SUCCESS
}

/// Copies `items` into the caller's array of `*count` entries, NVML style: too small (or
/// null) → `*count` is set to the number needed and `INSUFFICIENT_SIZE` (or success if none).
///
/// # Safety
/// `count` is null or valid for reads and writes; `out` is null or valid for `*count` writes.
unsafe fn put_slice<T: Copy>(count: *mut c_uint, out: *mut T, items: &[T]) -> Return {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null, valid by the caller's contract.
    let room = unsafe { count.read() } as usize;
    // SAFETY: as above.
    unsafe { count.write(items.len() as c_uint) };
    if items.is_empty() {
        return SUCCESS;
    }
    if out.is_null() || room < items.len() {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `out` holds `room >= items.len()` entries (caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    SUCCESS
}

/// `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Return {
    if std::env::var("FAKE_NVML_INIT").as_deref() == Ok("driver-not-loaded") {
        return ERROR_DRIVER_NOT_LOADED;
    }
    let gpus = match describe() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("fake-nvml: bad GPU description: {e}");
            return ERROR_UNKNOWN;
        }
    };
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    state.0 += 1;
    state.1 = Some(gpus);
    SUCCESS
}

/// `nvmlInitWithFlags`: flags are ignored.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Return {
    nvmlInit_v2()
}

/// `nvmlShutdown`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Return {
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    if state.0 == 0 {
        return ERROR_UNINITIALIZED;
    }
    state.0 -= 1;
    if state.0 == 0 {
        state.1 = None;
    }
    SUCCESS
}

/// `nvmlErrorString`: a static string for any code.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: Return) -> *const c_char {
    let s: &'static std::ffi::CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> Return {
    // SAFETY: forwarded caller contract.
    unsafe { put_str(version, length, "550.54.15-fake") }
}

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `count` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Return {
    refresh();
    let state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match &state.1 {
        // SAFETY: forwarded caller contract.
        Some(gpus) => unsafe { put(count, gpus.len() as c_uint) },
        None => ERROR_UNINITIALIZED,
    }
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
/// `device` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut Device,
) -> Return {
    refresh();
    let state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    match &state.1 {
        Some(gpus) if (index as usize) < gpus.len() => {
            let handle = std::ptr::without_provenance_mut(index as usize + 1);
            // SAFETY: forwarded caller contract.
            unsafe { put(device, handle) }
        }
        Some(_) => ERROR_INVALID_ARGUMENT,
        None => ERROR_UNINITIALIZED,
    }
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: Device, index: *mut c_uint) -> Return {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |_| unsafe {
        put(index, (device.addr() - 1) as c_uint)
    })
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Device,
    uuid: *mut c_char,
    length: c_uint,
) -> Return {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { put_str(uuid, length, &g.uuid) })
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` is null or valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: Device,
    name: *mut c_char,
    length: c_uint,
) -> Return {
    // SAFETY: forwarded caller contract.
    with_gpu(device, |g| unsafe { put_str(name, length, &g.name) })
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlDeviceGetMemoryInfo`.
///
/// # Safety
/// `memory` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(device: Device, memory: *mut Memory) -> Return {
    with_gpu(device, |g| {
        let m = Memory {
            total: g.memory_total,
            free: g.memory_total.saturating_sub(g.memory_used),
            used: g.memory_used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, m) }
    })
}

/// `nvmlDeviceGetMemoryInfo_v2` (what nvml-wrapper's `memory_info` calls).
///
/// # Safety
/// `memory` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: Device,
    memory: *mut MemoryV2,
) -> Return {
    with_gpu(device, |g| {
        let m = MemoryV2 {
            version: (size_of::<MemoryV2>() | (2 << 24)) as c_uint,
            total: g.memory_total,
            reserved: 0,
            free: g.memory_total.saturating_sub(g.memory_used),
            used: g.memory_used,
        };
        // SAFETY: forwarded caller contract.
        unsafe { put(memory, m) }
    })
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlDeviceGetUtilizationRates`.
///
/// # Safety
/// `utilization` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Device,
    utilization: *mut Utilization,
) -> Return {
    with_gpu(device, |g| {
        let memory = (g.memory_used * 100)
            .checked_div(g.memory_total)
            .unwrap_or(0) as c_uint;
        // SAFETY: forwarded caller contract.
        unsafe {
            put(
                utilization,
                Utilization {
                    gpu: g.utilization,
                    memory,
                },
            )
        }
    })
}

/// `nvmlDeviceGetMigMode`: "not supported" unless the description sets `mig=`.
///
/// # Safety
/// `current` and `pending` are null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: Device,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Return {
    with_gpu(device, |g| match g.mig {
        None => ERROR_NOT_SUPPORTED,
        Some(on) => {
            // SAFETY: forwarded caller contract.
            let a = unsafe { put(current, on as c_uint) };
            // SAFETY: forwarded caller contract.
            let b = unsafe { put(pending, on as c_uint) };
            a.max(b)
        }
    })
}

/// `nvmlProcessInfo_t` (v2/v3 layout).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`.
///
/// # Safety
/// `count` is null or valid for reads and writes; `infos` null or valid for `*count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Return {
    with_gpu(device, |g| {
        let list: Vec<ProcessInfo> = g
            .processes
            .iter()
            .map(|&(pid, mem)| ProcessInfo {
                pid,
                used_gpu_memory: mem,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            })
            .collect();
        // SAFETY: forwarded caller contract.
        unsafe { put_slice(count, infos, &list) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_parse_with_optional_fields() {
        let gpus = parse(
            "GPU-a,NVIDIA A100-SXM4-80GB,81920,util=30,used=1024,mig=off,procs=42:512+43:1\n\
             ; GPU-b,Tesla T4,15360",
        )
        .unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA A100-SXM4-80GB");
        assert_eq!(gpus[0].memory_total, 81920 << 20);
        assert_eq!(gpus[0].memory_used, 1024 << 20);
        assert_eq!(gpus[0].utilization, 30);
        assert_eq!(gpus[0].mig, Some(false));
        assert_eq!(gpus[0].processes, vec![(42, 512 << 20), (43, 1 << 20)]);
        assert_eq!(gpus[1].mig, None);
        assert!(parse("GPU-a,A100").is_err());
        assert!(parse("GPU-a,A100,1,colour=red").is_err());
        assert_eq!(parse("").unwrap(), vec![]);
    }

    /// The utilization and processes of GPU `index`, as a caller of the C API sees them.
    fn observe(index: c_uint) -> (c_uint, Vec<(c_uint, c_ulonglong)>) {
        let mut device: Device = std::ptr::null_mut();
        // SAFETY: valid pointers to locals.
        assert_eq!(
            unsafe { nvmlDeviceGetHandleByIndex_v2(index, &mut device) },
            SUCCESS
        );
        let mut u = Utilization { gpu: 0, memory: 0 };
        // SAFETY: as above.
        assert_eq!(
            unsafe { nvmlDeviceGetUtilizationRates(device, &mut u) },
            SUCCESS
        );
        let mut infos = [ProcessInfo {
            pid: 0,
            used_gpu_memory: 0,
            gpu_instance_id: 0,
            compute_instance_id: 0,
        }; 8];
        let mut count = infos.len() as c_uint;
        // SAFETY: `infos` holds `count` entries.
        assert_eq!(
            unsafe {
                nvmlDeviceGetComputeRunningProcesses_v3(device, &mut count, infos.as_mut_ptr())
            },
            SUCCESS
        );
        let procs = infos[..count as usize]
            .iter()
            .map(|p| (p.pid, p.used_gpu_memory))
            .collect();
        (u.gpu, procs)
    }

    #[test]
    fn a_rewritten_description_file_is_seen_by_the_next_query() {
        let dir = std::env::temp_dir().join(format!("fake-nvml-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gpus");
        let rewrite = |text: &str| {
            let tmp = dir.join("gpus.new");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        };
        rewrite("GPU-a,Tesla T4,15360\nGPU-b,Tesla T4,15360,util=5\n");
        // SAFETY: the only test of this crate that touches the environment or NVML state.
        unsafe { std::env::set_var("FAKE_NVML_FILE", &file) };
        assert_eq!(nvmlInit_v2(), SUCCESS);
        assert_eq!(observe(0), (0, vec![]));
        assert_eq!(observe(1), (5, vec![]));

        // GPU 0 becomes busy with a process; the running "process" sees it at once.
        rewrite("GPU-a,Tesla T4,15360,util=90,procs=77:512\nGPU-b,Tesla T4,15360,util=5\n");
        assert_eq!(observe(0), (90, vec![(77, 512 << 20)]));
        let mut count = 0;
        // SAFETY: a valid pointer to a local.
        assert_eq!(unsafe { nvmlDeviceGetCount_v2(&mut count) }, SUCCESS);
        assert_eq!(count, 2);

        // A rewrite that does not parse, or a missing file, keeps the last good description.
        rewrite("GPU-a,Tesla T4");
        assert_eq!(observe(0), (90, vec![(77, 512 << 20)]));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(observe(0), (90, vec![(77, 512 << 20)]));

        // Idle again, and a GPU fewer.
        rewrite("GPU-a,Tesla T4,15360\n");
        assert_eq!(observe(0), (0, vec![]));
        // SAFETY: a valid pointer to a local.
        assert_eq!(unsafe { nvmlDeviceGetCount_v2(&mut count) }, SUCCESS);
        assert_eq!(count, 1);

        assert_eq!(nvmlShutdown(), SUCCESS);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
