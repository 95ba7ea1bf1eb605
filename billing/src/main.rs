//! `sipalias-billing`: run the billing service or manage its accounts and CDRs.

/// mimalloc: far cheaper than glibc malloc for the many small, short-lived allocations of
/// SIP messages (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use sipalias_billing::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = cli::config(&cli).and_then(|config| {
        // One-shot commands need no more than one thread.
        let threads = if cli::is_serve(&cli) { config.worker_threads } else { 1 };
        let mut builder = match threads {
            1 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if n > 1 {
                    b.worker_threads(n);
                }
                b
            }
        };
        builder.enable_all().build()?.block_on(cli::run(cli, config))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `serve` logs through tracing, but a startup error must reach the operator even
            // when logging is filtered, so it is printed as well.
            eprintln!("sipalias-billing: {e}");
            ExitCode::FAILURE
        }
    }
}
