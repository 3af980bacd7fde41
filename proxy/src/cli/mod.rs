//! Command-line parsing and dispatch; `anyhow` lives only here.

mod console;
mod demo;
mod evidence;
mod log;
mod policy;
mod redact;
mod trail;

use std::{path::PathBuf, process::ExitCode, sync::Arc};

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
    /// The review console: a read-only web UI and API over a trail, for reviewers with
    /// a token; every read is written to its own access trail (docs/console.md).
    Console {
        /// A console configuration ([console] and [[reviewer]]), or a whole one holding them.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check policy rules, and try them on exported records.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Make a virtual key for a client: prints the key (give it to the client) and the
    /// `[[key]]` entry holding only its SHA-256.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
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
    /// A tour without an API key: a mock provider, two requests, their records, verify;
    /// then the review console over them until Ctrl-C.
    Demo {
        /// Keep the demo's audit trail in this directory (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where the review console listens at the end of the tour.
        #[arg(long, default_value = "127.0.0.1:9444")]
        console_listen: std::net::SocketAddr,
        /// End after verifying, without the console.
        #[arg(long)]
        no_console: bool,
    },
    /// A mock OpenAI/Anthropic provider on loopback: point a route at it to try custody
    /// without an API key (it answers chat, messages and streams with canned text)
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// A new random virtual key.
    New {
        /// The key's id (recorded as `client.key_id`).
        #[arg(long)]
        id: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        team: Option<String>,
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
    // The server logs what it does (in the format its config asks for, set up once the
    // config is read); the review commands speak only when something is wrong.
    match cli.command {
        Command::Serve { .. } => {}
        Command::MockProvider { .. } => init_tracing("info", custody_config::LogFormat::Text),
        _ => init_tracing("warn", custody_config::LogFormat::Text),
    }
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("custody: {}", message(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause only if the message before it does
/// not already say it (our errors often name their source in their own text).
fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn init_tracing(default: &str, format: custody_config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        custody_config::LogFormat::Json => fmt.json().init(),
        custody_config::LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
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
            custody_audit::policy::PolicySet::from_config(&c)?;
            println!(
                "{}: ok ({} routes, {} policies)",
                file.display(),
                c.routes.len(),
                c.policies.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Log { command } => log::run(*command),
        Command::Policy { command } => policy::run(command),
        Command::Console { config } => console::run(&config),
        Command::Key {
            command: KeyCommand::New { id, user, team },
        } => {
            let (key, hash) = custody_proxy::keys::generate()?;
            let entry = custody_config::VirtualKey {
                id,
                user,
                team,
                key_sha256: Some(hash),
                key_env: None,
                routes: None,
                models: None,
                upstream_key_env: None,
            };
            eprintln!("give this key to the client (it is not stored anywhere):");
            println!("{key}");
            eprintln!("\nand add this to the configuration (set upstream_key_env too):\n");
            let mut table = std::collections::BTreeMap::new();
            table.insert("key", vec![entry]);
            eprint!("{}", toml::to_string(&table)?);
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Demo {
            dir,
            console_listen,
            no_console,
        } => runtime()?.block_on(demo::run(dir, (!no_console).then_some(console_listen))),
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

/// The configuration: `--config`, else `CUSTODY_CONFIG`, else the embedded default;
/// then the `CUSTODY_*` overrides (docs/deploy.md lists them).
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let from_env = std::env::var_os("CUSTODY_CONFIG").map(PathBuf::from);
    let config = match path.or(from_env.as_ref()) {
        Some(p) => Config::load(p)?,
        None => Config::embedded_default()?,
    };
    Ok(config.with_env(|k| std::env::var(k).ok())?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = match load_config(path.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            init_tracing("info", custody_config::LogFormat::Text);
            return Err(e);
        }
    };
    init_tracing("info", config.log.format);
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen.addr)
            .await
            .with_context(|| format!("binding {}", config.listen.addr))?;
        let addr = listener.local_addr()?;
        for r in &config.routes {
            tracing::info!(route = %r.name, prefix = %r.prefix, upstream = %r.upstream, provider = %r.provider, "route");
        }
        tracing::info!(audit_dir = %config.audit.dir.display(), "auditing every exchange");
        let shutdown = shutdown_signal();
        // Scripts and tests read this line to learn the bound address.
        println!("custody listening on http://{addr}");
        let admin = match config.admin.addr {
            Some(a) => {
                let l = tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding the admin listener on {a}"))?;
                println!("custody admin on http://{}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
        let file = path.clone();
        let reload_source: custody_proxy::admin::ReloadSource =
            Arc::new(move || load_config(file.as_ref()).map_err(|e| format!("{e:#}")));
        tokio::spawn(reload_on_sighup(path, reload_tx));
        let opts = custody_proxy::RunOptions {
            reloads: Some(reloads),
            admin,
            reload_source: Some(reload_source),
            writer_gate: None,
        };
        let summary = custody_proxy::run_with(listener, config, shutdown, opts).await?;
        if summary.dropped > 0 {
            eprintln!("custody: {} exchanges were not audited (queue full or writer stopped)", summary.dropped);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Re-reads the configuration file on each SIGHUP and hands it to the server; a file
/// that does not load is refused with its error, and the running configuration stays.
async fn reload_on_sighup(
    path: Option<PathBuf>,
    reloads: tokio::sync::mpsc::UnboundedSender<custody_proxy::ReloadRequest>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reloads are off");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let config = match load_config(path.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "configuration reload refused; the previous one stays in force");
                    continue;
                }
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            if reloads.send((config, tx)).is_err() {
                return;
            }
            let _ = rx.await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, reloads);
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when it is first awaited: a SIGTERM right after start must not kill the process
/// without its orderly shutdown.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let interrupt = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt => {}
                }
            }
            None => {
                let _ = interrupt.await;
            }
        }
        #[cfg(not(unix))]
        let _ = interrupt.await;
        tracing::info!("shutdown signal received");
    }
}
