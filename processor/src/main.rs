//! `sipalias-processor [--config FILE]`: runs one processor replica until SIGTERM or Ctrl-C,
//! then drains (no new work; calls in setup finish, up to `drain_timeout_secs`) and stops.
//! `sipalias-processor --check-config [--config FILE]` checks the configuration and exits.
//!
//! The configuration file is `--config`, else `$SIPALIAS_CONFIG`; `SIPALIAS_PROCESSOR__*`
//! variables override it. Logs go to stderr, filtered by `RUST_LOG` (default `info`). Exit
//! status: 0 after a clean shutdown, 2 for a configuration error, 1 for any other failure.

/// mimalloc: far cheaper than glibc malloc for the many small, short-lived allocations of
/// SIP messages (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sipalias_processor::ProcessorConfig;

/// One processor replica of a sipalias cluster: registrar, B2BUA, authentication.
#[derive(Debug, Parser)]
#[command(
    name = "sipalias-processor",
    version,
    after_help = "Any key can be set with SIPALIAS_PROCESSOR__<KEY>, e.g. SIPALIAS_PROCESSOR__ID=p2."
)]
struct Args {
    /// TOML file whose [processor] table configures this process.
    #[arg(long, short = 'c', value_name = "FILE", env = "SIPALIAS_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration and exit: 0 if it is good, 2 naming the key if not. Connects
    /// to nothing and binds nothing.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ProcessorConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sipalias-processor: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        let file = args.config.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default();
        println!("sipalias-processor: configuration OK{file}");
        return ExitCode::SUCCESS;
    }
    let level = sipalias_startup::init_logging(config.log_format, &config.log_level);
    let runtime = match sipalias_startup::runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sipalias-processor: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = sipalias_startup::Stop::new();
    let path = args.config.clone();
    let served = runtime.block_on(async {
        let reread = move || {
            let loaded = ProcessorConfig::load(path.as_deref());
            loaded.map(|c| c.log_level).map_err(|e| e.to_string())
        };
        sipalias_startup::watch_log_level(level, reread, stop.stopping());
        let served = sipalias_processor::run(config, sipalias_startup::signal()).await;
        stop.trigger();
        served
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("processor failed: {e}");
            ExitCode::FAILURE
        }
    }
}
