//! `sipalias-billing`: run the billing service or manage its accounts and CDRs.

/// mimalloc: far cheaper than glibc malloc for the many small, short-lived allocations of
/// SIP messages (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;
use sipalias_billing::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `serve` logs through tracing, but a startup error must reach the operator even
            // when logging is filtered, so it is printed as well.
            eprintln!("sipalias-billing: {e}");
            ExitCode::FAILURE
        }
    }
}
