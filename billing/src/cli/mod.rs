//! The `sipalias-billing` command line: run the service, manage accounts and rate plans, read
//! CDRs.

mod health;
mod report;
mod time;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::account::{AccountSettings, Aor, Kind, Status};
use crate::config::BillingConfig;
use crate::error::Error;
use crate::money;
use crate::rating::{self, Rate};
use crate::service;
use crate::store::{CdrQuery, Store};

/// sipalias billing: accounts, rate plans, call authorization and accounting.
#[derive(Debug, Parser)]
#[command(name = "sipalias-billing", version)]
pub struct Cli {
    /// Cluster TOML file; its [billing] table is read. `SIPALIAS_BILLING__<KEY>` environment
    /// variables override it.
    #[arg(long, short = 'c', env = "SIPALIAS_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the configuration and exit: 0 if it is good, 2 naming the key if not. Connects
    /// to nothing and binds nothing.
    #[arg(long)]
    pub check_config: bool,

    /// What to do (required unless --check-config).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC billing service on `billing.listen` until SIGTERM or ctrl-c.
    Serve,
    /// Manage accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage rate plans.
    #[command(subcommand)]
    RatePlan(RatePlanCommand),
    /// Read call detail records.
    #[command(subcommand)]
    Cdr(CdrCommand),
    /// Ask a running billing service whether it serves (gRPC health protocol); exit 0 if so.
    /// The container image's HEALTHCHECK.
    Health {
        /// The service's URL; default: `billing.listen` (a wildcard address over loopback).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
}

/// `account ...` commands.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Create an account from a password; only MD5 and SHA-256 HA1s are stored.
    Add(AddArgs),
    /// Add HA1s exported from another system for one realm (creates the account if needed).
    Import(ImportArgs),
    /// List accounts: AOR, status, kind, balance, credit limit, rate plan, call limit, realms.
    List,
    /// Show one account: balance, what its calls in progress hold, and its settings.
    Show(AorArg),
    /// Change an account's billing settings.
    Set(SetArgs),
    /// Add to an account's balance (a negative amount corrects it downwards).
    Topup(TopupArgs),
    /// Block an account: its REGISTERs and calls are refused with 403.
    Block(AorArg),
    /// Unblock an account.
    Unblock(AorArg),
    /// Delete an account: its credentials, settings and balance (its CDRs are kept). Refused
    /// while calls are in progress, unless --force.
    Delete(DeleteArgs),
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
    /// Replace the credentials of an existing account (its status and balance are kept; the
    /// billing options given are applied).
    #[arg(long)]
    pub force: bool,
    /// Prepaid: calls only while the balance covers them.
    #[arg(long, conflicts_with_all = ["postpaid", "credit_limit"])]
    pub prepaid: bool,
    /// Postpaid (the default): the balance may go down to minus the credit limit.
    #[arg(long)]
    pub postpaid: bool,
    /// Opening balance, e.g. 10.00 (default 0). Only for a new account.
    #[arg(long, value_name = "AMOUNT", value_parser = amount, allow_negative_numbers = true)]
    pub balance: Option<i64>,
    /// Postpaid credit limit, e.g. 50.00, or `unlimited` (the default).
    #[arg(long, value_name = "AMOUNT", value_parser = credit_limit)]
    pub credit_limit: Option<CreditLimit>,
    /// Rate plan (must exist). Default: `billing.default_rate_plan`.
    #[arg(long, value_name = "NAME")]
    pub rate_plan: Option<String>,
    /// Most calls in progress at once; 0 = no limit (the default).
    #[arg(long, value_name = "N")]
    pub max_calls: Option<u32>,
}

/// Arguments of `account set`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true)
    .args(["kind", "rate_plan", "default_rate_plan", "credit_limit", "max_calls"])))]
pub struct SetArgs {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
    /// `prepaid` or `postpaid`.
    #[arg(long, value_parser = kind)]
    pub kind: Option<Kind>,
    /// Rate plan (must exist).
    #[arg(long, value_name = "NAME", conflicts_with = "default_rate_plan")]
    pub rate_plan: Option<String>,
    /// Forget the account's rate plan: use `billing.default_rate_plan`.
    #[arg(long)]
    pub default_rate_plan: bool,
    /// Postpaid credit limit, e.g. 50.00, or `unlimited`.
    #[arg(long, value_name = "AMOUNT", value_parser = credit_limit)]
    pub credit_limit: Option<CreditLimit>,
    /// Most calls in progress at once; 0 = no limit.
    #[arg(long, value_name = "N")]
    pub max_calls: Option<u32>,
}

/// Arguments of `account topup`.
#[derive(Debug, Args)]
pub struct TopupArgs {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
    /// Amount to add, e.g. 5.00 (negative to correct).
    #[arg(long, value_name = "AMOUNT", value_parser = amount, allow_negative_numbers = true)]
    pub amount: i64,
}

/// Arguments of `account import`: one account's HA1s, or a whole subscriber CSV.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A subscriber list (see docs/billing.md#bulk-import): columns aor, realm, password,
    /// ha1_md5, ha1_sha256, kind, balance, rate_plan, max_calls, credit_limit. Bad lines are
    /// reported by number and skipped; the others are imported.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["aor", "realm", "ha1_md5", "ha1_sha256"])]
    pub csv: Option<PathBuf>,
    /// With --csv: check every line and report, writing nothing.
    #[arg(long, requires = "csv")]
    pub dry_run: bool,
    /// Address of record, user@domain.
    #[arg(long, required_unless_present = "csv")]
    pub aor: Option<String>,
    /// Digest realm the HA1s were computed for.
    #[arg(long, required_unless_present = "csv")]
    pub realm: Option<String>,
    /// MD5(user:realm:password), 32 hex digits.
    #[arg(long, value_name = "HEX", required_unless_present_any = ["ha1_sha256", "csv"])]
    pub ha1_md5: Option<String>,
    /// SHA-256(user:realm:password), 64 hex digits.
    #[arg(long, value_name = "HEX")]
    pub ha1_sha256: Option<String>,
}

/// Arguments of `account delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
    /// Delete even with calls in progress (their reservations are dropped; their stops still
    /// write CDRs but charge nobody).
    #[arg(long)]
    pub force: bool,
}

/// An `--aor` argument.
#[derive(Debug, Args)]
pub struct AorArg {
    /// Address of record, user@domain.
    #[arg(long)]
    pub aor: String,
}

/// A credit limit as typed: an amount, or `unlimited` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditLimit(pub Option<i64>);

/// `rate-plan ...` commands.
#[derive(Debug, Subcommand)]
pub enum RatePlanCommand {
    /// Create or replace the rate of one destination prefix in a plan (creating the plan).
    Set(RateSetArgs),
    /// List plans and their entries.
    List {
        /// Only this plan.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Delete one entry of a plan, or the whole plan.
    Delete {
        /// The plan.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Only this prefix (digits or `default`).
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// Arguments of `rate-plan set`.
#[derive(Debug, Args)]
pub struct RateSetArgs {
    /// Plan name (A-Z a-z 0-9 _ . -).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Destination prefix: digits of the called number (a leading + is ignored), or `default`
    /// (or empty) for every destination no longer prefix matches.
    #[arg(long)]
    pub prefix: String,
    /// Price of a minute, e.g. 0.10; applied per second of the billed time.
    #[arg(long, value_name = "AMOUNT", value_parser = amount)]
    pub per_minute: i64,
    /// Charged once per answered call.
    #[arg(long, value_name = "AMOUNT", value_parser = amount, default_value = "0")]
    pub fee: i64,
    /// Billing increments FIRST/NEXT in seconds: 60/60 per minute, 1/1 per second, 30/6, ...
    #[arg(long, value_name = "FIRST/NEXT", default_value = "60/60")]
    pub increments: String,
}

/// `cdr ...` commands.
#[derive(Debug, Subcommand)]
pub enum CdrCommand {
    /// List CDRs, newest first (by answer time).
    List {
        /// How many; 0 for all.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print CSV (with a header line) instead of a table.
        #[arg(long)]
        csv: bool,
        /// Only calls this AOR made or received.
        #[arg(long)]
        aor: Option<String>,
        /// Only calls answered at or after this time: ms since the epoch, or a UTC date
        /// YYYY-MM-DD, optionally with a time: YYYY-MM-DDTHH:MM or YYYY-MM-DDTHH:MM:SS.
        #[arg(long, value_name = "TIME", value_parser = time::parse)]
        since: Option<u64>,
        /// Only calls answered before this time (same forms as --since).
        #[arg(long, value_name = "TIME", value_parser = time::parse)]
        until: Option<u64>,
    },
    /// Export CDRs as CSV (the `list --csv` columns), all of them or a time range, to a file or
    /// stdout; with --delete, remove exactly the exported ones from Redis once they are
    /// written (CDRs in Redis otherwise grow without bound).
    Export {
        /// Only calls answered at or after this time (as for `list`).
        #[arg(long, value_name = "TIME", value_parser = time::parse)]
        since: Option<u64>,
        /// Only calls answered before this time.
        #[arg(long, value_name = "TIME", value_parser = time::parse)]
        until: Option<u64>,
        /// Write here (created or replaced) instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Delete the exported CDRs from Redis after the CSV is written (and synced to disk).
        #[arg(long)]
        delete: bool,
    },
}

fn amount(text: &str) -> Result<i64, String> {
    money::parse("amount", text).map_err(reason)
}

fn credit_limit(text: &str) -> Result<CreditLimit, String> {
    if matches!(text, "unlimited" | "none") {
        return Ok(CreditLimit(None));
    }
    let limit = money::parse("credit limit", text).map_err(reason)?;
    if limit < 0 {
        return Err("a credit limit is not negative (0 = no credit)".to_owned());
    }
    Ok(CreditLimit(Some(limit)))
}

fn kind(text: &str) -> Result<Kind, String> {
    Kind::parse(text).ok_or_else(|| "expected prepaid or postpaid".to_owned())
}

/// The reason of an input error, without the argument name clap prints anyway.
fn reason(e: Error) -> String {
    match e {
        Error::InvalidInput { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// Loads the configuration a command line names (`--config`, environment).
pub fn config(cli: &Cli) -> Result<BillingConfig, Error> {
    BillingConfig::load(cli.config.as_deref())
}

/// Whether the command line runs the service (the other commands are one-shot).
pub fn is_serve(cli: &Cli) -> bool {
    matches!(cli.command, Some(Command::Serve))
}

/// Runs a parsed command line with its configuration. Output goes to stdout; the caller
/// prints the error, if any, and exits non-zero.
pub async fn run(cli: Cli, config: BillingConfig) -> Result<(), Error> {
    let Some(command) = cli.command else {
        // --check-config: the configuration was loaded and validated to get here.
        let file = cli.config.map(|p| format!(" ({})", p.display())).unwrap_or_default();
        println!("sipalias-billing: configuration OK{file}");
        return Ok(());
    };
    match command {
        Command::Serve => serve(config, cli.config).await,
        Command::Account(cmd) => account(&config, cmd).await,
        Command::RatePlan(cmd) => rate_plan(&config, cmd).await,
        Command::Health { url } => {
            let url = url.unwrap_or_else(|| sipalias_proto::url_for_listen(config.listen));
            health::check(&url).await?;
            println!("billing at {url}: serving");
            Ok(())
        }
        Command::Cdr(CdrCommand::List { limit, csv, aor, since, until }) => {
            let aor = aor.map(|a| Aor::parse(&a)).transpose()?.map(|a| a.to_string());
            let store = Store::connect(&config).await?;
            let query = CdrQuery { limit, aor, since_ms: since, until_ms: until };
            let cdrs = store.list_cdrs(&query).await?;
            if csv {
                print!("{}", report::cdrs_csv(&cdrs));
            } else {
                print!("{}", report::cdrs_table(&cdrs));
            }
            Ok(())
        }
        Command::Cdr(CdrCommand::Export { since, until, output, delete }) => {
            let query = CdrQuery { limit: 0, aor: None, since_ms: since, until_ms: until };
            export_cdrs(&config, query, output.as_deref(), delete).await
        }
    }
}

/// `cdr export`: the CSV is written in full (a file also synced) before anything is
/// deleted, and only the CDRs written are deleted; a failed write deletes nothing.
async fn export_cdrs(
    config: &BillingConfig,
    query: CdrQuery,
    output: Option<&Path>,
    delete: bool,
) -> Result<(), Error> {
    use std::io::Write as _;
    let store = Store::connect(config).await?;
    let cdrs = store.list_cdrs(&query).await?;
    let csv = report::cdrs_csv(&cdrs);
    let written = match output {
        Some(path) => std::fs::File::create(path).and_then(|mut f| {
            f.write_all(csv.as_bytes())?;
            f.sync_all()
        }),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(csv.as_bytes()).and_then(|()| out.flush())
        }
    };
    written.map_err(|e| Error::InvalidInput {
        what: "--output",
        reason: format!("CDRs not written ({e}); nothing deleted"),
    })?;
    let deleted = if delete {
        let refs: Vec<String> = cdrs.iter().map(|c| c.call_ref.clone()).collect();
        store.delete_cdrs(&refs).await?
    } else {
        0
    };
    eprintln!("{} CDRs exported, {deleted} deleted", cdrs.len());
    Ok(())
}

async fn serve(config: BillingConfig, path: Option<PathBuf>) -> Result<(), Error> {
    let stop = sipalias_startup::Stop::new();
    let level = sipalias_startup::init_logging(config.log_format, &config.log_level);
    let reread = move || {
        let loaded = BillingConfig::load(path.as_deref());
        loaded.map(|c| c.log_level).map_err(|e| e.to_string())
    };
    sipalias_startup::watch_log_level(level, reread, stop.stopping());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind { addr: config.listen, source })?;
    // Listening for signals from before connecting to Redis, so a SIGTERM during start-up is
    // not lost: the task registers the handlers at the first await below.
    let signal = tokio::spawn(sipalias_startup::signal());
    let served = service::serve(config, listener, async move {
        let _ = signal.await;
    })
    .await;
    stop.trigger();
    served
}

/// `account import --csv FILE [--dry-run]`: reads and checks the whole file, then (unless a
/// dry run) imports its good rows; every bad line is printed to stderr as `line N: why`.
/// Fails (after importing the rest) when any line was bad, so a script notices.
async fn import_csv(config: &BillingConfig, file: &Path, dry_run: bool) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let input = std::fs::File::open(file).map_err(|e| Error::InvalidInput {
        what: "--csv",
        reason: format!("{}: {e}", file.display()),
    })?;
    let mut parsed = crate::import::parse(std::io::BufReader::new(input))?;
    let store = Store::connect(config).await?;
    // Rows naming a rate plan that does not exist are bad lines too.
    for plan in crate::import::plans(&parsed.rows) {
        if !store.rate_plan_exists(&plan).await? {
            let (missing, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut parsed.rows)
                .into_iter()
                .partition(|r| r.rate_plan.as_deref() == Some(plan.as_str()));
            parsed.rows = kept;
            parsed
                .bad
                .extend(missing.iter().map(|r| (r.line, format!("rate_plan: no plan {plan:?}"))));
        }
    }
    parsed.bad.sort_by_key(|(line, _)| *line);
    for (line, why) in &parsed.bad {
        eprintln!("line {line}: {why}");
    }
    let bad = parsed.bad.len();
    if dry_run {
        println!(
            "{}: {} accounts to import, {bad} bad lines (dry run: nothing written)",
            file.display(),
            parsed.rows.len()
        );
    } else {
        let (created, updated) = store.import_rows(&parsed.rows).await?;
        println!(
            "{}: {created} accounts created, {updated} updated, {bad} bad lines, in {:.1} s",
            file.display(),
            started.elapsed().as_secs_f64()
        );
    }
    if bad > 0 {
        return Err(Error::InvalidInput {
            what: "--csv",
            reason: format!("{bad} bad lines (listed above)"),
        });
    }
    Ok(())
}

async fn account(config: &BillingConfig, cmd: AccountCommand) -> Result<(), Error> {
    // Parse the AOR before connecting, so a typo is reported without needing Redis.
    match cmd {
        AccountCommand::Add(args) => {
            let aor = Aor::parse(&args.aor)?;
            let kind = match (args.prepaid, args.postpaid) {
                (true, _) => Some(Kind::Prepaid),
                (_, true) => Some(Kind::Postpaid),
                _ => None,
            };
            let settings = AccountSettings {
                kind,
                credit_limit_micros: args.credit_limit.map(|c| c.0),
                rate_plan: args.rate_plan.map(Some),
                max_concurrent_calls: args.max_calls,
            };
            let store = Store::connect(config).await?;
            let account = store
                .add_account(
                    &aor,
                    &args.password,
                    &args.realms,
                    args.force,
                    &settings,
                    args.balance,
                )
                .await?;
            println!(
                "account {} saved (realms: {}; {})",
                account.aor,
                report::realm_summary(&account),
                report::billing_summary(&account)
            );
        }
        AccountCommand::Import(ImportArgs { csv: Some(file), dry_run, .. }) => {
            import_csv(config, &file, dry_run).await?;
        }
        AccountCommand::Import(args) => {
            // clap requires both without --csv.
            let (Some(aor), Some(realm)) = (args.aor, args.realm) else {
                return Err(Error::InvalidInput {
                    what: "--aor",
                    reason: "--aor and --realm are required without --csv".into(),
                });
            };
            let aor = Aor::parse(&aor)?;
            let store = Store::connect(config).await?;
            let account = store
                .import_account(&aor, &realm, args.ha1_md5.as_deref(), args.ha1_sha256.as_deref())
                .await?;
            println!("account {} saved (realms: {})", account.aor, report::realm_summary(&account));
        }
        AccountCommand::List => {
            let store = Store::connect(config).await?;
            print!("{}", report::accounts_table(&store.list().await?));
        }
        AccountCommand::Show(AorArg { aor }) => {
            let aor = Aor::parse(&aor)?;
            let store = Store::connect(config).await?;
            let usage = store
                .account_usage(&aor)
                .await?
                .ok_or_else(|| Error::AccountNotFound(aor.to_string()))?;
            print!("{}", report::account_details(&usage));
        }
        AccountCommand::Set(args) => {
            let aor = Aor::parse(&args.aor)?;
            let rate_plan = match (args.rate_plan, args.default_rate_plan) {
                (Some(p), _) => Some(Some(p)),
                (None, true) => Some(None),
                (None, false) => None,
            };
            let settings = AccountSettings {
                kind: args.kind,
                credit_limit_micros: args.credit_limit.map(|c| c.0),
                rate_plan,
                max_concurrent_calls: args.max_calls,
            };
            let store = Store::connect(config).await?;
            let account = store.update_account(&aor, &settings).await?;
            println!("account {}: {}", account.aor, report::billing_summary(&account));
        }
        AccountCommand::Topup(args) => {
            let aor = Aor::parse(&args.aor)?;
            let balance = Store::connect(config).await?.topup(&aor, args.amount).await?;
            println!("account {aor} balance {}", money::format(balance));
        }
        AccountCommand::Delete(DeleteArgs { aor, force }) => {
            let aor = Aor::parse(&aor)?;
            Store::connect(config).await?.delete_account(&aor, force).await?;
            println!("account {aor} deleted");
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

async fn rate_plan(config: &BillingConfig, cmd: RatePlanCommand) -> Result<(), Error> {
    match cmd {
        RatePlanCommand::Set(args) => {
            let (first, next) = rating::parse_increments(&args.increments)?;
            let rate = Rate {
                rate_micros_per_minute: args.per_minute,
                connection_fee_micros: args.fee,
                first_increment_secs: first,
                next_increment_secs: next,
            };
            // Validated before connecting, so a typo is reported without needing Redis.
            rating::validate_plan_name("--name", &args.name)?;
            rating::normalize_prefix(&args.prefix)?;
            rate.validate()?;
            let store = Store::connect(config).await?;
            let prefix = store.set_rate(&args.name, &args.prefix, &rate).await?;
            println!(
                "rate plan {}: {prefix} at {} per minute, fee {}, increments {}",
                args.name,
                money::format(rate.rate_micros_per_minute),
                money::format(rate.connection_fee_micros),
                rate.increments()
            );
        }
        RatePlanCommand::List { name } => {
            if let Some(n) = &name {
                rating::validate_plan_name("--name", n)?;
            }
            let store = Store::connect(config).await?;
            print!(
                "{}",
                report::rate_plans_table(&store.rate_plan_entries(name.as_deref()).await?)
            );
        }
        RatePlanCommand::Delete { name, prefix } => {
            let store = Store::connect(config).await?;
            let removed = store.delete_rate_plan(&name, prefix.as_deref()).await?;
            let what = match prefix {
                Some(p) => format!("entry {} deleted", rating::normalize_prefix(&p)?),
                None => format!("deleted ({removed} entries)"),
            };
            println!("rate plan {name}: {what}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sipalias-billing").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_account_add_with_repeated_realms() {
        let cli = parse(&[
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
        match cli.command.expect("a command") {
            Command::Account(AccountCommand::Add(a)) => {
                assert_eq!(a.realms, ["a", "b"]);
                assert!(a.force);
                assert_eq!((a.prepaid, a.balance, a.credit_limit), (false, None, None));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn account_add_takes_billing_options_in_decimal() {
        let cli = parse(&[
            "account",
            "add",
            "--aor",
            "a@b",
            "--password",
            "pw",
            "--prepaid",
            "--balance",
            "-5.5",
            "--rate-plan",
            "retail",
            "--max-calls",
            "5",
        ])
        .expect("parse");
        let Some(Command::Account(AccountCommand::Add(a))) = cli.command else { panic!("not add") };
        assert!(a.prepaid);
        assert_eq!(a.balance, Some(-5_500_000));
        assert_eq!(a.rate_plan.as_deref(), Some("retail"));
        assert_eq!(a.max_calls, Some(5));

        let cli = parse(&[
            "account",
            "add",
            "--aor",
            "a@b",
            "--password",
            "pw",
            "--credit-limit",
            "50.00",
        ])
        .expect("parse");
        let Some(Command::Account(AccountCommand::Add(a))) = cli.command else { panic!("not add") };
        assert_eq!(a.credit_limit, Some(CreditLimit(Some(50_000_000))));

        // A prepaid account has no credit limit; amounts are exact decimals.
        let both = [
            "account",
            "add",
            "--aor",
            "a@b",
            "--password",
            "p",
            "--prepaid",
            "--credit-limit",
            "1",
        ];
        assert!(parse(&both).is_err());
        assert!(
            parse(&["account", "add", "--aor", "a@b", "--password", "p", "--balance", "1e3"])
                .is_err()
        );
        assert!(
            parse(&["account", "add", "--aor", "a@b", "--password", "p", "--credit-limit", "-1"])
                .is_err()
        );
    }

    #[test]
    fn account_set_needs_a_change() {
        assert!(parse(&["account", "set", "--aor", "a@b"]).is_err());
        let cli = parse(&[
            "account",
            "set",
            "--aor",
            "a@b",
            "--credit-limit",
            "unlimited",
            "--kind",
            "postpaid",
        ])
        .expect("parse");
        let Some(Command::Account(AccountCommand::Set(s))) = cli.command else { panic!("not set") };
        assert_eq!(s.credit_limit, Some(CreditLimit(None)));
        assert_eq!(s.kind, Some(Kind::Postpaid));
        assert!(parse(&["account", "set", "--aor", "a@b", "--kind", "gold"]).is_err());
        assert!(
            parse(&["account", "set", "--aor", "a@b", "--rate-plan", "x", "--default-rate-plan"])
                .is_err()
        );
    }

    #[test]
    fn topup_and_rate_plan_amounts() {
        let cli = parse(&["account", "topup", "--aor", "a@b", "--amount", "-0.25"]).expect("parse");
        let Some(Command::Account(AccountCommand::Topup(t))) = cli.command else {
            panic!("not topup")
        };
        assert_eq!(t.amount, -250_000);

        let cli = parse(&[
            "rate-plan",
            "set",
            "--name",
            "retail",
            "--prefix",
            "44",
            "--per-minute",
            "0.10",
        ])
        .expect("parse");
        let Some(Command::RatePlan(RatePlanCommand::Set(r))) = cli.command else {
            panic!("not set")
        };
        assert_eq!((r.per_minute, r.fee, r.increments.as_str()), (100_000, 0, "60/60"));
    }

    #[test]
    fn cdr_list_filters() {
        let cli = parse(&[
            "cdr",
            "list",
            "--csv",
            "--aor",
            "a@b",
            "--since",
            "2025-11-27",
            "--until",
            "1764244800000",
        ])
        .expect("parse");
        let Some(Command::Cdr(CdrCommand::List { since, until, aor, csv, .. })) = cli.command
        else {
            panic!("not cdr list")
        };
        assert!(csv);
        assert_eq!(aor.as_deref(), Some("a@b"));
        assert_eq!((since, until), (Some(1_764_201_600_000), Some(1_764_244_800_000)));
    }

    #[test]
    fn import_needs_a_hash() {
        assert!(parse(&["account", "import", "--aor", "a@b", "--realm", "b"]).is_err());
    }
}
