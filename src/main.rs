//! The `labgate` binary: command line, logging, signals. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use labgate::admin::cmd;
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
    /// Print GPU use per user (and profile) over a period: GPU-hours held, how busy they
    /// kept them, and their waits in the GPU queue; from the accounting database in
    /// `[server] state_dir`, with or without a running gateway.
    Usage {
        /// Config file (its `[server] state_dir` holds the database).
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// The period, back from now: `7d`, `30d`, `12h`.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
    /// Run the node agent a cluster's nodes run beside their Docker Engine: the gateway's
    /// forwards into containers on this node connect through it, straight into the
    /// container, instead of through the engine's exec stream (`[cluster] node_agent`).
    NodeAgent {
        /// Where to listen: `tcp://HOST:PORT` (TLS, client certificates required) or
        /// `unix:///PATH` (root only).
        #[arg(long, default_value = "tcp://0.0.0.0:2378")]
        listen: String,
        /// CA that signs the gateway's client certificate (the node's Docker API's `tlscacert`).
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        tls_ca: Option<PathBuf>,
        /// The agent's certificate (the node's Docker API's `tlscert` does).
        #[arg(long, requires_all = ["tls_ca", "tls_key"])]
        tls_cert: Option<PathBuf>,
        /// The agent's key (the node's Docker API's `tlskey`).
        #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
        tls_key: Option<PathBuf>,
        /// The node's Docker Engine socket.
        #[arg(long, default_value = "/var/run/docker.sock")]
        docker: PathBuf,
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
        Command::Check { config } => {
            if labgate::check::run(&config) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
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
            print!(
                "{}",
                cmd::gpus::call(&admin.socket()?, &admin.config).await?
            );
            Ok(())
        }),
        Command::Status { admin, json } => run(async move {
            print!("{}", cmd::status::call(&admin.socket()?, json).await?);
            Ok(())
        }),
        Command::Stop { user, admin } => run(async move {
            print!("{}", cmd::stop::call(&admin.socket()?, &user).await?);
            Ok(())
        }),
        Command::Usage {
            config,
            since,
            json,
        } => match cmd::usage::call(&config, since, json) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("labgate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Kick { user, admin } => run(async move {
            print!("{}", cmd::kick::call(&admin.socket()?, &user).await?);
            Ok(())
        }),
        Command::Serve { config } => run(async move {
            app::run(&config, shutdown_signal()).await?;
            Ok(())
        }),
        Command::NodeAgent {
            listen,
            tls_ca,
            tls_cert,
            tls_key,
            docker,
        } => run_on(tokio::runtime::Builder::new_current_thread(), async move {
            let listen =
                config::cluster::EngineAddr::parse_with_port(&listen, config::cluster::AGENT_PORT)
                    .map_err(|e| anyhow::anyhow!("--listen {e}"))?;
            let tls = match (tls_ca, tls_cert, tls_key) {
                (Some(ca), Some(cert), Some(key)) => {
                    Some(labgate::node_agent::TlsFiles { ca, cert, key })
                }
                _ => None,
            };
            let options = labgate::node_agent::AgentOptions {
                listen,
                tls,
                docker,
            };
            let stop = tokio_util::sync::CancellationToken::new();
            let stopping = stop.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                stopping.cancel();
            });
            labgate::node_agent::serve(options, stop).await?;
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
    run_on(tokio::runtime::Builder::new_multi_thread(), fut)
}

fn run_on(
    mut builder: tokio::runtime::Builder,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match builder
        .enable_all()
        // Blocking threads (hangups waiting out their grace period, namespace entries,
        // SQLite writes) go soon after a burst: with tokio's 10 s, periodic work handed to
        // any idle one kept a burst's threads alive for ever.
        .thread_keep_alive(std::time::Duration::from_secs(2))
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
            eprintln!("labgate: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
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

/// An error and its causes on one line, `a: b: c`; a cause whose text the line already ends
/// with is not repeated (the library's errors name their cause in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(labgate::config::ConfigError::Io {
            path: "/etc/labgate/labgate.toml".into(),
            source: io,
        });
        assert_eq!(
            super::chain(&e),
            "/etc/labgate/labgate.toml: cannot read config: no such file"
        );
        let wrapped = e.context("starting the gateway");
        assert_eq!(
            super::chain(&wrapped),
            "starting the gateway: /etc/labgate/labgate.toml: cannot read config: no such file"
        );
    }
}
