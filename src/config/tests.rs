//! Tests of config parsing, validation, per-user quotas and error positions.
//!
//! Error positions are written by hand from the texts below: `line:column`, both 1-based,
//! the column counted in characters.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::auth::{ProfileName, Username};

/// The path every in-memory config pretends to be read from.
const PATH: &str = "/etc/labgate/labgate.toml";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn user(name: &str) -> Username {
    Username::parse(name).unwrap()
}

fn ok(text: &str) -> Config {
    parse(Path::new(PATH), text).unwrap_or_else(|e| panic!("config should parse: {e}\n{text}"))
}

/// A config error with a position, and its `Display` form.
#[derive(Debug)]
struct At {
    line: usize,
    column: usize,
    message: String,
    display: String,
}

/// Parses `text`, expecting a positioned error; checks the `file:line:column: ` prefix.
fn err_at(text: &str) -> At {
    let e = match parse(Path::new(PATH), text) {
        Ok(cfg) => panic!("config should be rejected, got {cfg:#?}\n{text}"),
        Err(e) => e,
    };
    let display = e.to_string();
    match e {
        ConfigError::At {
            path,
            line,
            column,
            message,
        } => {
            assert_eq!(path, Path::new(PATH));
            let prefix = format!("{PATH}:{line}:{column}: ");
            assert!(
                display.starts_with(&prefix),
                "{display:?} should start with {prefix:?}"
            );
            assert!(display.ends_with(&message), "{display:?}");
            At {
                line,
                column,
                message,
                display,
            }
        }
        other => panic!("expected a positioned error, got {other:?}"),
    }
}

/// Asserts the error of `text` is at `line:column` and mentions every one of `needles`.
#[track_caller]
fn assert_err(text: &str, line: usize, column: usize, needles: &[&str]) {
    let e = err_at(text);
    assert_eq!(
        (e.line, e.column),
        (line, column),
        "wrong position for {:?} in\n{text}",
        e.display
    );
    for needle in needles {
        assert!(
            e.message.contains(needle),
            "{:?} should mention {needle:?}",
            e.message
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Valid configs.

const FULL: &str = r#"# A complete labgate config.
[server]
listen = "0.0.0.0:2022"
host_key = "/var/lib/labgate/host_ed25519_key"
keys_dir = "/etc/labgate/keys"
max_connections = 64
max_connections_per_user = 8
max_sessions = 4
max_startups = 32
login_grace = "20s"
keepalive = "1m"

[docker]
socket = "/var/run/docker.sock"
timeout = "1m 30s"

[defaults]
image = "ghcr.io/lab/cuda:12.4"
memory = "512M"
cpus = 1.5
shm = "64MiB"
pids = 512
gpus = 1
home = "/srv/home/{user}"
shell = "/bin/zsh"
uid = 1000
env = { OMP_NUM_THREADS = "2", HF_HOME = "/cache/hf" }
mounts = [
  { source = "/srv/datasets", target = "/datasets" },
  { source = "/scratch", target = "/scratch", writable = true },
]
"#;

#[test]
fn full_config_reads_every_field() {
    let cfg = ok(FULL);
    assert_eq!(cfg.source, Path::new(PATH));

    assert_eq!(cfg.server.listen, "0.0.0.0:2022".parse().unwrap());
    assert_eq!(
        cfg.server.host_key,
        Path::new("/var/lib/labgate/host_ed25519_key")
    );
    assert_eq!(cfg.server.keys_dir, Path::new("/etc/labgate/keys"));
    assert_eq!(cfg.server.max_connections, 64);
    assert_eq!(cfg.server.max_connections_per_user, 8);
    assert_eq!(cfg.server.max_sessions, 4);
    assert_eq!(cfg.server.max_startups, 32);
    assert_eq!(cfg.server.login_grace, Duration::from_secs(20));
    assert_eq!(cfg.server.keepalive, Duration::from_secs(60));

    assert_eq!(cfg.docker.socket, Path::new("/var/run/docker.sock"));
    assert_eq!(cfg.docker.timeout, Duration::from_secs(90));

    let q = &cfg.defaults;
    assert_eq!(q.image, "ghcr.io/lab/cuda:12.4");
    // Binary, as `docker run --memory 512M`: 512 MiB, not 512 MB.
    assert_eq!(q.memory, Some(ByteSize(512 * MIB)));
    assert_eq!(q.cpus, Some(1.5));
    assert_eq!(q.shm, Some(ByteSize(64 * MIB)));
    assert_eq!(q.pids, Some(512));
    assert_eq!(q.gpus, 1);
    assert_eq!(q.home, "/srv/home/{user}");
    assert_eq!(q.home_for(&user("alice")), Path::new("/srv/home/alice"));
    assert_eq!(q.shell.as_deref(), Some("/bin/zsh"));
    assert_eq!(
        q.env,
        BTreeMap::from([
            ("HF_HOME".to_owned(), "/cache/hf".to_owned()),
            ("OMP_NUM_THREADS".to_owned(), "2".to_owned()),
        ])
    );
    assert_eq!(
        q.mounts,
        [
            Mount {
                source: PathBuf::from("/srv/datasets"),
                target: "/datasets".to_owned(),
                writable: false,
            },
            Mount {
                source: PathBuf::from("/scratch"),
                target: "/scratch".to_owned(),
                writable: true,
            },
        ]
    );
    // Only uid given: the shell runs as uid:uid.
    assert_eq!((q.uid, q.gid), (Some(UidRule::Fixed(1000)), Some(1000)));
    // accept_env not given: the safe default list.
    assert_eq!(q.accept_env, ["TERM", "LANG", "LC_*", "GIT_PROTOCOL"]);

    assert_eq!(cfg.configured_users().count(), 0);
    assert_eq!(cfg.quota_for(&user("alice")), &cfg.defaults);
}

#[test]
fn omitted_fields_get_their_documented_defaults() {
    let cfg = ok("[defaults]\nimage = \"busybox\"\n");
    assert_eq!(cfg.server.listen, "127.0.0.1:2222".parse().unwrap());
    assert_eq!(
        cfg.server.host_key,
        Path::new("/etc/labgate/host_ed25519_key")
    );
    assert_eq!(cfg.server.keys_dir, Path::new("/etc/labgate/keys"));
    assert_eq!(cfg.server.max_connections, 1024);
    assert_eq!(cfg.server.max_connections_per_user, 32);
    assert_eq!(cfg.server.max_sessions, 10);
    assert_eq!(cfg.server.max_startups, 256);
    assert_eq!(cfg.server.login_grace, Duration::from_secs(30));
    assert_eq!(cfg.server.keepalive, Duration::from_secs(30));
    assert_eq!(cfg.docker.socket, Path::new("/var/run/docker.sock"));
    assert_eq!(cfg.docker.timeout, Duration::from_secs(60));

    let q = &cfg.defaults;
    assert_eq!(q.image, "busybox");
    assert_eq!((q.memory, q.cpus, q.shm, q.pids), (None, None, None, None));
    assert_eq!(q.gpus, 0);
    assert_eq!(
        q.home_for(&user("bob")),
        Path::new("/var/lib/labgate/home/bob")
    );
    assert!(q.mounts.is_empty());
    assert_eq!(q.shell, None);
    assert!(q.env.is_empty());
    assert_eq!((q.uid, q.gid), (None, None));
    assert_eq!(q.accept_env, ["TERM", "LANG", "LC_*", "GIT_PROTOCOL"]);
}

#[test]
fn units_and_numbers_in_every_accepted_form() {
    let cfg = ok(r#"
[defaults]
image = "busybox"
memory = 6291456
cpus = 8
shm = "1.5g"
uid = 1000
gid = 100
accept_env = ["TERM", "LC_*", "MY_APP_*"]
"#);
    let q = &cfg.defaults;
    // A plain integer is bytes; 6M is Docker's minimum and is accepted.
    assert_eq!(q.memory, Some(ByteSize(6 * MIB)));
    // An integer number of cores is fine.
    assert_eq!(q.cpus, Some(8.0));
    assert_eq!(q.shm, Some(ByteSize(3 * GIB / 2)));
    // An explicit gid wins over uid.
    assert_eq!((q.uid, q.gid), (Some(UidRule::Fixed(1000)), Some(100)));
    assert_eq!(q.accept_env, ["TERM", "LC_*", "MY_APP_*"]);
}

const USERS: &str = r#"
[server]
host_key = "state/host_ed25519_key"
keys_dir = "keys"

[defaults]
image = "lab/base:1"
memory = "2G"
cpus = 2
home = "home/{user}"
uid = 1000
env = { OMP_NUM_THREADS = "2" }
mounts = [{ source = "data", target = "/data" }]

[users.alice]
memory = "16G"
cpus = 8
gpus = 2

[users.bob]
image = "lab/other:2"
home = "/big/bob"
uid = 2001
env = { EXTRA = "1" }
mounts = [{ source = "/scratch/bob", target = "/scratch", writable = true }]
"#;

#[test]
fn user_tables_override_only_the_fields_they_set() {
    let cfg = ok(USERS);
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    assert_eq!(cfg.configured_users().collect::<Vec<_>>(), [&alice, &bob]);

    let d = &cfg.defaults;
    let a = cfg.quota_for(&alice);
    assert_eq!(a.memory, Some(ByteSize(16 * GIB)));
    assert_eq!(a.cpus, Some(8.0));
    assert_eq!(a.gpus, 2);
    // Everything alice did not set comes from [defaults].
    assert_eq!(a.image, "lab/base:1");
    assert_eq!(a.home, d.home);
    assert_eq!(a.mounts, d.mounts);
    assert_eq!(a.env, d.env);
    assert_eq!((a.uid, a.gid), (Some(UidRule::Fixed(1000)), Some(1000)));
    assert_eq!(a.accept_env, d.accept_env);

    let b = cfg.quota_for(&bob);
    assert_eq!(b.image, "lab/other:2");
    assert_eq!(b.memory, Some(ByteSize(2 * GIB)));
    assert_eq!(b.cpus, Some(2.0));
    assert_eq!(b.gpus, 0);
    // A user's home need not contain {user}: it is theirs alone.
    assert_eq!(b.home_for(&bob), Path::new("/big/bob"));
    // A field is replaced as a whole, not merged with the defaults' value.
    assert_eq!(
        b.mounts,
        [Mount {
            source: PathBuf::from("/scratch/bob"),
            target: "/scratch".to_owned(),
            writable: true,
        }]
    );
    assert_eq!(
        b.env,
        BTreeMap::from([("EXTRA".to_owned(), "1".to_owned())])
    );
    // bob's own uid, and the gid follows it.
    assert_eq!((b.uid, b.gid), (Some(UidRule::Fixed(2001)), Some(2001)));

    // No table: exactly the defaults, and the defaults themselves are untouched by the users.
    assert_eq!(cfg.quota_for(&carol), d);
    assert_eq!(d.memory, Some(ByteSize(2 * GIB)));
    assert_eq!(d.cpus, Some(2.0));
    assert_eq!(d.image, "lab/base:1");
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let cfg = ok(USERS);
    assert_eq!(
        cfg.server.host_key,
        Path::new("/etc/labgate/state/host_ed25519_key")
    );
    assert_eq!(cfg.server.keys_dir, Path::new("/etc/labgate/keys"));
    assert_eq!(
        cfg.defaults.home_for(&user("carol")),
        Path::new("/etc/labgate/home/carol")
    );
    assert_eq!(
        cfg.quota_for(&user("alice")).home_for(&user("alice")),
        Path::new("/etc/labgate/home/alice")
    );
    assert_eq!(
        cfg.defaults.mounts[0].source,
        Path::new("/etc/labgate/data")
    );
    assert_eq!(
        cfg.quota_for(&user("alice")).mounts[0].source,
        Path::new("/etc/labgate/data")
    );
    // Absolute paths stay as written.
    assert_eq!(
        cfg.quota_for(&user("bob")).mounts[0].source,
        Path::new("/scratch/bob")
    );

    // Same file elsewhere: the paths follow the file.
    let moved = parse(Path::new("/opt/lab/conf/gate.toml"), USERS).unwrap();
    assert_eq!(moved.server.keys_dir, Path::new("/opt/lab/conf/keys"));
    assert_eq!(
        moved.defaults.home_for(&user("carol")),
        Path::new("/opt/lab/conf/home/carol")
    );
}

#[test]
fn load_reads_a_file_and_resolves_paths_next_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("labgate.toml");
    std::fs::write(
        &file,
        "[defaults]\nimage = \"busybox\"\nhome = \"h/{user}\"\n",
    )
    .unwrap();
    let cfg = load(&file).unwrap();
    assert_eq!(cfg.source, file);
    assert_eq!(cfg.server.keys_dir, dir.path().join("keys"));
    assert_eq!(
        cfg.defaults.home_for(&user("alice")),
        dir.path().join("h/alice")
    );

    // Errors from a loaded file name that file.
    std::fs::write(&file, "[defaults]\nimage = \"busybox\"\ncpus = 0\n").unwrap();
    let e = load(&file).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:3:8: ", file.display())),
        "{e}"
    );
}

#[test]
fn load_reports_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = load(&missing).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Io { path, .. } if *path == missing),
        "{e:?}"
    );
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{}: cannot read config", missing.display())),
        "{shown}"
    );
}

#[test]
fn shipped_configs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut parsed = Vec::new();
    for name in ["labgate.toml", "demo.toml"] {
        let path = dir.join(name);
        let cfg = load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        parsed.push((name, cfg));
    }
    assert_eq!(parsed.len(), 2, "both shipped configs must be checked");
    // The default path names the shipped config.
    assert!(Path::new(DEFAULT_PATH).ends_with("config/labgate.toml"));

    let (_, main) = &parsed[0];
    assert_eq!(main.server.listen, "127.0.0.1:2222".parse().unwrap());
    assert_eq!(main.server.keys_dir, dir.join("../keys"));
    assert_eq!(main.server.host_key, dir.join("../state/host_ed25519_key"));
    assert_eq!(main.defaults.memory, Some(ByteSize(2 * GIB)));
    assert_eq!(main.defaults.shm, Some(ByteSize(256 * MIB)));
    assert_eq!(main.defaults.pids, Some(1024));
    assert!(main.defaults.accepts_env("TERM"));
    assert!(!main.defaults.accepts_env("PATH"));

    let (_, demo) = &parsed[1];
    assert_eq!(demo.server.keys_dir, dir.join("keys"));
    assert_eq!(demo.defaults.memory, Some(ByteSize(512 * MIB)));
    assert_eq!(demo.defaults.home_for(&user("demo")), dir.join("home/demo"));
}

#[test]
fn the_package_config_names_the_paths_the_package_and_its_unit_provide() {
    // deploy/labgate.toml is /etc/labgate/labgate.toml in the Debian package: every path in
    // it must be one the package makes (postinst) or the unit allows the gateway to write.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/labgate.toml");
    let cfg = load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.server.keys_dir, Path::new("/etc/labgate/keys"));
    assert_eq!(
        cfg.server.host_key,
        Path::new("/var/lib/labgate/host_ed25519_key")
    );
    assert_eq!(
        cfg.defaults.home_for(&user("alice")),
        Path::new("/var/lib/labgate/home/alice")
    );
    assert_eq!(cfg.admin.socket, Path::new("/run/labgate/admin.sock"));
    assert_eq!(
        cfg.admin.audit_log.as_deref(),
        Some(Path::new("/var/log/labgate/audit.jsonl"))
    );
    // The helpers are left to the search (which finds the package's).
    assert_ne!(cfg.docker.relay_helper.origin, helpers::Origin::Configured);
    assert_ne!(cfg.docker.sftp_helper.origin, helpers::Origin::Configured);
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/labgate.service"),
    )
    .unwrap();
    for line in [
        "ExecStart=/usr/bin/labgate serve --config /etc/labgate/labgate.toml",
        "ReadWritePaths=/var/lib/labgate",
        "RuntimeDirectory=labgate",
        "LogsDirectory=labgate",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has {line}");
    }
}

#[test]
fn a_configured_helper_is_resolved_against_the_config_directory() {
    let cfg = ok("[docker]\nrelay_helper = \"helpers/relay\"\n\n[defaults]\nimage = \"busybox\"\n");
    assert_eq!(
        cfg.docker.relay_helper.path,
        Path::new("/etc/labgate/helpers/relay")
    );
    assert_eq!(cfg.docker.relay_helper.origin, helpers::Origin::Configured);
    assert!(!cfg.docker.relay_helper.found);
}

// ---------------------------------------------------------------------------------------------
// Errors: position and message.

#[test]
fn unknown_field_in_defaults_points_at_the_key() {
    // A typo must not be silently ignored (the user would get no memory limit).
    assert_err(
        "[defaults]\nimage = \"busybox\"\n  memroy = \"2G\"\n",
        3,
        3,
        &["unknown field `memroy`", "memory"],
    );
}

#[test]
fn unknown_field_in_server_points_at_the_key() {
    assert_err(
        "[server]\nlisten = \"127.0.0.1:22\"\nport = 2222\n\n[defaults]\nimage = \"busybox\"\n",
        3,
        1,
        &["unknown field `port`", "listen"],
    );
    // Also in an inline table: the column is the key's.
    assert_err(
        "server = { listen = \"127.0.0.1:22\", port = 2222 }\n[defaults]\nimage = \"busybox\"\n",
        1,
        37,
        &["unknown field `port`"],
    );
}

#[test]
fn unknown_fields_elsewhere_are_rejected_too() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\n\n[users.alice]\nmemory = \"1G\"\ncpu = 4\n",
        6,
        1,
        &["unknown field `cpu`", "cpus"],
    );
    assert_err(
        "[dokcer]\nsocket = \"/run/docker.sock\"\n[defaults]\nimage = \"busybox\"\n",
        1,
        2,
        &["unknown field `dokcer`"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\nmounts = [{ source = \"/srv\", target = \"/srv\", rw = true }]\n",
        3,
        47,
        &["unknown field `rw`", "writable"],
    );
}

#[test]
fn bad_memory_unit_points_at_the_value() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\nmemory = \"12Q\"\n",
        3,
        10,
        &["\"12Q\"", "unknown unit"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\nshm = \"lots\"\n",
        3,
        7,
        &["invalid size \"lots\""],
    );
}

#[test]
fn memory_below_docker_minimum_is_rejected() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\nmemory = \"5M\"\n",
        3,
        10,
        &["memory 5M", "6M"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\n[users.alice]\nmemory = 1024\n",
        4,
        10,
        &["memory 1K", "6M"],
    );
    // One byte short of 6 MiB (the limit is binary, like Docker's).
    assert_err(
        "[defaults]\nimage = \"busybox\"\nmemory = 6291455\n",
        3,
        10,
        &["memory 6291455", "6M"],
    );
}

#[test]
fn cpus_must_be_above_zero() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\ncpus = 0\n",
        3,
        8,
        &["cpus", "not 0"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\ncpus = -1.5\n",
        3,
        8,
        &["cpus", "not -1.5"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\ncpus = nan\n",
        3,
        8,
        &["cpus", "NaN"],
    );
}

#[test]
fn pids_and_the_server_bounds_must_be_at_least_one() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\npids = 0\n",
        3,
        8,
        &["at least 1", "not 0"],
    );
    assert_err(
        "[server]\nmax_connections = 0\n[defaults]\nimage = \"busybox\"\n",
        2,
        19,
        &["at least 1", "not 0"],
    );
    assert_err(
        "[server]\nmax_startups = 0\n[defaults]\nimage = \"busybox\"\n",
        2,
        16,
        &["at least 1", "not 0"],
    );
    assert_err(
        "[server]\nmax_connections = 3\nmax_connections_per_user = 0\n[defaults]\nimage = \"busybox\"\n",
        3,
        28,
        &["at least 1", "not 0"],
    );
    assert_err(
        "[server]\nmax_sessions = 0\n[defaults]\nimage = \"busybox\"\n",
        2,
        16,
        &["at least 1", "not 0"],
    );
}

#[test]
fn invalid_user_name_points_at_the_table_name() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\n\n[users.\"Bad Name\"]\nmemory = \"1G\"\n",
        4,
        8,
        &["invalid user name \"Bad Name\""],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\n[users.Alice]\n",
        3,
        8,
        &["invalid user name \"Alice\""],
    );
}

#[test]
fn defaults_home_must_contain_the_user_placeholder() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\nhome = \"/srv/home\"\n",
        3,
        8,
        &["defaults.home", "{user}"],
    );
}

#[test]
fn mounts_never_expose_the_docker_socket() {
    // The socket itself, its directories (either spelling), and / are all refused.
    for source in [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/var/run",
        "/run",
        "/run/",
        "/",
    ] {
        let text = format!(
            "[defaults]\nimage = \"busybox\"\nmounts = [{{ source = \"{source}\", target = \"/x\" }}]\n"
        );
        let e = err_at(&text);
        assert_eq!((e.line, e.column), (3, 22), "{source}: {}", e.display);
        assert!(
            e.message.contains("Docker socket"),
            "{source}: {}",
            e.message
        );
        assert!(
            e.message.contains(source.trim_end_matches('/'))
                || (source == "/" && e.message.contains("source / ")),
            "{source}: {}",
            e.message
        );
    }

    // A configured socket elsewhere is protected the same way.
    assert_err(
        "[docker]\nsocket = \"/srv/docker/engine.sock\"\n[defaults]\nimage = \"busybox\"\nmounts = [{ source = \"/srv/docker\", target = \"/x\" }]\n",
        5,
        22,
        &["/srv/docker", "Docker socket"],
    );
    // Also in a user's own table, and as a multi-line array element.
    assert_err(
        "[defaults]\nimage = \"busybox\"\n[users.alice]\nmounts = [\n  { source = \"/srv/data\", target = \"/data\" },\n  { source = \"/run\", target = \"/r\" },\n]\n",
        6,
        14,
        &["/run", "Docker socket"],
    );
    // Other host directories are fine.
    let cfg = ok(
        "[defaults]\nimage = \"busybox\"\nmounts = [{ source = \"/srv/run\", target = \"/run\" }]\n",
    );
    assert_eq!(cfg.defaults.mounts[0].source, Path::new("/srv/run"));
}

#[test]
fn mount_targets_must_be_absolute_without_dotdot() {
    for (target, column) in [("data", 39), ("/a/../b", 39), ("/", 39), ("../etc", 39)] {
        let text = format!(
            "[defaults]\nimage = \"busybox\"\nmounts = [{{ source = \"/srv\", target = \"{target}\" }}]\n"
        );
        let e = err_at(&text);
        assert_eq!((e.line, e.column), (3, column), "{target}: {}", e.display);
        assert!(e.message.contains(&format!("{target:?}")), "{}", e.message);
        assert!(e.message.contains("absolute path"), "{}", e.message);
    }
    // The shell is checked the same way.
    assert_err(
        "[defaults]\nimage = \"busybox\"\nshell = \"bash\"\n",
        3,
        9,
        &["\"bash\"", "absolute path"],
    );
}

#[test]
fn accept_env_can_never_admit_path_or_ld() {
    for pattern in [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_*",
        "LD*",
        "L*",
        "P*",
        "PAT*",
        "*",
    ] {
        let text =
            format!("[defaults]\nimage = \"busybox\"\naccept_env = [\"TERM\", \"{pattern}\"]\n");
        let e = err_at(&text);
        // The position is that of the accept_env value, on line 3.
        assert_eq!(e.line, 3, "{pattern}: {}", e.display);
        assert!(e.column >= 14, "{pattern}: {}", e.display);
        assert!(
            e.message.contains(&format!("{pattern:?}")),
            "{pattern}: {}",
            e.message
        );
        assert!(e.message.contains("never allowed"), "{}", e.message);
    }
    // In a user's table too.
    let e = err_at("[defaults]\nimage = \"busybox\"\n[users.alice]\naccept_env = [\"PATH\"]\n");
    assert_eq!(e.line, 4, "{}", e.display);
    assert!(e.message.contains("\"PATH\""), "{}", e.message);
    // A pattern that is not a name or a prefix is rejected.
    let e = err_at("[defaults]\nimage = \"busybox\"\naccept_env = [\"L*D\"]\n");
    assert_eq!(e.line, 3, "{}", e.display);
    assert!(
        e.message.contains("invalid accept_env pattern \"L*D\""),
        "{}",
        e.message
    );
}

#[test]
fn env_names_must_be_valid_variable_names() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\nenv = { \"1BAD\" = \"x\" }\n",
        3,
        9,
        &["invalid environment variable name \"1BAD\""],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\n[defaults.env]\nOK = \"1\"\n\"A-B\" = \"2\"\n",
        5,
        1,
        &["\"A-B\""],
    );
}

#[test]
fn missing_image_points_at_the_defaults_table() {
    assert_err(
        "# lab\n\n[server]\n\n[defaults]\nmemory = \"1G\"\n",
        5,
        1,
        &["no image", "`image`"],
    );
    // Every user having one does not help: users without a table get the defaults.
    assert_err(
        "[defaults]\nmemory = \"1G\"\n[users.alice]\nimage = \"busybox\"\n",
        1,
        1,
        &["no image"],
    );
    assert_err(
        "[defaults]\nimage = \"bad image\"\n",
        2,
        9,
        &["invalid image reference \"bad image\""],
    );
}

#[test]
fn missing_defaults_table_is_an_error() {
    let e = parse(Path::new(PATH), "[server]\nlisten = \"127.0.0.1:22\"\n").unwrap_err();
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("{PATH}:")), "{shown}");
    assert!(shown.contains("missing field `defaults`"), "{shown}");
}

#[test]
fn toml_syntax_errors_have_a_position() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\nmemory = \"1G\n",
        3,
        13,
        &["expected `\"`"],
    );
    let e = err_at("[defaults]\nimage = \"busybox\"\nimage = \"other\"\n");
    assert_eq!((e.line, e.column), (3, 1), "{}", e.display);
    assert!(e.message.contains("duplicate key"), "{}", e.message);
    let e = err_at("[server]\nlisten = \"localhost\"\n[defaults]\nimage = \"busybox\"\n");
    assert_eq!((e.line, e.column), (2, 10), "{}", e.display);
    let e = err_at("[server]\nkeepalive = \"soon\"\n[defaults]\nimage = \"busybox\"\n");
    assert_eq!((e.line, e.column), (2, 13), "{}", e.display);
    assert!(
        e.message.contains("invalid duration \"soon\""),
        "{}",
        e.message
    );
}

#[test]
fn columns_count_characters_and_lines_survive_crlf() {
    // "données" has a two-byte é before the error on the same line: the column is in characters.
    assert_err(
        "[defaults]\nimage = \"busybox\"\nmounts = [{ source = \"/srv/données\", target = \"rel\" }]\n",
        3,
        47,
        &["\"rel\""],
    );
    assert_err(
        "[defaults]\r\nimage = \"busybox\"\r\n\r\n  bogus = 1\r\n",
        4,
        3,
        &["unknown field `bogus`"],
    );
}

// ---------------------------------------------------------------------------------------------
// Quota behaviour.

#[test]
fn accepts_env_matches_names_and_prefixes() {
    let q = ok("[defaults]\nimage = \"busybox\"\n").defaults;
    for yes in ["TERM", "LANG", "LC_ALL", "LC_CTYPE", "LC_", "GIT_PROTOCOL"] {
        assert!(q.accepts_env(yes), "{yes} should be accepted");
    }
    for no in [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "HOME",
        "SHELL",
        "TERMINFO",
        "LANGUAGE",
        "LC",
        "term",
        "",
    ] {
        assert!(!q.accepts_env(no), "{no:?} should be refused");
    }

    let q = ok("[defaults]\nimage = \"busybox\"\naccept_env = [\"MY_APP_*\"]\n").defaults;
    assert!(q.accepts_env("MY_APP_TOKEN"));
    assert!(
        !q.accepts_env("TERM"),
        "an explicit list replaces the default one"
    );

    let q = ok("[defaults]\nimage = \"busybox\"\naccept_env = []\n").defaults;
    assert!(!q.accepts_env("TERM"), "an empty list accepts nothing");
}

#[test]
fn accepts_env_refuses_path_and_ld_even_if_a_pattern_slipped_through() {
    // The parser refuses such patterns (see above); a quota built by hand still never lets
    // them through.
    let mut q = ok("[defaults]\nimage = \"busybox\"\n").defaults;
    q.accept_env = vec!["*".to_owned(), "PATH".to_owned(), "LD_PRELOAD".to_owned()];
    assert!(q.accepts_env("HOME"));
    assert!(q.accepts_env("LDFLAGS"), "only LD_* is dangerous");
    for never in ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_"] {
        assert!(!q.accepts_env(never), "{never} must never be accepted");
    }
}

#[test]
fn home_for_substitutes_every_user_placeholder() {
    let cfg = ok("[defaults]\nimage = \"busybox\"\nhome = \"/srv/{user}/home-{user}\"\n");
    assert_eq!(
        cfg.defaults.home_for(&user("alice")),
        Path::new("/srv/alice/home-alice")
    );
    assert_eq!(
        cfg.quota_for(&user("bob")).home_for(&user("bob")),
        Path::new("/srv/bob/home-bob")
    );
}

// ---------------------------------------------------------------------------------------------
// Fixture files.

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "{}: expected at least 3 fixtures, found {}",
        dir.display(),
        files.len()
    );
    files
}

#[test]
fn valid_fixtures_load() {
    let files = fixtures("valid");
    for file in &files {
        let cfg = load(file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cfg.source, file);
        assert!(!cfg.defaults.image.is_empty(), "{}", file.display());
        assert!(!cfg.defaults.accepts_env("PATH"), "{}", file.display());
    }
}

#[test]
fn invalid_fixtures_fail_at_a_position_inside_the_file() {
    let files = fixtures("invalid");
    for file in &files {
        let name = file.display();
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name}: first line must be `# expect: <message part>`"));
        // Optional second line `# at: LINE:COLUMN` pins the position exactly.
        let at = text
            .lines()
            .nth(1)
            .and_then(|l| l.strip_prefix("# at: "))
            .map(|s| {
                let (l, c) = s.split_once(':').unwrap();
                (
                    l.trim().parse::<usize>().unwrap(),
                    c.trim().parse::<usize>().unwrap(),
                )
            });

        let e = match load(file) {
            Ok(_) => panic!("{name}: should be rejected"),
            Err(e) => e,
        };
        let shown = e.to_string();
        let ConfigError::At {
            path,
            line,
            column,
            message,
        } = e
        else {
            panic!("{name}: expected a positioned error, got {shown}");
        };
        assert_eq!(&path, file);
        assert!(
            shown.starts_with(&format!("{name}:{line}:{column}: ")),
            "{shown}"
        );
        assert!(
            message.contains(expect),
            "{name}: {message:?} should contain {expect:?}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            (1..=lines.len()).contains(&line),
            "{name}: line {line} is outside the file ({} lines)",
            lines.len()
        );
        let width = lines[line - 1].chars().count();
        assert!(
            (1..=width + 1).contains(&column),
            "{name}: column {column} is outside line {line} ({width} characters)"
        );
        if let Some(at) = at {
            assert_eq!((line, column), at, "{name}: {shown}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GPUs: the [gpu] section and the gpus quota field.

#[test]
fn gpu_section_defaults_to_exclusive_and_the_driver_library() {
    let cfg = ok("[defaults]\nimage = \"busybox\"\n");
    assert_eq!(cfg.gpu.mode, GpuMode::Exclusive);
    assert_eq!(cfg.gpu.nvml_library, DEFAULT_NVML_LIBRARY);
    assert_eq!(cfg.gpu, GpuConfig::default());
    assert_eq!(cfg.defaults.gpus, GpuRequest::Count(0));
}

#[test]
fn gpu_section_reads_library_mode_and_max_per_gpu() {
    let cfg = ok(
        "[gpu]\nnvml_library = \"lib/libnvidia-ml.so.1\"\nmode = \"shared\"\nmax_per_gpu = 3\n\n\
         [defaults]\nimage = \"busybox\"\n",
    );
    // A path is resolved against the config directory...
    assert_eq!(
        cfg.gpu.nvml_library,
        Path::new("/etc/labgate/lib/libnvidia-ml.so.1").as_os_str()
    );
    assert_eq!(cfg.gpu.mode, GpuMode::Shared { max_per_gpu: 3 });
    assert_eq!(cfg.gpu.mode.capacity(), 3);
    // ...a bare name is left to the dynamic loader, and shared mode has a default.
    let cfg = ok(
        "[gpu]\nnvml_library = \"libnvidia-ml.so\"\nmode = \"shared\"\n[defaults]\nimage = \"busybox\"\n",
    );
    assert_eq!(cfg.gpu.nvml_library, "libnvidia-ml.so");
    assert_eq!(cfg.gpu.mode, GpuMode::Shared { max_per_gpu: 2 });
    let cfg = ok(
        "[gpu]\nnvml_library = \"/usr/lib/x/libnvidia-ml.so.1\"\n[defaults]\nimage = \"busybox\"\n",
    );
    assert_eq!(cfg.gpu.nvml_library, "/usr/lib/x/libnvidia-ml.so.1");
    assert_eq!(cfg.gpu.mode, GpuMode::Exclusive);
}

#[test]
fn gpu_section_errors_point_at_the_value() {
    assert_err(
        "[gpu]\nmax_per_gpu = 2\n[defaults]\nimage = \"busybox\"\n",
        2,
        15,
        &["max_per_gpu applies only with mode = \"shared\""],
    );
    assert_err(
        "[gpu]\nmode = \"exclusive\"\nmax_per_gpu = 2\n[defaults]\nimage = \"busybox\"\n",
        3,
        15,
        &["max_per_gpu applies only"],
    );
    assert_err(
        "[gpu]\nmode = \"fair\"\n[defaults]\nimage = \"busybox\"\n",
        2,
        8,
        &["unknown variant `fair`", "exclusive", "shared"],
    );
    assert_err(
        "[gpu]\nmode = \"shared\"\nmax_per_gpu = 0\n[defaults]\nimage = \"busybox\"\n",
        3,
        15,
        &["at least 1"],
    );
    assert_err(
        "[gpu]\nnvml = \"x\"\n[defaults]\nimage = \"busybox\"\n",
        2,
        1,
        &["unknown field `nvml`", "nvml_library"],
    );
}

#[test]
fn gpus_is_a_count_or_a_list_of_uuids_and_indices() {
    let cfg = ok(r#"
[defaults]
image = "busybox"
gpus = 1

[users.alice]
gpus = ["GPU-8c5a3b1e-0f9d-4d5e-9b1a-2f3c4d5e6f70", 3]

[users.bob]
gpus = []

[users.carol]
memory = "1G"
"#);
    assert_eq!(cfg.defaults.gpus, GpuRequest::Count(1));
    assert_eq!(
        cfg.quota_for(&user("alice")).gpus,
        GpuRequest::Pinned(vec![
            GpuPin::Uuid(
                crate::config::GpuUuid::parse("GPU-8c5a3b1e-0f9d-4d5e-9b1a-2f3c4d5e6f70").unwrap()
            ),
            GpuPin::Index(3),
        ])
    );
    assert_eq!(cfg.quota_for(&user("alice")).gpus.count(), 2);
    assert_eq!(cfg.quota_for(&user("alice")).gpus, 2);
    // An empty list asks for nothing; a table without gpus inherits the default.
    assert_eq!(cfg.quota_for(&user("bob")).gpus, GpuRequest::Count(0));
    assert_eq!(cfg.quota_for(&user("carol")).gpus, GpuRequest::Count(1));
}

#[test]
fn gpus_errors_point_at_the_value_or_the_entry() {
    assert_err(
        "[defaults]\nimage = \"busybox\"\ngpus = -1\n",
        3,
        8,
        &["gpus must be 0 or more, not -1"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\ngpus = 1.5\n",
        3,
        8,
        &["a number of GPUs, or a list of GPU UUIDs"],
    );
    // A bad entry is pointed at itself.
    assert_err(
        "[defaults]\nimage = \"busybox\"\ngpus = [0, \"gpu0\"]\n",
        3,
        12,
        &["invalid GPU UUID \"gpu0\"", "nvidia-smi -L"],
    );
    assert_err(
        "[defaults]\nimage = \"busybox\"\ngpus = [0, -2]\n",
        3,
        12,
        &["GPU index must be 0 or more"],
    );
    let e = err_at("[defaults]\nimage = \"busybox\"\ngpus = [1, 1]\n");
    assert_eq!(e.line, 3);
    assert!(e.message.contains("GPU 1 is listed twice"), "{}", e.message);
    assert_err(
        "[defaults]\nimage = \"busybox\"\n[users.alice]\ngpus = \"GPU-abc\"\n",
        4,
        8,
        &["a number of GPUs, or a list"],
    );
}

#[test]
fn operations_settings_parse_with_defaults_and_per_user_idle_stop() {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/valid/operations.toml");
    let cfg = load(&file).unwrap();
    assert_eq!(cfg.server.motd.as_deref(), Some("Welcome to the lab."));
    assert!(!cfg.server.login_status);
    assert!(cfg.server.end_sessions_on_key_removal);
    assert_eq!(cfg.admin.socket, PathBuf::from("/run/labgate/admin.sock"));
    assert_eq!(cfg.admin.listen, Some("127.0.0.1:9122".parse().unwrap()));
    assert_eq!(
        cfg.admin.dashboard_listen,
        Some("0.0.0.0:9123".parse().unwrap())
    );
    assert!(!cfg.admin.dashboard_show_users);
    assert_eq!(
        cfg.admin.audit_log,
        Some(PathBuf::from("/var/log/labgate/audit.jsonl"))
    );
    assert_eq!(cfg.gpu.busy_utilization, 20);
    assert_eq!(cfg.defaults.idle_stop, Some(Duration::from_secs(7200)));
    let user = |n: &str| Username::parse(n).unwrap();
    assert_eq!(cfg.quota_for(&user("alice")).idle_stop, None);
    assert_eq!(
        cfg.quota_for(&user("bob")).idle_stop,
        Some(Duration::from_secs(1800))
    );
    assert_eq!(
        cfg.quota_for(&user("carol")).idle_stop,
        Some(Duration::from_secs(7200))
    );

    let bare = parse(
        Path::new("/etc/labgate/labgate.toml"),
        "[defaults]\nimage = \"x\"\n",
    )
    .unwrap();
    assert!(bare.server.login_status);
    assert!(!bare.server.end_sessions_on_key_removal);
    assert_eq!(bare.server.motd, None);
    assert_eq!(bare.admin.listen, None);
    assert_eq!(bare.admin.dashboard_listen, None);
    assert!(
        bare.admin.dashboard_show_users,
        "names shown unless the admin hides them"
    );
    assert_eq!(bare.defaults.idle_stop, None);
    assert_eq!(bare.gpu.busy_utilization, 5);
}

// ---------------------------------------------------------------------------------------------
// Images: pull policy, registries, profiles.

const IMAGES: &str = r#"[defaults]
image = "127.0.0.1:5000/lab/base:1"
memory = "1G"

[users.alice]
pull_policy = "always"
cpus = 4

[users.bob]
image = "busybox"

[registries."127.0.0.1:5000"]
username = "lab"
password_file = "secrets/registry"

[profiles.gpu]
image = "127.0.0.1:5000/lab/pytorch:2"
memory = "8G"
users = ["alice", "carol"]
"#;

#[test]
fn pull_policy_defaults_to_missing_and_merges_per_user() {
    let cfg = ok(IMAGES);
    assert_eq!(cfg.defaults.pull_policy, PullPolicy::Missing);
    assert_eq!(
        cfg.quota_for(&user("alice")).pull_policy,
        PullPolicy::Always
    );
    assert_eq!(cfg.quota_for(&user("bob")).pull_policy, PullPolicy::Missing);
    let never = ok("[defaults]\nimage = \"x\"\npull_policy = \"never\"\n");
    assert_eq!(never.defaults.pull_policy, PullPolicy::Never);
}

#[test]
fn registry_credentials_follow_the_image_and_keep_the_secret_in_its_file() {
    let cfg = ok(IMAGES);
    let auth = cfg
        .defaults
        .registry
        .clone()
        .expect("credentials for 127.0.0.1:5000");
    assert_eq!(auth.registry, "127.0.0.1:5000");
    assert_eq!(auth.username, "lab");
    assert_eq!(
        auth.password_file,
        PathBuf::from("/etc/labgate/secrets/registry")
    );
    // bob's image is on Docker Hub: no credentials configured there.
    assert_eq!(cfg.quota_for(&user("bob")).registry, None);
    // Debug output names the file, never a secret (there is none in memory).
    assert!(format!("{auth:?}").contains("secrets/registry"));
}

#[test]
fn profiles_merge_over_the_users_own_quota_and_list_who_may_use_them() {
    let cfg = ok(IMAGES);
    let gpu = ProfileName::parse("gpu").unwrap();
    let alice = cfg.profile_quota(&user("alice"), &gpu).unwrap();
    assert_eq!(alice.image, "127.0.0.1:5000/lab/pytorch:2");
    assert_eq!(alice.memory, Some(ByteSize(8 * GIB)));
    assert_eq!(alice.cpus, Some(4.0), "alice's own cpus stay");
    assert_eq!(alice.pull_policy, PullPolicy::Always);
    assert_eq!(alice.profile.as_ref(), Some(&gpu));
    assert_eq!(alice.home, cfg.quota_for(&user("alice")).home, "same home");
    assert!(alice.registry.is_some());
    // carol has no table of her own: the profile over [defaults].
    let carol = cfg.profile_quota(&user("carol"), &gpu).unwrap();
    assert_eq!(carol.cpus, None);
    assert_eq!(
        cfg.profile_quota(&user("bob"), &gpu),
        Err(ProfileRefusal::NotAllowed {
            profile: "gpu".into(),
            allowed: vec![]
        })
    );
    assert_eq!(
        cfg.profile_quota(&user("alice"), &ProfileName::parse("big").unwrap()),
        Err(ProfileRefusal::Unknown {
            profile: "big".into(),
            allowed: vec!["gpu".into()]
        })
    );
}

#[test]
fn image_config_errors_have_positions() {
    assert_err(
        "[defaults]\nimage = \"x\"\npull_policy = \"sometimes\"\n",
        3,
        15,
        &["sometimes"],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\n\n[users.alice]\nusers = [\"bob\"]\n",
        5,
        9,
        &["[profiles.NAME]"],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\n\n[registries.\"a/b\"]\nusername = \"u\"\npassword_file = \"/p\"\n",
        4,
        1,
        &["host or host:port"],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\n\n[registries.\"r:1\"]\nusername = \"\"\npassword_file = \"/p\"\n",
        5,
        12,
        &["username must not be empty"],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\n\n[profiles.gpu]\nusers = [\"Bad\"]\n",
        5,
        9,
        &["invalid user name"],
    );
}

#[test]
fn trusted_user_ca_keys_is_optional_and_resolved_against_the_config_directory() {
    let cfg = ok("[defaults]\nimage = \"busybox\"\n");
    assert_eq!(cfg.server.trusted_user_ca_keys, None);
    let cfg = ok("[server]\ntrusted_user_ca_keys = \"ca.pub\"\n[defaults]\nimage = \"busybox\"\n");
    assert_eq!(
        cfg.server.trusted_user_ca_keys.as_deref(),
        Some(Path::new("/etc/labgate/ca.pub"))
    );
    let cfg =
        ok("[server]\ntrusted_user_ca_keys = \"/srv/ca.pub\"\n[defaults]\nimage = \"busybox\"\n");
    assert_eq!(
        cfg.server.trusted_user_ca_keys.as_deref(),
        Some(Path::new("/srv/ca.pub"))
    );
    assert_err(
        "[server]\ntrusted_user_ca_keys = \"\"\n[defaults]\nimage = \"busybox\"\n",
        2,
        24,
        &["trusted_user_ca_keys is empty"],
    );
    assert_err(
        "[server]\ntrusted_user_ca_keys = 1\n[defaults]\nimage = \"busybox\"\n",
        2,
        24,
        &["invalid type"],
    );
}

#[test]
fn uid_is_a_number_host_or_auto_and_auto_uids_a_range() {
    let q = ok("[defaults]\nimage = \"busybox\"\nuid = \"host\"\n").defaults;
    assert_eq!((q.uid, q.gid), (Some(UidRule::Host), None));
    let c = ok(
        "[server]\nauto_uids = \"300000-300999\"\nstate_dir = \"/srv/labgate\"\n\
                [defaults]\nimage = \"busybox\"\nuid = \"auto\"\n\
                [users.alice]\nuid = 5000\n[users.bob]\nuid = \"host\"\ngid = 100\n",
    );
    assert_eq!(
        (c.defaults.uid, c.defaults.gid),
        (Some(UidRule::Auto), None)
    );
    assert_eq!(c.server.auto_uids, 300_000..=300_999);
    assert_eq!(c.server.state_dir, Path::new("/srv/labgate"));
    let bob = c.quota_for(&Username::parse("bob").unwrap());
    assert_eq!((bob.uid, bob.gid), (Some(UidRule::Host), Some(100)));
    assert_eq!(c.fixed_uids(), [5000].into());
    let d = ok("[defaults]\nimage = \"busybox\"\n");
    assert_eq!(d.server.auto_uids, DEFAULT_AUTO_UIDS);
    assert_eq!(d.server.state_dir, Path::new(DEFAULT_STATE_DIR));

    let e = err_at("[defaults]\nimage = \"busybox\"\nuid = \"alice\"\n");
    assert_eq!((e.line, e.column), (3, 7), "{e:?}");
    assert!(
        e.message
            .contains("uid \"alice\": write a number, \"host\""),
        "{}",
        e.message
    );
    let e = err_at("[defaults]\nimage = \"busybox\"\nuid = -1\n");
    assert!(
        e.message.contains("uid -1 is out of range"),
        "{}",
        e.message
    );
    for bad in ["\"10-5\"", "\"0-100000\"", "\"x\""] {
        let e = err_at(&format!(
            "[server]\nauto_uids = {bad}\n[defaults]\nimage = \"busybox\"\n"
        ));
        assert!(
            e.message.contains("write FIRST-LAST"),
            "{bad}: {}",
            e.message
        );
    }
}

#[test]
fn the_engine_is_this_hosts_docker_unless_cluster_names_another() {
    use crate::config::cluster::Engine;
    assert_eq!(
        ok("[defaults]\nimage = \"x\"\n").cluster.engine,
        Engine::Docker
    );
    let explicit = ok("[cluster]\nengine = \"docker\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!(explicit.cluster.engine, Engine::Docker);
    let swarm = ok("[cluster]\nengine = \"swarm\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!(swarm.cluster.engine, Engine::Swarm);
    assert_err(
        "[cluster]\nengine = \"kubernetes\"\n\n[defaults]\nimage = \"x\"\n",
        2,
        10,
        &[
            "engine = \"kubernetes\" is not available in this version",
            "\"swarm\"",
        ],
    );
    assert_err(
        "[cluster]\nengine = \"dokcer\"\n\n[defaults]\nimage = \"x\"\n",
        2,
        10,
        &["unknown engine \"dokcer\": expected one of \"docker\", \"swarm\""],
    );
    // A swarm key under the (default or explicit) docker engine names itself and the engine.
    assert_err(
        "[cluster]\nmanager = \"unix:///x\"\n\n[defaults]\nimage = \"x\"\n",
        2,
        11,
        &[
            "[cluster] manager applies only to engine = \"swarm\"",
            "\"docker\"",
        ],
    );
    assert_err(
        "[cluster]\nengine = \"docker\"\nnode_api = \"tcp://{addr}:2376\"\n\n[defaults]\nimage = \"x\"\n",
        3,
        12,
        &["[cluster] node_api applies only to engine = \"swarm\""],
    );
    assert_err(
        "[cluster]\nshared_paths = [\"/srv\"]\n\n[defaults]\nimage = \"x\"\n",
        2,
        16,
        &["[cluster] shared_paths applies only"],
    );
    assert_err(
        "[cluster]\nengine = \"docker\"\n\n[cluster.nodes.n2]\napi = \"unix:///x\"\n\n[defaults]\nimage = \"x\"\n",
        4,
        1,
        &["[cluster] nodes applies only"],
    );
}

#[test]
fn a_swarm_section_gets_every_default_it_leaves_out() {
    use crate::config::cluster::{Engine, EngineAddr};
    let c = ok("[cluster]\nengine = \"swarm\"\n\n[defaults]\nimage = \"x\"\n").cluster;
    assert_eq!(c.engine, Engine::Swarm);
    let s = &c.swarm;
    assert_eq!(s.manager, EngineAddr::Unix("/var/run/docker.sock".into()));
    assert_eq!(s.manager.to_string(), cluster::DEFAULT_MANAGER);
    assert_eq!(s.node_api.as_str(), "tcp://{addr}:2376");
    assert_eq!(s.tls_dir, Path::new("/etc/labgate/docker-tls"));
    assert_eq!(s.gpu_resource, "NVIDIA-GPU");
    assert_eq!(s.network, "labgate");
    assert!(s.shared_paths.is_empty() && s.nodes.is_empty());
    assert_eq!(
        s.agent_addr("gpu1", "10.1.0.5"),
        None,
        "no agents unless named"
    );
    assert_eq!(
        s.node_addr("gpu1", "10.1.0.5"),
        Ok(EngineAddr::Tcp {
            host: "10.1.0.5".into(),
            port: 2376
        })
    );
    assert!(s.uses_tcp(), "the default node API is TCP");
    assert_eq!(
        s.tls_files(),
        ["ca.pem", "cert.pem", "key.pem"].map(|f| Path::new("/etc/labgate/docker-tls").join(f))
    );
}

#[test]
fn a_full_swarm_section_is_read_with_paths_resolved_and_per_node_apis() {
    use crate::config::cluster::EngineAddr;
    let c = ok(r#"[cluster]
engine = "swarm"
manager = "tcp://10.0.0.1:2377"
node_api = "tcp://{hostname}.lab:2376"
node_agent = "tcp://{addr}"
tls_dir = "tls"
gpu_resource = "GPU.a100"
network = "lab-users"
shared_paths = ["/srv/home", "/datasets"]

[cluster.nodes.n2]
api = "unix:///run/x.sock"

[cluster.nodes.n3]
api = "tcp://[fd00::3]"
agent = "unix:///run/labgate-agent.sock"

[cluster.nodes.n5]
agent = "tcp://n5-mgmt:7000"

[defaults]
image = "x"
home = "/srv/home/{user}"
"#)
    .cluster;
    let s = &c.swarm;
    assert_eq!(
        s.manager,
        EngineAddr::Tcp {
            host: "10.0.0.1".into(),
            port: 2377
        }
    );
    assert_eq!(s.node_api.as_str(), "tcp://{hostname}.lab:2376");
    assert_eq!(
        s.tls_dir,
        Path::new("/etc/labgate/tls"),
        "relative to the config's directory"
    );
    assert_eq!(s.gpu_resource, "GPU.a100");
    assert_eq!(s.network, "lab-users");
    assert_eq!(
        s.shared_paths,
        [PathBuf::from("/srv/home"), PathBuf::from("/datasets")]
    );
    assert_eq!(
        s.node_addr("n2", "10.0.0.2"),
        Ok(EngineAddr::Unix("/run/x.sock".into()))
    );
    assert_eq!(
        s.node_addr("n3", "10.0.0.3").unwrap().to_string(),
        "tcp://[fd00::3]:2376"
    );
    assert_eq!(
        s.node_addr("n4", "10.0.0.4").unwrap().to_string(),
        "tcp://n4.lab:2376"
    );
    let agent = |host: &str, addr: &str| s.agent_addr(host, addr).unwrap().unwrap().to_string();
    assert_eq!(
        agent("n2", "10.0.0.2"),
        "tcp://10.0.0.2:2378",
        "the agent's port"
    );
    assert_eq!(agent("n3", "10.0.0.3"), "unix:///run/labgate-agent.sock");
    assert_eq!(agent("n5", "10.0.0.5"), "tcp://n5-mgmt:7000");
    assert_eq!(
        s.node_addr("n5", "10.0.0.5").unwrap().to_string(),
        "tcp://n5.lab:2376",
        "a node entry with only an agent keeps the template's API"
    );
    assert!(s.is_shared(Path::new("/srv/home/alice")));
    assert!(!s.is_shared(Path::new("/srv/homework")));
    assert!(!s.is_shared(Path::new("/var/lib/labgate/home/alice")));
}

#[test]
fn bad_swarm_values_are_refused_at_their_position_with_the_reason() {
    let swarm = |line: &str| {
        format!("[cluster]\nengine = \"swarm\"\n{line}\n\n[defaults]\nimage = \"x\"\n")
    };
    for (line, column, needles) in [
        (
            "manager = \"http://10.0.0.1:2375\"",
            11,
            &[
                "\"http://10.0.0.1:2375\"",
                "unix:///PATH or tcp://HOST:PORT",
            ][..],
        ),
        (
            "manager = \"unix://run/docker.sock\"",
            11,
            &["absolute path"],
        ),
        ("manager = \"tcp://m1:0\"", 11, &["\"0\" is not a port"]),
        (
            "node_api = \"tcp://{ip}:2376\"",
            12,
            &["unknown placeholder {ip}", "{addr}", "{hostname}"],
        ),
        ("node_api = \"tcp://{addr:2376\"", 12, &["unclosed {"]),
        (
            "node_agent = \"http://{addr}:2378\"",
            14,
            &["unix:///PATH or tcp://HOST:PORT"],
        ),
        (
            "node_agent = \"tcp://{node}:2378\"",
            14,
            &["unknown placeholder {node}"],
        ),
        (
            "gpu_resource = \"NVIDIA GPU\"",
            16,
            &["gpu_resource \"NVIDIA GPU\"", "node-generic-resources"],
        ),
        ("gpu_resource = \"\"", 16, &["generic resource kind"]),
        ("network = \"two words\"", 11, &["not a network name"]),
        (
            "shared_paths = [\"/srv/home\", \"datasets\"]",
            30,
            &["shared_paths: datasets is not absolute", "every node"],
        ),
        (
            "managr = \"unix:///x\"",
            1,
            &["unknown field `managr`", "manager"],
        ),
    ] {
        assert_err(&swarm(line), 3, column, needles);
    }
    assert_err(
        &swarm("\n[cluster.nodes.n2]\napi = \"ftp://n2\""),
        5,
        7,
        &["\"ftp://n2\"", "unix:///PATH or tcp://HOST:PORT"],
    );
    assert_err(
        &swarm("\n[cluster.nodes.n2]\naddr = \"tcp://n2\""),
        5,
        1,
        &["unknown field `addr`"],
    );
    let empty = err_at(&swarm("\n[cluster.nodes.n2]\n"));
    assert!(
        empty.message.contains("[cluster.nodes.n2] says nothing")
            && empty.message.contains("api")
            && empty.message.contains("agent"),
        "{}",
        empty.message
    );
}

#[test]
fn gpu_queue_keys_have_defaults_and_are_checked() {
    let c = ok("[defaults]\nimage = \"x\"\n\n[users.dave]\ngpu_share = 2.5\n");
    assert!(c.gpu.queue);
    assert_eq!(c.gpu.max_wait, std::time::Duration::from_secs(12 * 3600));
    assert_eq!(
        c.gpu.fair_share_half_life,
        std::time::Duration::from_secs(7 * 86_400)
    );
    assert_eq!(c.quota_for(&user("dave")).gpu_share, 2.5);
    assert_eq!(c.quota_for(&user("erin")).gpu_share, 1.0);
    let off = ok("[gpu]\nqueue = false\nmax_wait = \"30m\"\n\n[defaults]\nimage = \"x\"\n");
    assert!(!off.gpu.queue);
    assert_eq!(off.gpu.max_wait, std::time::Duration::from_secs(1800));
    let zero = err_at("[defaults]\nimage = \"x\"\ngpu_share = 0\n");
    assert!(zero.message.contains("positive weight"), "{}", zero.message);
    let short = err_at("[gpu]\nmax_wait = \"0s\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!(short.line, 2, "{}", short.display);
    assert!(short.message.contains("at least 1s"), "{}", short.message);
}

#[test]
fn gpu_reclaim_is_off_by_default_per_user_exemptions_inherit_and_values_are_checked() {
    let c = ok("[defaults]\nimage = \"x\"\n");
    assert_eq!(c.gpu.reclaim_idle, None, "off by default");
    assert_eq!(c.gpu.reclaim_warning, Duration::from_secs(15 * 60));
    assert!(c.defaults.gpu_reclaim);
    let on = ok(concat!(
        "[gpu]\nreclaim_idle = \"2h\"\nreclaim_warning = \"10m\"\n\n",
        "[defaults]\nimage = \"x\"\n\n",
        "[users.alice]\ngpu_reclaim = false\n\n",
        "[users.bob]\nmemory = \"1G\"\n\n",
        "[profiles.train]\nusers = [\"alice\", \"bob\"]\n\n",
        "[profiles.demo]\nusers = [\"bob\"]\ngpu_reclaim = false\n",
    ));
    assert_eq!(on.gpu.reclaim_idle, Some(Duration::from_secs(7200)));
    assert_eq!(on.gpu.reclaim_warning, Duration::from_secs(600));
    assert!(!on.quota_for(&user("alice")).gpu_reclaim);
    assert!(on.quota_for(&user("bob")).gpu_reclaim);
    let profile = |u: &str, p: &str| {
        on.profile_quota(&user(u), &ProfileName::parse(p).unwrap())
            .unwrap()
            .gpu_reclaim
    };
    assert!(
        !profile("alice", "train"),
        "a profile inherits its user's exemption"
    );
    assert!(profile("bob", "train"));
    assert!(!profile("bob", "demo"), "a profile exempts its containers");
    let never = ok("[gpu]\nreclaim_idle = \"never\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!(never.gpu.reclaim_idle, None);

    let short = err_at("[gpu]\nreclaim_idle = \"500ms\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!((short.line, short.column), (2, 16), "{}", short.display);
    assert!(short.message.contains("at least 1s"), "{}", short.message);
    let bad = err_at("[gpu]\nreclaim_idle = \"soon\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!((bad.line, bad.column), (2, 16), "{}", bad.display);
    assert!(
        bad.message.contains("reclaim_idle \"soon\"") && bad.message.contains("\"never\""),
        "{}",
        bad.message
    );
    let warning = err_at("[gpu]\nreclaim_warning = \"0s\"\n\n[defaults]\nimage = \"x\"\n");
    assert_eq!(
        (warning.line, warning.column),
        (2, 19),
        "{}",
        warning.display
    );
    assert!(
        warning
            .message
            .contains("reclaim_warning must be at least 1s"),
        "{}",
        warning.message
    );
    let typed = err_at("[defaults]\nimage = \"x\"\ngpu_reclaim = \"no\"\n");
    assert_eq!((typed.line, typed.column), (3, 15), "{}", typed.display);
}

#[test]
fn constraints_merge_like_the_other_quota_keys_and_each_entry_is_checked() {
    let c = ok(concat!(
        "[defaults]\nimage = \"x\"\nconstraints = [\"node.labels.gpu == a100\"]\n\n",
        "[users.alice]\nconstraints = [\"node.labels.gpu != a100\", \"node.role == worker\"]\n\n",
        "[users.bob]\nmemory = \"1G\"\n\n",
        "[users.carol]\nconstraints = []\n\n",
        "[profiles.big]\nusers = [\"alice\", \"bob\"]\nconstraints = [\"node.hostname == gpu9\"]\n\n",
        "[profiles.small]\nusers = [\"alice\"]\nmemory = \"2G\"\n",
    ));
    assert_eq!(c.defaults.constraints, ["node.labels.gpu == a100"]);
    assert_eq!(
        c.quota_for(&user("alice")).constraints,
        ["node.labels.gpu != a100", "node.role == worker"]
    );
    assert_eq!(
        c.quota_for(&user("bob")).constraints,
        ["node.labels.gpu == a100"],
        "a user's table without the key keeps [defaults]'"
    );
    assert!(c.quota_for(&user("carol")).constraints.is_empty());
    assert!(
        ok("[defaults]\nimage = \"x\"\n")
            .defaults
            .constraints
            .is_empty()
    );
    let profile = |u: &str, p: &str| {
        c.profile_quota(&user(u), &ProfileName::parse(p).unwrap())
            .unwrap()
            .constraints
            .clone()
    };
    assert_eq!(profile("bob", "big"), ["node.hostname == gpu9"]);
    assert_eq!(
        profile("alice", "small"),
        ["node.labels.gpu != a100", "node.role == worker"],
        "a profile without the key keeps its user's"
    );
    let spec =
        crate::runtime::ContainerSpec::new(&user("alice"), c.quota_for(&user("alice")), None);
    assert_eq!(spec.constraints, c.quota_for(&user("alice")).constraints);

    assert_err(
        "[defaults]\nimage = \"x\"\nconstraints = [\"node.labels.gpu == a100\", \"gpu=a100\"]\n",
        3,
        43,
        &["constraint \"gpu=a100\": write KEY == VALUE or KEY != VALUE"],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\n\n[users.alice]\nconstraints = [\" == a100\"]\n",
        5,
        16,
        &["has no key"],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\n\n[profiles.p]\nusers = [\"alice\"]\nconstraints = [\"node.label.gpu == a100\"]\n",
        6,
        16,
        &[
            "Swarm matches no node on the key \"node.label.gpu\"",
            "node.labels.NAME",
        ],
    );
    assert_err(
        "[defaults]\nimage = \"x\"\nconstraints = \"node.labels.gpu == a100\"\n",
        3,
        15,
        &["expected a sequence"],
    );
}
