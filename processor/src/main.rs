//! `sipalias-processor [--config FILE]`: runs one processor replica.

/// mimalloc: far cheaper than glibc malloc for the many small, short-lived allocations of
/// SIP messages (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use sipalias_processor::ProcessorConfig;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let path = config_path()?;
    let config = match ProcessorConfig::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sipalias-processor: {e}");
            std::process::exit(2);
        }
    };
    let mut runtime = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(sipalias_processor::run(config, shutdown_signal()))?;
    Ok(())
}

fn config_path() -> anyhow::Result<Option<PathBuf>> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var_os("SIPALIAS_CONFIG").map(PathBuf::from);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" | "-c" => {
                path = Some(
                    args.next().ok_or_else(|| anyhow::anyhow!("--config needs a file"))?.into(),
                )
            }
            "--help" | "-h" => {
                println!(
                    "usage: sipalias-processor [--config FILE]\nAny key can be set with SIPALIAS_PROCESSOR__<KEY>."
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(path)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
