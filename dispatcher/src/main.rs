//! `sipalias-dispatcher [--config FILE]`: runs the dispatcher until SIGTERM or Ctrl-C.
//! `sipalias-dispatcher --check-config [--config FILE]`: checks the configuration and exits.
//! `sipalias-dispatcher status [--config FILE] [--grpc URL]...`: prints the cluster view of a
//! running dispatcher (or of each one named) and exits.
//! `sipalias-dispatcher bans [list | lift SOURCE] [--config FILE] [--grpc URL]...`: lists the
//! sources it drops at the edge, or lifts a ban.
//!
//! The configuration file is `--config`, else `$SIPALIAS_CONFIG`, else `./sipalias.toml` if it
//! exists; `SIPALIAS_DISPATCHER__*` variables override it. Logs go to stderr, filtered by
//! `RUST_LOG` (default `info`). Exit status: 0 after a clean shutdown, 2 for a configuration
//! error, including an unusable certificate (nothing has been bound), 1 for any other failure;
//! `status`: 0 when every dispatcher answered, 1 otherwise, 2 for a configuration error.

/// mimalloc: far cheaper than glibc malloc for the many small, short-lived allocations of
/// SIP messages (measured in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sipalias_dispatcher::{DispatcherConfig, status};
use sipalias_proto::edge::edge_client::EdgeClient;
use sipalias_proto::edge::{BansRequest, LiftBanRequest, StatusRequest};
use tonic::transport::Endpoint;
use tracing::{error, info};

/// The file read when neither `--config` nor `SIPALIAS_CONFIG` names one.
const DEFAULT_CONFIG: &str = "sipalias.toml";
/// How long `status` waits for a dispatcher to connect and to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// The stateless SIP edge of a sipalias cluster.
#[derive(Debug, Parser)]
#[command(name = "sipalias-dispatcher", version)]
struct Args {
    /// TOML file whose [dispatcher] table configures this process.
    #[arg(long, value_name = "FILE", env = "SIPALIAS_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Check the configuration (values, certificates and keys) and exit: 0 if it is good, 2
    /// naming the key if not. Binds nothing.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a running dispatcher's view of the cluster: the processors linked to it, their
    /// load (transactions, dialogs), whether they are draining, and what it routed to each.
    Status {
        /// Edge gRPC address of a dispatcher (http://ip:port). Repeat it to see both
        /// dispatchers of a pair. Default: grpc_listen of the configuration.
        #[arg(long, value_name = "URL")]
        grpc: Vec<String>,
    },
    /// List the sources a running dispatcher drops at the edge (banned for too many failed
    /// authentications or for their request rate) and what its guard has done; or lift a ban.
    Bans {
        /// Edge gRPC address of a dispatcher (http://ip:port); repeat it for each dispatcher.
        /// Default: grpc_listen of the configuration.
        #[arg(long, value_name = "URL", global = true)]
        grpc: Vec<String>,
        #[command(subcommand)]
        action: Option<BansAction>,
    },
}

#[derive(Debug, Subcommand)]
enum BansAction {
    /// List the bans in force (the default).
    List,
    /// Lift the ban on SOURCE (an IPv4 address or an IPv6 /64) on each dispatcher; every
    /// processor linked to it forgets the ban and deletes it from Redis.
    Lift {
        /// The banned source, as listed.
        source: String,
    },
}

/// What a CLI call asks a dispatcher.
#[derive(Debug, Clone)]
enum Query {
    Status,
    Bans,
    Lift(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = args
        .config
        .or_else(|| Path::new(DEFAULT_CONFIG).exists().then(|| PathBuf::from(DEFAULT_CONFIG)));
    match args.command {
        Some(Command::Status { grpc }) => {
            return cli_command(path.as_deref(), &grpc, &Query::Status);
        }
        Some(Command::Bans { grpc, action }) => {
            let query = match action {
                None | Some(BansAction::List) => Query::Bans,
                Some(BansAction::Lift { source }) => Query::Lift(source),
            };
            return cli_command(path.as_deref(), &grpc, &query);
        }
        None => {}
    }

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
    if args.check_config {
        return match sipalias_dispatcher::check(&config) {
            Ok(()) => {
                println!("sipalias-dispatcher: configuration OK{}", shown(path.as_deref()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sipalias-dispatcher: configuration error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let level = sipalias_startup::init_logging(config.log_format, &config.log_level);
    match serve(config, level, path) {
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

/// ` (FILE)`, or nothing when no file was read.
fn shown(path: Option<&Path>) -> String {
    path.map(|p| format!(" ({})", p.display())).unwrap_or_default()
}

fn serve(
    config: DispatcherConfig,
    level: Option<sipalias_startup::LogLevel>,
    path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let runtime = sipalias_startup::runtime(config.worker_threads)
        .context("cannot start the tokio runtime")?;
    let stop = sipalias_startup::Stop::new();
    runtime.block_on(async {
        let reread = move || {
            let loaded = DispatcherConfig::load(path.as_deref());
            loaded.map(|c| c.log_level).map_err(|e| e.to_string())
        };
        sipalias_startup::watch_log_level(level, reread, stop.stopping());
        info!(id = %config.id, "sipalias-dispatcher starting");
        let served = match sipalias_dispatcher::run(config, sipalias_startup::signal()).await {
            // Kept as is (no context) so main can tell a configuration error by its type.
            Err(e @ sipalias_dispatcher::Error::Config(_)) => Err(anyhow::Error::new(e)),
            other => other.context("dispatcher failed"),
        };
        stop.trigger();
        served
    })
}

/// `status` and `bans`: asks each dispatcher (the `--grpc` URLs, else the configuration's
/// `grpc_listen`) and prints its answer.
fn cli_command(path: Option<&Path>, grpc: &[String], query: &Query) -> ExitCode {
    let name = match query {
        Query::Status => "status",
        Query::Bans | Query::Lift(_) => "bans",
    };
    // The configuration also gives the link secret; with --grpc URLs and no usable file,
    // none is presented (enough for a dispatcher without one, on loopback).
    let loaded = DispatcherConfig::load(path);
    let secret = loaded.as_ref().map(|c| c.link_secret.clone()).unwrap_or_default();
    let urls: Vec<String> = if grpc.is_empty() {
        match loaded {
            Ok(config) => vec![status::url_for_listen(config.grpc_listen)],
            Err(e) => {
                eprintln!("sipalias-dispatcher {name}: configuration error: {e}");
                eprintln!("sipalias-dispatcher {name}: or name a dispatcher with --grpc URL");
                return ExitCode::from(2);
            }
        }
    } else {
        grpc.iter().map(|g| status::normalize_url(g)).collect()
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sipalias-dispatcher {name}: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut code = ExitCode::SUCCESS;
    for (i, url) in urls.iter().enumerate() {
        if i > 0 {
            println!();
        }
        match runtime.block_on(ask(url, &secret, query)) {
            Ok(answer) => print!("{answer}"),
            Err(e) => {
                eprintln!("sipalias-dispatcher {name}: {url}: {e:#}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

/// Asks the dispatcher at `url` and renders its answer.
async fn ask(url: &str, secret: &str, query: &Query) -> anyhow::Result<String> {
    let present = sipalias_proto::link_auth::Present::new(secret)
        .map_err(|why| anyhow::anyhow!("dispatcher.link_secret: {why}"))?;
    let endpoint = Endpoint::from_shared(url.to_owned())
        .context("not a URL")?
        .connect_timeout(STATUS_TIMEOUT)
        .timeout(STATUS_TIMEOUT);
    let channel = endpoint.connect().await.context("cannot connect")?;
    let mut client = EdgeClient::with_interceptor(channel, present);
    let failed = |what: &str, s: tonic::Status| anyhow::anyhow!("{what} failed: {}", s.message());
    Ok(match query {
        Query::Status => {
            let answer = client.status(StatusRequest {}).await.map_err(|s| failed("status", s))?;
            status::render(url, &answer.into_inner())
        }
        Query::Bans => {
            let answer = client.bans(BansRequest {}).await.map_err(|s| failed("bans", s))?;
            status::render_bans(url, &answer.into_inner())
        }
        Query::Lift(source) => {
            let answer = client
                .lift_ban(LiftBanRequest { source: source.clone() })
                .await
                .map_err(|s| failed("lift", s))?;
            if answer.into_inner().lifted {
                format!("{url}: ban on {source} lifted\n")
            } else {
                format!("{url}: {source} was not banned here (processors were told anyway)\n")
            }
        }
    })
}
