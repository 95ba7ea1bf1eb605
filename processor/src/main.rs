//! `sipalias-processor [--config FILE]`: runs one processor replica until SIGTERM or Ctrl-C,
//! then drains (no new work; calls in setup finish, up to `drain_timeout_secs`) and stops.
//! `sipalias-processor --check-config [--config FILE]` checks the configuration and exits.
//! `sipalias-processor did add --number N --aor A | delete --number N | list [--json]`: DIDs.
//! `sipalias-processor registrations [--aor A] [--alias IP] [--user-agent TEXT] [--removed]
//! [--json]` and
//! `sipalias-processor kick --aor A [--contact URI]`: the cluster's registrations, for operators;
//! `sipalias-processor calls [--json]` and `hangup --call REF`: its answered calls.
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
    /// An operator command instead of running a processor (reads Redis with this
    /// configuration).
    #[command(subcommand)]
    command: Option<Admin>,
}

/// What `did` does.
#[derive(Debug, clap::Subcommand)]
enum DidAction {
    /// Point a number (E.164, `+` and 6–15 digits) at an account (replacing what it pointed at).
    Add {
        /// The number, e.g. +442079460001.
        #[arg(long)]
        number: String,
        /// The account's AOR, user@domain.
        #[arg(long)]
        aor: String,
    },
    /// Remove a number.
    Delete {
        /// The number.
        #[arg(long)]
        number: String,
    },
    /// List every number and its account.
    List {
        /// JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Operator commands on the cluster's registrations.
#[derive(Debug, clap::Subcommand)]
enum Admin {
    /// List live registrations: AOR, the socket each came through, where from, expiry,
    /// User-Agent, Contact. Without a filter, every registration of the cluster.
    Registrations {
        /// Only this AOR (user@domain).
        #[arg(long)]
        aor: Option<String>,
        /// Only those made through this IP (an old provider's alias, or the main IP).
        #[arg(long, value_name = "IP")]
        alias: Option<std::net::IpAddr>,
        /// Only phones whose User-Agent contains this text (any case).
        #[arg(long, value_name = "TEXT")]
        user_agent: Option<String>,
        /// Only registrations through a socket no dispatcher serves any more (an alias or
        /// port removed by a SIGHUP): these phones get no call until they register again.
        #[arg(long)]
        removed: bool,
        /// JSON (an array of objects) instead of a table, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the answered calls (stored in Redis): reference, caller, callee, the IP the call
    /// came in on, age.
    Calls {
        /// JSON (an array of objects) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End an answered call: the processor holding it sends BYE to both phones and bills it
    /// up to now. Fails when no running processor holds it within 3 s.
    Hangup {
        /// The call's reference, as `calls` lists it.
        #[arg(long = "call", value_name = "REF")]
        call_ref: String,
    },
    /// The cluster's DIDs (public numbers of accounts): calls from a trusted trunk to one
    /// ring the account's phones.
    Did {
        #[command(subcommand)]
        action: DidAction,
    },
    /// Remove the registrations of an AOR (or one of them): the phone gets no call until it
    /// registers again.
    Kick {
        /// The AOR (user@domain).
        #[arg(long)]
        aor: String,
        /// Only the binding with this Contact URI.
        #[arg(long, value_name = "URI")]
        contact: Option<String>,
    },
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
    if let Some(command) = args.command {
        return admin(&config, command);
    }
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

/// Runs an operator command; exit 0, or 1 with the error on stderr.
fn admin(config: &ProcessorConfig, command: Admin) -> ExitCode {
    let runtime = match sipalias_startup::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sipalias-processor: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done = runtime.block_on(async {
        match command {
            Admin::Registrations { aor, alias, user_agent, removed, json } => {
                let filter = sipalias_processor::registrations::Filter {
                    aor,
                    ip: alias,
                    user_agent,
                    removed,
                };
                let text = sipalias_processor::admin::registrations(config, &filter, json).await?;
                print!("{text}");
            }
            Admin::Did { action } => {
                print!("{}", sipalias_processor::admin::did(config, action.into()).await?);
            }
            Admin::Calls { json } => {
                print!("{}", sipalias_processor::admin::calls(config, json).await?);
            }
            Admin::Hangup { call_ref } => {
                let wait = std::time::Duration::from_secs(3);
                let by = sipalias_processor::admin::hang_up(config, &call_ref, wait).await?;
                println!("call {call_ref} ended by {by}");
            }
            Admin::Kick { aor, contact } => {
                let n = sipalias_processor::admin::kick(config, &aor, contact.as_deref()).await?;
                println!("{n} registrations of {aor} removed");
            }
        }
        Ok::<(), sipalias_processor::Error>(())
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sipalias-processor: {e}");
            ExitCode::FAILURE
        }
    }
}

impl From<DidAction> for sipalias_processor::admin::DidOrder {
    fn from(action: DidAction) -> Self {
        use sipalias_processor::admin::DidOrder;
        match action {
            DidAction::Add { number, aor } => DidOrder::Add { number, aor },
            DidAction::Delete { number } => DidOrder::Delete { number },
            DidAction::List { json } => DidOrder::List { json },
        }
    }
}
