//! The `labgate` binary: command line, logging, signals. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use labgate::auth::KeyStore;
use labgate::{app, config, demo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An SSH gateway that gives every lab member their own container.
#[derive(Parser)]
#[command(version, about)]
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
    /// utilisation, MIG mode, processes, and the users whose running containers hold each.
    Gpus {
        /// Config file.
        #[arg(long, short, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LABGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Gpus { config } => run(async move {
            let loaded = config::load(&config)?;
            print!("{}", labgate::gpu::report(&loaded).await?);
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
    if report.errors.is_empty() {
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
