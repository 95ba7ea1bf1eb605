//! `sipalias-dispatcher [--config FILE]`: runs the dispatcher until SIGTERM or Ctrl-C.
//!
//! The configuration file is `--config`, else `$SIPALIAS_CONFIG`, else `./sipalias.toml` if it
//! exists; `SIPALIAS_DISPATCHER__*` variables override it. Logs go to stderr, filtered by
//! `RUST_LOG` (default `info`). Exit status: 0 after a clean shutdown, 2 for a configuration
//! error, including an unusable certificate (nothing has been bound), 1 for any other failure.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use sipalias_dispatcher::DispatcherConfig;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// The file read when neither `--config` nor `SIPALIAS_CONFIG` names one.
const DEFAULT_CONFIG: &str = "sipalias.toml";

/// The stateless SIP edge of a sipalias cluster.
#[derive(Debug, Parser)]
#[command(name = "sipalias-dispatcher", version)]
struct Args {
    /// TOML file whose [dispatcher] table configures this process.
    #[arg(long, value_name = "FILE", env = "SIPALIAS_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Plain text when logging to a file or a pipe (the e2e harness reads these lines).
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let path = args
        .config
        .or_else(|| Path::new(DEFAULT_CONFIG).exists().then(|| PathBuf::from(DEFAULT_CONFIG)));
    let config = match DispatcherConfig::load(path.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sipalias-dispatcher: configuration error: {e}");
            if path.is_none() {
                eprintln!(
                    "sipalias-dispatcher: no configuration file: use --config FILE, \
                     SIPALIAS_CONFIG or ./{DEFAULT_CONFIG}"
                );
            }
            return ExitCode::from(2);
        }
    };
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        // A certificate that cannot be used is found at start-up, before anything is bound.
        Err(e) if matches!(e.downcast_ref(), Some(sipalias_dispatcher::Error::Config(_))) => {
            eprintln!("sipalias-dispatcher: configuration error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: DispatcherConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        info!(id = %config.id, "sipalias-dispatcher starting");
        match sipalias_dispatcher::run(config, shutdown_signal()).await {
            // Kept as is (no context) so main can tell a configuration error by its type.
            Err(e @ sipalias_dispatcher::Error::Config(_)) => Err(anyhow::Error::new(e)),
            other => other.context("dispatcher failed"),
        }
    })
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => info!("interrupt: shutting down"),
                }
                return;
            }
            Err(e) => warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the dispatcher"),
        }
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => info!("interrupt: shutting down"),
        // Without any signal handler the process runs until killed.
        Err(e) => {
            warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    }
}
