//! The `labgate` binary: command line, logging, signals. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use hyper::Method;
use labgate::admin::client;
use labgate::auth::KeyStore;
use labgate::{app, config, demo};
use tracing_subscriber::Layer as _;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `labgate --version`: the crate's version and the commit it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LABGATE_COMMIT"),
    ")"
);

/// What `--help` and the man page add after the commands: where the files are.
const FILES: &str = "\
Files (as the Debian package installs them):
  /etc/labgate/labgate.toml   the config (`labgate check` validates it)
  /etc/labgate/keys/NAME.pub  one file per user: their public keys
  /var/lib/labgate            the host key and the users' homes
  /usr/lib/labgate            the helpers bind-mounted into containers (labgate-relay, labgate-sftp)
  /var/log/labgate            the audit log";

/// An SSH gateway that gives every lab member their own container.
#[derive(Parser)]
#[command(version = VERSION, about, after_long_help = FILES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate the config and key files, like `sshd -t`: prints each problem with its file,
    /// line and column; exit status 0 when all is well, 1 otherwise.
    Check {
        /// Config file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print the host's GPUs (NVML, from `[gpu] nvml_library`): index, UUID, name, memory,
    /// utilisation, MIG mode, processes, and the users whose containers hold each. Asks the
    /// running gateway; without one, reads NVML and the containers' labels directly.
    Gpus {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the running gateway's containers (state, image, GPUs, idle timers) and
    /// connections (user, peer, sessions, forwards, key).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the gateway's JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Disconnect USER's connections and stop their containers (home and container kept;
    /// their next login starts it again).
    Stop {
        /// The user.
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Disconnect USER's connections; their containers keep running.
    Kick {
        /// The user.
        user: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run the gateway on the embedded demo config, with a `demo` user and a locally built
    /// busybox image; prints the ssh command to log in.
    Demo {
        /// Directory for the demo's config, keys, host key and homes.
        #[arg(long, default_value = ".labgate-demo")]
        dir: PathBuf,
        /// Docker Engine socket.
        #[arg(long, default_value = "/var/run/docker.sock")]
        docker: String,
    },
    /// Print the shell completion script for SHELL, e.g.
    /// `labgate completions bash > /etc/bash_completion.d/labgate`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (labgate.1 and one per command) into DIR.
    #[command(hide = true)]
    Man {
        /// Directory to write them into (created if missing).
        dir: PathBuf,
    },
}

/// How an admin command finds the running gateway.
#[derive(clap::Args)]
struct AdminArgs {
    /// Config file (its `[admin] socket` is used).
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// The admin socket, overriding the config's.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl AdminArgs {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => Ok(config::load(&self.config)?.admin.socket),
        }
    }
}

fn main() -> ExitCode {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let cli = Cli::parse();
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .fmt_fields(labgate::admin::logtext::TextFields)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(
                    tracing_subscriber::EnvFilter::try_from_env("LABGATE_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                ),
        )
        .with(
            labgate::admin::audit::AuditLayer.with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(labgate::admin::audit::TARGET, tracing::Level::INFO)
                    .with_target("labgate", tracing::Level::INFO),
            ),
        )
        .init();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Completions { shell } => {
            // Into memory first: a closed stdout is an error to report, not a panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "labgate", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("labgate: cannot write the completion script: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Man { dir } => {
            match std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("labgate: cannot write man pages to {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Gpus { admin } => run(async move {
            let socket = admin.socket()?;
            match client::request(&socket, Method::GET, "/gpus").await {
                Ok(table) => print!("{table}"),
                Err(client::ClientError::Connect { .. }) => {
                    eprintln!(
                        "labgate: no gateway answers on {}: reading NVML and container labels directly",
                        socket.display()
                    );
                    let loaded = config::load(&admin.config)?;
                    print!("{}", labgate::runtime::gpu_report(&loaded).await?);
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }),
        Command::Status { admin, json } => run(async move {
            let body = client::request(&admin.socket()?, Method::GET, "/status").await?;
            if json {
                print!("{body}");
            } else {
                let status: labgate::admin::status::Status = serde_json::from_str(&body)
                    .context("the gateway's status answer is not what this labgate expects")?;
                print!("{}", labgate::admin::status::render(&status));
            }
            Ok(())
        }),
        Command::Stop { user, admin } => run(async move {
            let path = format!("/users/{user}/stop");
            let body = client::request(&admin.socket()?, Method::POST, &path).await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!(
                "{user}: {} connection(s) ended, stopped: {}",
                v["kicked"],
                v["stopped"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| a
                        .iter()
                        .filter_map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_else(|| "nothing was running".to_owned())
            );
            Ok(())
        }),
        Command::Kick { user, admin } => run(async move {
            let path = format!("/users/{user}/kick");
            let body = client::request(&admin.socket()?, Method::POST, &path).await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            println!("{user}: {} connection(s) ended", v["kicked"]);
            Ok(())
        }),
        Command::Serve { config } => run(async move {
            app::run(&config, shutdown_signal()).await?;
            Ok(())
        }),
        Command::Demo { dir, docker } => run(async move {
            let (config, key) = demo::prepare(&dir, &docker)
                .await
                .context("preparing the demo")?;
            let loaded = config::load(&config)?;
            let port = loaded.server.listen.port();
            let host = loaded.server.listen.ip();
            println!(
                "demo ready: log in with\n  ssh -i {} -p {port} -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={} demo@{host}",
                key.display(),
                dir.join("known_hosts").display()
            );
            app::serve(loaded, shutdown_signal()).await?;
            Ok(())
        }),
    }
}

fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let store = KeyStore::new(config.server.keys_dir.clone());
    let report = match store.scan() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for e in &report.errors {
        eprintln!("{e}");
    }
    let ca_ok = check_trusted_cas(&config);
    for user in config.configured_users() {
        if !report.users.iter().any(|(u, _)| u == user) {
            eprintln!(
                "{}: warning: [users.{user}] has no key file {}: that user cannot log in",
                config.source.display(),
                store.path_of(user).display()
            );
        }
    }
    warn_unreadable_registry_secrets(&config);
    report_helpers(&config);
    for (table, home, source) in config.homes_under_writable_mounts() {
        eprintln!(
            "{}: warning: {table} home {home:?} lies under the writable mount source {}: users who can write there could replace a home with a symlink (labgate refuses to start such a container; keep homes outside writable mounts)",
            config.source.display(),
            source.display()
        );
    }
    if report.errors.is_empty() && ca_ok {
        println!(
            "{}: OK ({} user(s) with keys in {})",
            config.source.display(),
            report.users.len(),
            config.server.keys_dir.display()
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `labgate check` on the helpers: which were found (stdout), and a warning naming what is
/// lost for each one missing or dynamically linked. Neither fails the check: the gateway runs
/// without them, degraded.
fn report_helpers(config: &config::Config) {
    let docker = &config.docker;
    let helpers = [
        (
            &docker.relay_helper,
            config::helpers::RELAY,
            "relay_helper",
            "no direct path: sessions without a terminal (scp, rsync, git, sftp) go through the engine's exec stream, and forwards fail where the gateway cannot enter containers' namespaces (forward_via = \"exec\")",
        ),
        (
            &docker.sftp_helper,
            config::helpers::SFTP,
            "sftp_helper",
            "images without their own sftp-server get no sftp (nor scp, which speaks sftp)",
        ),
    ];
    let file = config.source.display();
    for (helper, name, key, without) in helpers {
        if !helper.found {
            if helper.origin == config::helpers::Origin::Configured {
                eprintln!(
                    "{file}: warning: [docker] {key} = {:?} does not exist: {without}",
                    helper.path
                );
            } else {
                let searched: Vec<String> = helper
                    .searched
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                eprintln!(
                    "{file}: warning: no {name} helper (looked for {}): {without}",
                    searched.join(", ")
                );
            }
            continue;
        }
        println!(
            "helper {name}: {} ({})",
            helper.path.display(),
            helper.origin
        );
        if config::helpers::is_dynamically_linked(&helper.path) == Some(true) {
            eprintln!(
                "{file}: warning: helper {} is dynamically linked: it runs only in images whose C library suits it (elsewhere: {without}); build it static as scripts/deb does",
                helper.path.display()
            );
        }
    }
}

/// `labgate check` on `[server] trusted_user_ca_keys`: the file must read and hold at least
/// one CA key; bad lines are reported. True when all is well (or no CA file is set).
fn check_trusted_cas(config: &config::Config) -> bool {
    let Some(path) = &config.server.trusted_user_ca_keys else {
        return true;
    };
    let cas = match std::fs::read_to_string(path) {
        Ok(text) => labgate::auth::TrustedCas::parse(path, &text),
        Err(e) => {
            eprintln!(
                "{}: cannot read trusted_user_ca_keys: {e}: certificate logins are refused",
                path.display()
            );
            return false;
        }
    };
    for e in &cas.errors {
        eprintln!("{e}");
    }
    if cas.is_empty() {
        eprintln!(
            "{}: no usable CA key: certificate logins are refused",
            path.display()
        );
    }
    cas.errors.is_empty() && !cas.is_empty()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Warns about registry password files that cannot be read (pulls from there would fail).
/// Only the file's readability is checked; its contents are never printed.
fn warn_unreadable_registry_secrets(config: &config::Config) {
    let mut seen = std::collections::BTreeSet::new();
    let images = labgate::runtime::docker::prepull::images_of(config);
    for auth in images.values().filter_map(|(_, auth)| auth.as_ref()) {
        if seen.insert(auth.password_file.clone())
            && let Err(e) = std::fs::File::open(&auth.password_file)
        {
            eprintln!(
                "{}: warning: [registries.\"{}\"] password_file {} cannot be read ({e}): pulls from it will fail",
                config.source.display(),
                auth.registry,
                auth.password_file.display()
            );
        }
    }
}
