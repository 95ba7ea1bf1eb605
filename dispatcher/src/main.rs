//! `sipalias-dispatcher [--config FILE]`: runs the dispatcher until SIGTERM or Ctrl-C.
//! `sipalias-dispatcher --check-config [--config FILE]`: checks the configuration and exits.
//! `sipalias-dispatcher status [--config FILE] [--grpc URL]...`: prints the cluster view of a
//! running dispatcher (or of each one named) and exits.
//! `sipalias-dispatcher sockets [--config FILE] [--grpc URL]...`: lists the SIP sockets it
//! serves on (main IP, aliases, their ports), draining ones included.
//! `sipalias-dispatcher bans [list | lift SOURCE] [--config FILE] [--grpc URL]...`: lists the
//! sources it drops at the edge, or lifts a ban.
//! `--json` (status, sockets, bans list) prints a JSON array, one object per dispatcher.
//! SIGHUP re-reads the file: the log level, and the main IP, aliases and their ports (new
//! sockets bound, removed ones drained, processors told), without a restart.
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
use tracing::{error, info, warn};

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
        /// Print JSON (an array, one object per dispatcher) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the SIP sockets a running dispatcher serves on: main IP and aliases, each port
    /// and transport, with their state (configured, or draining after a SIGHUP removed them)
    /// and open TCP/TLS connections.
    Sockets {
        /// Edge gRPC address of a dispatcher (http://ip:port); repeat it for each dispatcher.
        /// Default: grpc_listen of the configuration.
        #[arg(long, value_name = "URL")]
        grpc: Vec<String>,
        /// Print JSON (an array, one object per dispatcher) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the sources a running dispatcher drops at the edge (banned for too many failed
    /// authentications or for their request rate) and what its guard has done; or lift a ban.
    Bans {
        /// Edge gRPC address of a dispatcher (http://ip:port); repeat it for each dispatcher.
        /// Default: grpc_listen of the configuration.
        #[arg(long, value_name = "URL", global = true)]
        grpc: Vec<String>,
        /// Print JSON (an array, one object per dispatcher) instead of a table.
        #[arg(long, global = true)]
        json: bool,
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
    Sockets,
    Bans,
    Lift(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let path = args
        .config
        .or_else(|| Path::new(DEFAULT_CONFIG).exists().then(|| PathBuf::from(DEFAULT_CONFIG)));
    match args.command {
        Some(Command::Status { grpc, json }) => {
            return cli_command(path.as_deref(), &grpc, &Query::Status, json);
        }
        Some(Command::Sockets { grpc, json }) => {
            return cli_command(path.as_deref(), &grpc, &Query::Sockets, json);
        }
        Some(Command::Bans { grpc, json, action }) => {
            let query = match action {
                None | Some(BansAction::List) => Query::Bans,
                Some(BansAction::Lift { source }) => Query::Lift(source),
            };
            return cli_command(path.as_deref(), &grpc, &query, json);
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
        let log_path = path.clone();
        let reread = move || {
            let loaded = DispatcherConfig::load(log_path.as_deref());
            loaded.map(|c| c.log_level).map_err(|e| e.to_string())
        };
        sipalias_startup::watch_log_level(level, reread, stop.stopping());
        let (reload, reloads) = tokio::sync::mpsc::channel(4);
        tokio::spawn(reload_on_hangup(path, reload));
        info!(id = %config.id, "sipalias-dispatcher starting");
        let run = sipalias_dispatcher::run_reloading(config, reloads, sipalias_startup::signal());
        let served = match run.await {
            // Kept as is (no context) so main can tell a configuration error by its type.
            Err(e @ sipalias_dispatcher::Error::Config(_)) => Err(anyhow::Error::new(e)),
            other => other.context("dispatcher failed"),
        };
        stop.trigger();
        served
    })
}

/// On every SIGHUP, loads the configuration file again and hands it to the dispatcher, which
/// applies its sockets (main IP, aliases, ports); one that no longer loads changes nothing.
async fn reload_on_hangup(
    path: Option<PathBuf>,
    reload: tokio::sync::mpsc::Sender<DispatcherConfig>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP: the sockets change only with a restart");
        return;
    };
    while hup.recv().await.is_some() {
        match DispatcherConfig::load(path.as_deref()) {
            Ok(config) => {
                if reload.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => warn!("SIGHUP: sockets unchanged: configuration error: {e}"),
        }
    }
}

/// `status`, `sockets` and `bans`: asks each dispatcher (the `--grpc` URLs, else the
/// configuration's `grpc_listen`) and prints its answer, as text or, with `json`, as one JSON
/// array of the answers.
fn cli_command(path: Option<&Path>, grpc: &[String], query: &Query, json: bool) -> ExitCode {
    let name = match query {
        Query::Status => "status",
        Query::Sockets => "sockets",
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
    let mut answers = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        match runtime.block_on(ask(url, &secret, query)) {
            Ok(answer) if json => answers.push(answer.json),
            Ok(answer) => {
                if i > 0 {
                    println!();
                }
                print!("{}", answer.text);
            }
            Err(e) => {
                eprintln!("sipalias-dispatcher {name}: {url}: {e:#}");
                code = ExitCode::FAILURE;
            }
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(answers));
    }
    code
}

/// One dispatcher's answer, rendered both ways.
struct Answer {
    text: String,
    json: serde_json::Value,
}

/// Asks the dispatcher at `url` and renders its answer.
async fn ask(url: &str, secret: &str, query: &Query) -> anyhow::Result<Answer> {
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
        Query::Status | Query::Sockets => {
            let answer = client.status(StatusRequest {}).await.map_err(|s| failed("status", s))?;
            let answer = answer.into_inner();
            let text = if matches!(query, Query::Status) {
                status::render(url, &answer)
            } else {
                status::render_sockets(url, &answer)
            };
            Answer { text, json: status::status_json(url, &answer) }
        }
        Query::Bans => {
            let answer = client.bans(BansRequest {}).await.map_err(|s| failed("bans", s))?;
            let answer = answer.into_inner();
            Answer {
                text: status::render_bans(url, &answer),
                json: status::bans_json(url, &answer),
            }
        }
        Query::Lift(source) => {
            let answer = client
                .lift_ban(LiftBanRequest { source: source.clone() })
                .await
                .map_err(|s| failed("lift", s))?;
            let lifted = answer.into_inner().lifted;
            let text = if lifted {
                format!("{url}: ban on {source} lifted\n")
            } else {
                format!("{url}: {source} was not banned here (processors were told anyway)\n")
            };
            let json = serde_json::json!({"dispatcher": url, "source": source, "lifted": lifted});
            Answer { text, json }
        }
    })
}
