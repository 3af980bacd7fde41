//! Command-line parsing and dispatch; `anyhow` lives only here.

mod demo;
mod log;
mod redact;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use custody_config::{Config, DEFAULT_TOML};

#[derive(Parser)]
#[command(
    name = "custody",
    version,
    about = "An audit-first gateway for LLM APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the embedded default config without --config).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print or check configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Read, search and verify the audit trail.
    Log {
        #[command(subcommand)]
        command: Box<log::LogCommand>,
    },
    /// Make an Ed25519 key pair for signing seals and checkpoints: DIR/NAME.key (0600) and DIR/NAME.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "custody")]
        name: String,
    },
    /// Redact standard input to standard output, line by line, with the configured rules.
    Redact {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print entity counts as JSON on standard error.
        #[arg(long)]
        report: bool,
    },
    /// A tour without an API key: a mock provider, two requests, their records, verify.
    Demo {
        /// Keep the demo's audit trail in this directory (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the loopback mock provider (for tests and demos).
    #[command(hide = true)]
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the embedded default configuration.
    Default,
    /// Validate a configuration file.
    Check { file: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server logs what it does; the review commands speak only when something is wrong.
    init_tracing(
        if matches!(
            cli.command,
            Command::Serve { .. } | Command::MockProvider { .. }
        ) {
            "info"
        } else {
            "warn"
        },
    );
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("custody: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => serve(config),
        Command::Config {
            command: ConfigCommand::Default,
        } => {
            print!("{DEFAULT_TOML}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let c = Config::load(&file)?;
            println!("{}: ok ({} routes)", file.display(), c.routes.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { command } => log::run(*command),
        Command::Keygen { out, name } => {
            let (private, public) = custody_audit::signing::keygen(&out, &name)?;
            println!(
                "private key: {} (set [audit] signing_key to it; keep it secret)",
                private.display()
            );
            println!(
                "public key:  {} (give it to reviewers: custody log verify --pubkey)",
                public.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Redact { config, report } => redact::run(config.as_ref(), report),
        Command::Demo { dir } => runtime()?.block_on(demo::run(dir)),
        Command::MockProvider { listen } => runtime()?.block_on(async {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            println!(
                "mock provider listening on http://{}",
                listener.local_addr()?
            );
            custody_proxy::mock::serve(listener, shutdown_signal()).await;
            Ok(ExitCode::SUCCESS)
        }),
    }
}

pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::embedded_default()?,
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = load_config(config.as_ref())?;
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen.addr)
            .await
            .with_context(|| format!("binding {}", config.listen.addr))?;
        let addr = listener.local_addr()?;
        for r in &config.routes {
            tracing::info!(route = %r.name, prefix = %r.prefix, upstream = %r.upstream, provider = %r.provider, "route");
        }
        tracing::info!(audit_dir = %config.audit.dir.display(), "auditing every exchange");
        // Scripts and tests read this line to learn the bound address.
        println!("custody listening on http://{addr}");
        let summary = custody_proxy::run(listener, config, shutdown_signal()).await?;
        if summary.dropped > 0 {
            eprintln!("custody: {} exchanges were not audited (queue full or writer stopped)", summary.dropped);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
