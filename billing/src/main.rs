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
    if cli.command.is_some() == cli.check_config {
        use clap::CommandFactory;
        let why = if cli.check_config {
            "--check-config takes no command"
        } else {
            "a command is required (or --check-config)"
        };
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, why).exit();
    }
    let outcome = cli::config(&cli).and_then(|config| {
        // One-shot commands need no more than one thread.
        let threads = if cli::is_serve(&cli) { config.worker_threads } else { 1 };
        sipalias_startup::runtime(threads)?.block_on(cli::run(cli, config))
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // `serve` logs through tracing, but a startup error must reach the operator even
        // when logging is filtered, so it is printed as well. A bad configuration exits 2,
        // as the dispatcher's and the processor's do.
        Err(e @ sipalias_billing::Error::Config(_)) => {
            eprintln!("sipalias-billing: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("sipalias-billing: {e}");
            ExitCode::FAILURE
        }
    }
}
