//! The `sipalias-billing` command line: run the service, manage accounts, read CDRs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tracing::{info, warn};

use crate::account::{Account, Aor, Status};
use crate::config::BillingConfig;
use crate::error::Error;
use crate::service;
use crate::store::{Cdr, Store};

/// sipalias billing: accounts with digest credentials, call authorization and accounting.
#[derive(Debug, Parser)]
#[command(name = "sipalias-billing", version)]
pub struct Cli {
    /// Cluster TOML file; its [billing] table is read. `SIPALIAS_BILLING__<KEY>` environment
    /// variables override it.
    #[arg(long, short = 'c', env = "SIPALIAS_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC billing service on `billing.listen` until SIGTERM or ctrl-c.
    Serve,
    /// Manage accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Read call detail records.
    #[command(subcommand)]
    Cdr(CdrCommand),
}

/// `account ...` commands.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Create an account from a password; only MD5 and SHA-256 HA1s are stored.
    Add(AddArgs),
    /// Add HA1s exported from another system for one realm (creates the account if needed).
    Import(ImportArgs),
    /// List accounts: AOR, status, realms.
    List,
    /// Block an account: its REGISTERs and calls are refused with 403.
    Block(AorArg),
    /// Unblock an account.
    Unblock(AorArg),
}

/// Arguments of `account add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
    /// Password to derive the HA1s from (it is not stored).
    #[arg(long)]
    pub password: String,
    /// Digest realm to create credentials for; repeatable. Default: the AOR's domain.
    #[arg(long = "realm", value_name = "REALM")]
    pub realms: Vec<String>,
    /// Replace the credentials of an existing account (its status is kept).
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `account import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
    /// Digest realm the HA1s were computed for.
    #[arg(long)]
    pub realm: String,
    /// MD5(user:realm:password), 32 hex digits.
    #[arg(long, value_name = "HEX", required_unless_present = "ha1_sha256")]
    pub ha1_md5: Option<String>,
    /// SHA-256(user:realm:password), 64 hex digits.
    #[arg(long, value_name = "HEX")]
    pub ha1_sha256: Option<String>,
}

/// An `--aor` argument.
#[derive(Debug, Args)]
pub struct AorArg {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
}

/// `cdr ...` commands.
#[derive(Debug, Subcommand)]
pub enum CdrCommand {
    /// List the most recent CDRs, newest first.
    List {
        /// How many; 0 for all.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print CSV (with a header line) instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

/// Runs a parsed command line. Output goes to stdout; the caller prints the error, if any,
/// and exits non-zero.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let config = BillingConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Account(cmd) => account(&config, cmd).await,
        Command::Cdr(CdrCommand::List { limit, csv }) => {
            let store = Store::connect(&config).await?;
            let cdrs = store.list_cdrs(limit).await?;
            if csv {
                print!("{}", cdrs_csv(&cdrs));
            } else {
                print!("{}", cdrs_table(&cdrs));
            }
            Ok(())
        }
    }
}

async fn serve(config: BillingConfig) -> Result<(), Error> {
    init_tracing();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind { addr: config.listen, source })?;
    // Registered before connecting to Redis so a SIGTERM during startup is not lost.
    let shutdown = shutdown_signal()?;
    service::serve(config, listener, shutdown).await
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Only `serve` logs; the other
/// commands print their results.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `try_init`: an embedding program may already have installed a subscriber.
    // Colours only on a terminal: logs captured to a file or journal stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// Completes on SIGTERM or ctrl-c (SIGINT).
fn shutdown_signal() -> Result<impl Future<Output = ()>, Error> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        let ctrl_c = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                // Without a SIGINT handler, wait for SIGTERM only rather than stop at once.
                warn!(error = %e, "cannot listen for ctrl-c");
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, shutting down"),
            () = ctrl_c => info!("interrupt received, shutting down"),
        }
    })
}

async fn account(config: &BillingConfig, cmd: AccountCommand) -> Result<(), Error> {
    // Parse the AOR before connecting, so a typo is reported without needing Redis.
    match cmd {
        AccountCommand::Add(args) => {
            let aor = Aor::parse(&args.aor)?;
            let store = Store::connect(config).await?;
            let account = store.add_account(&aor, &args.password, &args.realms, args.force).await?;
            println!("account {} saved (realms: {})", account.aor, realm_summary(&account));
        }
        AccountCommand::Import(args) => {
            let aor = Aor::parse(&args.aor)?;
            let store = Store::connect(config).await?;
            let account = store
                .import_account(
                    &aor,
                    &args.realm,
                    args.ha1_md5.as_deref(),
                    args.ha1_sha256.as_deref(),
                )
                .await?;
            println!("account {} saved (realms: {})", account.aor, realm_summary(&account));
        }
        AccountCommand::List => {
            let store = Store::connect(config).await?;
            print!("{}", accounts_table(&store.list().await?));
        }
        AccountCommand::Block(AorArg { aor }) => {
            let aor = Aor::parse(&aor)?;
            Store::connect(config).await?.set_status(&aor, Status::Blocked).await?;
            println!("account {aor} blocked");
        }
        AccountCommand::Unblock(AorArg { aor }) => {
            let aor = Aor::parse(&aor)?;
            Store::connect(config).await?.set_status(&aor, Status::Active).await?;
            println!("account {aor} active");
        }
    }
    Ok(())
}

/// `realm1, realm2 (md5 only)`: realms, marking those lacking one algorithm since clients using
/// that algorithm will be refused there.
fn realm_summary(account: &Account) -> String {
    let parts: Vec<String> = account
        .realms
        .iter()
        .map(|(realm, c)| match (&c.ha1_md5, &c.ha1_sha256) {
            (Some(_), None) => format!("{realm} (md5 only)"),
            (None, Some(_)) => format!("{realm} (sha256 only)"),
            _ => realm.clone(),
        })
        .collect();
    if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
}

fn accounts_table(accounts: &[Account]) -> String {
    let rows: Vec<Vec<String>> = accounts
        .iter()
        .map(|a| vec![a.aor.to_string(), a.status.to_string(), realm_summary(a)])
        .collect();
    table(&["AOR", "STATUS", "REALMS"], &rows)
}

const CDR_COLUMNS: [&str; 9] = [
    "call_ref",
    "caller",
    "callee",
    "caller_ingress_ip",
    "callee_ingress_ip",
    "answered_ms",
    "ended_ms",
    "duration_ms",
    "cause",
];

fn cdr_row(c: &Cdr) -> Vec<String> {
    let num = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
    vec![
        c.call_ref.clone(),
        c.caller.clone(),
        c.callee.clone(),
        c.caller_ingress_ip.clone(),
        c.callee_ingress_ip.clone(),
        num(c.answered_ms),
        num(c.ended_ms),
        num(c.duration_ms),
        c.cause.clone(),
    ]
}

fn cdrs_table(cdrs: &[Cdr]) -> String {
    let header = CDR_COLUMNS.map(str::to_ascii_uppercase);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let rows: Vec<Vec<String>> = cdrs
        .iter()
        .map(|c| {
            cdr_row(c).into_iter().map(|f| if f.is_empty() { "-".to_owned() } else { f }).collect()
        })
        .collect();
    table(&header, &rows)
}

/// RFC 4180 CSV: header line, then one line per CDR; unknown values are empty.
fn cdrs_csv(cdrs: &[Cdr]) -> String {
    let mut out = CDR_COLUMNS.join(",");
    out.push('\n');
    for c in cdrs {
        let fields: Vec<String> = cdr_row(c).iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_owned()
    }
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            l.extend(std::iter::repeat_n(' ', w.saturating_sub(cell.chars().count())));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_account_add_with_repeated_realms() {
        let cli = Cli::try_parse_from([
            "sipalias-billing",
            "--config",
            "/etc/sipalias.toml",
            "account",
            "add",
            "--aor",
            "alice@example.com",
            "--password",
            "pw",
            "--realm",
            "a",
            "--realm",
            "b",
            "--force",
        ])
        .expect("parse");
        assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("/etc/sipalias.toml")));
        match cli.command {
            Command::Account(AccountCommand::Add(a)) => {
                assert_eq!(a.realms, ["a", "b"]);
                assert!(a.force);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn import_needs_a_hash() {
        let r = Cli::try_parse_from([
            "sipalias-billing",
            "account",
            "import",
            "--aor",
            "a@b",
            "--realm",
            "b",
        ]);
        assert!(r.is_err());
    }

    #[test]
    fn csv_quotes_only_when_needed() {
        let cdr = Cdr {
            call_ref: "c1".to_owned(),
            caller: "a@x".to_owned(),
            cause: "said \"bye\", then left".to_owned(),
            answered_ms: Some(1000),
            ended_ms: Some(2500),
            duration_ms: Some(1500),
            ..Cdr::default()
        };
        assert_eq!(
            cdrs_csv(&[cdr]),
            "call_ref,caller,callee,caller_ingress_ip,callee_ingress_ip,answered_ms,ended_ms,duration_ms,cause\n\
             c1,a@x,,,,1000,2500,1500,\"said \"\"bye\"\", then left\"\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["long".to_owned(), "x".to_owned()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }
}
