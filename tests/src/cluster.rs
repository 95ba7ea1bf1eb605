//! A whole sipalias cluster on loopback: redis-server, billing, one dispatcher listening on the
//! main IP 127.0.0.1 and two alias IPs (127.0.0.2, 127.0.0.3 with an extra port), and N
//! processors — every one a real process, with ports of its own so tests can run in parallel.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::cdr::{self, Cdr};
use crate::phone::Server;
use crate::process::{Exited, Process};
use crate::redis::RedisServer;
use crate::{binary, ports, wait};

/// The canonical domain of every user.
pub const DOMAIN: &str = "sip.example.net";
/// The main IP.
pub const MAIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// The first alias: an old provider's server IP.
pub const ALIAS2_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The digest realm phones of the first alias expect.
pub const ALIAS2_REALM: &str = "voip.oldprovider.example";
/// The second alias, which also listens on an extra UDP port.
pub const ALIAS3_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// The digest realm phones of the second alias expect.
pub const ALIAS3_REALM: &str = "sip.another-old.example";
/// Prefix of every Redis key; not the default, to prove the setting is honoured.
pub const KEY_PREFIX: &str = "e2e:";

/// How long a service gets to come up, and a processor to (dis)connect.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CLI command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Start-up attempts when a process exits at start (most likely: a port taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of processors, `p1` … `pN`.
    pub processors: usize,
    /// Processor `t1_ms` (RFC 3261 T1); `None` keeps the processor's default (500).
    pub t1_ms: Option<u64>,
    /// Processor `keepalive_interval_secs`; 0 (the harness default) turns NAT keepalives off so
    /// test phones only see the requests a test makes.
    pub keepalive_interval_secs: u32,
    /// Extra lines for the `[processor]` table (e.g. `billing_outage = "allow"`).
    pub processor_toml: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            processors: 2,
            t1_ms: None,
            keepalive_interval_secs: 0,
            processor_toml: String::new(),
        }
    }
}

/// A running cluster. Dropping it stops every process (processors first) and removes its
/// directory.
pub struct Cluster {
    // Field order is drop order: clients of Redis before Redis, the directory last.
    processors: Vec<Option<Process>>,
    dispatcher: Process,
    billing: Option<Process>,
    redis: RedisServer,
    config: PathBuf,
    sip_port: u16,
    extra_port: u16,
    options: ClusterOptions,
    dir: TempDir,
}

impl Cluster {
    /// Starts redis, billing, the dispatcher and the processors, and waits until every
    /// processor is connected to the dispatcher.
    pub fn start(options: ClusterOptions) -> Result<Self> {
        for name in [binary::BILLING, binary::DISPATCHER, binary::PROCESSOR] {
            binary::path(name)?;
        }
        let mut attempt = 1;
        loop {
            match Self::try_start(options.clone()) {
                Ok(c) => return Ok(c),
                // A process that exits during start-up most likely lost a port to another
                // program between our probe and its bind: retry with fresh ports.
                Err(e) if attempt < START_ATTEMPTS && e.downcast_ref::<Exited>().is_some() => {
                    eprintln!("[cluster] start-up attempt {attempt} failed, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(options: ClusterOptions) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("sipalias-e2e-").tempdir()?;
        let redis = RedisServer::start(dir.path())?;
        let sip_port = ports::free_sip_port_on_all(&[MAIN_IP, ALIAS2_IP, ALIAS3_IP])?;
        let extra_port = loop {
            let p = ports::free_udp_port(ALIAS3_IP)?;
            if p != sip_port {
                break p;
            }
        };
        let grpc = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
        let billing_addr = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
        let config = dir.path().join("sipalias.toml");
        let toml = config_toml(&ConfigValues {
            grpc,
            billing: billing_addr,
            redis_url: &redis.url(),
            sip_port,
            extra_port,
            t1_ms: options.t1_ms,
            keepalive_interval_secs: options.keepalive_interval_secs,
            processor_toml: &options.processor_toml,
        });
        std::fs::write(&config, toml).with_context(|| format!("writing {}", config.display()))?;

        let billing =
            Process::spawn("billing", service_command(binary::BILLING, &config, &["serve"])?)?;
        billing.wait_for_line("billing listening on", START_TIMEOUT)?;

        let dispatcher =
            Process::spawn("dispatcher", service_command(binary::DISPATCHER, &config, &[])?)?;
        dispatcher.wait_for_line("edge grpc listening on", START_TIMEOUT)?;
        for (ip, port) in [
            (MAIN_IP, sip_port),
            (ALIAS2_IP, sip_port),
            (ALIAS3_IP, sip_port),
            (ALIAS3_IP, extra_port),
        ] {
            dispatcher
                .wait_for_line(&format!("sip udp listening on {ip}:{port}"), START_TIMEOUT)?;
        }

        let mut cluster = Cluster {
            processors: Vec::new(),
            dispatcher,
            billing: Some(billing),
            redis,
            config,
            sip_port,
            extra_port,
            options,
            dir,
        };
        for n in 1..=cluster.options.processors {
            let p = cluster.spawn_processor(n)?;
            cluster.processors.push(Some(p));
        }
        for n in 1..=cluster.options.processors {
            cluster
                .dispatcher
                .wait_for_line(&format!("processor p{n} connected"), START_TIMEOUT)?;
        }
        Ok(cluster)
    }

    // ----- addresses ----------------------------------------------------------------------

    /// The main IP, for phones configured with the canonical domain.
    pub fn main(&self) -> Server {
        Server { addr: SocketAddr::from((MAIN_IP, self.sip_port)), domain: DOMAIN.to_owned() }
    }

    /// The first alias; its phones use the alias IP as their domain.
    pub fn alias2(&self) -> Server {
        Server { addr: SocketAddr::from((ALIAS2_IP, self.sip_port)), domain: ALIAS2_IP.to_string() }
    }

    /// The second alias on the standard (cluster) port.
    pub fn alias3(&self) -> Server {
        Server { addr: SocketAddr::from((ALIAS3_IP, self.sip_port)), domain: ALIAS3_IP.to_string() }
    }

    /// The second alias on its extra port.
    pub fn alias3_extra(&self) -> Server {
        Server {
            addr: SocketAddr::from((ALIAS3_IP, self.extra_port)),
            domain: ALIAS3_IP.to_string(),
        }
    }

    /// The UDP port of the main IP and of both aliases (P).
    pub fn sip_port(&self) -> u16 {
        self.sip_port
    }

    /// The extra UDP port of the second alias (Q).
    pub fn extra_port(&self) -> u16 {
        self.extra_port
    }

    /// The cluster's TOML file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// This cluster's private directory (config, redis socket, CLI output).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    // ----- processes ----------------------------------------------------------------------

    /// The dispatcher process.
    pub fn dispatcher(&self) -> &Process {
        &self.dispatcher
    }

    /// The billing process, unless stopped with [`Cluster::stop_billing`].
    pub fn billing(&self) -> Option<&Process> {
        self.billing.as_ref()
    }

    /// Kills billing (an outage).
    pub fn stop_billing(&mut self) -> Result<()> {
        if let Some(b) = self.billing.take() {
            b.kill()?;
        }
        Ok(())
    }

    /// Starts billing again after [`Cluster::stop_billing`] and waits until it listens.
    pub fn start_billing(&mut self) -> Result<()> {
        if self.billing.is_some() {
            bail!("billing is already running");
        }
        let billing =
            Process::spawn("billing", service_command(binary::BILLING, &self.config, &["serve"])?)?;
        billing.wait_for_line("billing listening on", START_TIMEOUT)?;
        self.billing = Some(billing);
        Ok(())
    }

    /// Processor `pN` (numbered from 1, as its id), if running.
    pub fn processor(&self, n: usize) -> Option<&Process> {
        self.processors.get(n.checked_sub(1)?)?.as_ref()
    }

    /// The redis-server.
    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    /// Fails naming the first service process that is no longer running.
    pub fn check_all_running(&self) -> Result<()> {
        let all = [&self.dispatcher, self.redis.process()]
            .into_iter()
            .chain(self.billing.iter())
            .chain(self.processors.iter().flatten());
        for p in all {
            if !p.is_running() {
                bail!("{} (pid {}) is no longer running", p.name(), p.pid());
            }
        }
        Ok(())
    }

    /// Kills processor `pN` with SIGKILL (a crash) and waits for the dispatcher to notice.
    pub fn kill_processor(&mut self, n: usize) -> Result<()> {
        let mark = self.dispatcher.mark();
        let slot = self.processors.get_mut(n.wrapping_sub(1)).context("no such processor")?;
        let p = slot.take().with_context(|| format!("processor p{n} is not running"))?;
        p.kill()?;
        drop(p);
        self.dispatcher.wait_for_line_since(
            mark,
            &format!("processor p{n} disconnected"),
            START_TIMEOUT,
        )?;
        Ok(())
    }

    /// Starts processor `pN` (again) with the same id and waits until it is connected.
    pub fn start_processor(&mut self, n: usize) -> Result<()> {
        if self.processor(n).is_some() {
            bail!("processor p{n} is already running");
        }
        let mark = self.dispatcher.mark();
        let p = self.spawn_processor(n)?;
        *self.processors.get_mut(n.wrapping_sub(1)).context("no such processor")? = Some(p);
        self.dispatcher.wait_for_line_since(
            mark,
            &format!("processor p{n} connected"),
            START_TIMEOUT,
        )?;
        Ok(())
    }

    /// Kills processor `pN` and starts it again (same id), waiting for it to reconnect.
    pub fn restart_processor(&mut self, n: usize) -> Result<()> {
        self.kill_processor(n)?;
        self.start_processor(n)
    }

    fn spawn_processor(&self, n: usize) -> Result<Process> {
        let mut cmd = service_command(binary::PROCESSOR, &self.config, &[])?;
        cmd.env("SIPALIAS_PROCESSOR__ID", format!("p{n}"));
        Process::spawn(&format!("p{n}"), cmd)
    }

    // ----- billing ------------------------------------------------------------------------

    /// Creates `user@sip.example.net` with credentials for the domain and both alias realms.
    pub fn add_account(&self, user: &str, password: &str) -> Result<()> {
        let aor = format!("{user}@{DOMAIN}");
        self.billing_cli(&[
            "account",
            "add",
            "--aor",
            &aor,
            "--password",
            password,
            "--realm",
            DOMAIN,
            "--realm",
            ALIAS2_REALM,
            "--realm",
            ALIAS3_REALM,
        ])?;
        Ok(())
    }

    /// Like [`Cluster::add_account`], with extra `account add` options (e.g. `--prepaid`,
    /// `--balance 1.00`, `--rate-plan NAME`, `--max-calls 5`).
    pub fn add_account_with(&self, user: &str, password: &str, extra: &[&str]) -> Result<()> {
        let aor = format!("{user}@{DOMAIN}");
        let mut args = vec![
            "account",
            "add",
            "--aor",
            &aor,
            "--password",
            password,
            "--realm",
            DOMAIN,
            "--realm",
            ALIAS2_REALM,
            "--realm",
            ALIAS3_REALM,
        ];
        args.extend_from_slice(extra);
        self.billing_cli(&args)?;
        Ok(())
    }

    /// The balance of `user@sip.example.net` in micro-units (`account show`).
    pub fn balance_micros(&self, user: &str) -> Result<i64> {
        let out = self.billing_cli(&["account", "show", "--aor", &format!("{user}@{DOMAIN}")])?;
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("balance"))
            .with_context(|| format!("no balance in:\n{out}"))?;
        let amount = line.trim_start().trim_start_matches("balance").trim();
        parse_money(amount).with_context(|| format!("balance {amount:?}"))
    }

    /// Blocks `user@sip.example.net`.
    pub fn block(&self, user: &str) -> Result<()> {
        self.billing_cli(&["account", "block", "--aor", &format!("{user}@{DOMAIN}")])?;
        Ok(())
    }

    /// Every CDR billing has (`cdr list --csv`).
    pub fn cdrs(&self) -> Result<Vec<Cdr>> {
        cdr::parse_csv(&self.billing_cli(&["cdr", "list", "--csv"])?)
    }

    /// Waits until billing has a CDR satisfying `pred` (accounting is asynchronous to the BYE).
    pub fn wait_for_cdr(&self, timeout: Duration, pred: impl Fn(&Cdr) -> bool) -> Result<Cdr> {
        wait::until_every("a matching CDR", timeout, Duration::from_millis(100), || {
            Ok(self.cdrs()?.into_iter().find(|c| pred(c)))
        })
    }

    /// Runs `sipalias-billing --config F ARGS…` to completion and returns its stdout.
    pub fn billing_cli(&self, args: &[&str]) -> Result<String> {
        let stamp = format!("{:x}", rand::random::<u32>());
        let out_path = self.dir.path().join(format!("cli-{stamp}.out"));
        let err_path = self.dir.path().join(format!("cli-{stamp}.err"));
        let mut cmd = service_command(binary::BILLING, &self.config, args)?;
        cmd.stdin(Stdio::null()).stdout(File::create(&out_path)?).stderr(File::create(&err_path)?);
        let mut child = cmd.spawn().with_context(|| format!("running billing {args:?}"))?;
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("billing {args:?} did not finish within {CLI_TIMEOUT:?}");
            }
            // Polling the child for exit: std has no wait-with-timeout.
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = std::fs::read_to_string(&out_path)?;
        let stderr = std::fs::read_to_string(&err_path)?;
        if !status.success() {
            bail!("billing {args:?} failed ({status}):\n{stdout}{stderr}");
        }
        Ok(stdout)
    }

    // ----- redis --------------------------------------------------------------------------

    /// The Redis key of `user`'s bindings.
    pub fn location_key(user: &str) -> String {
        format!("{KEY_PREFIX}loc:{{{user}@{DOMAIN}}}")
    }

    /// `user`'s bindings as stored in Redis: Contact URI → parsed JSON value.
    pub fn redis_bindings(&self, user: &str) -> Result<BTreeMap<String, serde_json::Value>> {
        let mut con = self.redis.client()?;
        let raw: BTreeMap<String, String> =
            redis::cmd("HGETALL").arg(Self::location_key(user)).query(&mut con)?;
        raw.into_iter()
            .map(|(field, json)| {
                let v = serde_json::from_str(&json)
                    .with_context(|| format!("binding {field} is not JSON: {json}"))?;
                Ok((field, v))
            })
            .collect()
    }
}

/// The values that differ between clusters.
struct ConfigValues<'a> {
    grpc: SocketAddr,
    billing: SocketAddr,
    redis_url: &'a str,
    sip_port: u16,
    extra_port: u16,
    t1_ms: Option<u64>,
    keepalive_interval_secs: u32,
    processor_toml: &'a str,
}

/// The one TOML file all three binaries read (layout of `deploy/local.toml`).
fn config_toml(v: &ConfigValues<'_>) -> String {
    let ConfigValues {
        grpc,
        billing,
        redis_url,
        sip_port,
        extra_port,
        t1_ms,
        keepalive_interval_secs,
        processor_toml,
    } = v;
    let t1 = t1_ms.map(|t| format!("t1_ms = {t}\n")).unwrap_or_default();
    format!(
        r#"# Written by the sipalias end-to-end harness.
[dispatcher]
id = "d1"
grpc_listen = "{grpc}"
retry_after_secs = 5

[dispatcher.main]
ip = "{MAIN_IP}"
domain = "{DOMAIN}"
udp_port = {sip_port}
tcp_port = {sip_port}

[[dispatcher.aliases]]
ip = "{ALIAS2_IP}"
domain = "{DOMAIN}"
realm = "{ALIAS2_REALM}"
udp_port = {sip_port}
tcp_port = {sip_port}

[[dispatcher.aliases]]
ip = "{ALIAS3_IP}"
domain = "{DOMAIN}"
realm = "{ALIAS3_REALM}"
udp_port = {sip_port}
tcp_port = {sip_port}
extra_udp_ports = [{extra_port}]

[processor]
id = "p1"
dispatchers = ["http://{grpc}"]
billing_url = "http://{billing}"
redis_url = "{redis_url}"
key_prefix = "{KEY_PREFIX}"
auth_secret = "e2e-shared-secret"
keepalive_interval_secs = {keepalive_interval_secs}
{t1}{processor_toml}

[billing]
listen = "{billing}"
redis_url = "{redis_url}"
key_prefix = "{KEY_PREFIX}"
"#
    )
}

/// `BIN --config FILE ARGS…` with a clean environment for the cluster: no inherited
/// `SIPALIAS_*` overrides, plain (uncoloured) logs at `info`, or `$SIPALIAS_E2E_LOG`.
fn service_command(bin: &str, config: &Path, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(binary::path(bin)?);
    cmd.arg("--config").arg(config).args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SIPALIAS_") {
            cmd.env_remove(k);
        }
    }
    let filter = std::env::var("SIPALIAS_E2E_LOG").unwrap_or_else(|_| "info".to_owned());
    cmd.env("RUST_LOG", filter).env("NO_COLOR", "1");
    Ok(cmd)
}

/// Parses a decimal amount such as `1.00` or `-0.5` into micro-units.
pub fn parse_money(s: &str) -> Option<i64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (units, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 6 || units.is_empty() {
        return None;
    }
    let units: i64 = units.parse().ok()?;
    let frac: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().ok()? };
    let v = units * 1_000_000 + frac;
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_key_uses_prefix_and_hash_tag() {
        assert_eq!(Cluster::location_key("alice"), "e2e:loc:{alice@sip.example.net}");
    }

    #[test]
    fn config_has_every_alias_and_optional_t1() {
        let v = ConfigValues {
            grpc: SocketAddr::from((MAIN_IP, 7070)),
            billing: SocketAddr::from((MAIN_IP, 7080)),
            redis_url: "redis+unix:///tmp/x/redis.sock",
            sip_port: 15060,
            extra_port: 15080,
            t1_ms: Some(50),
            keepalive_interval_secs: 0,
            processor_toml: "",
        };
        let toml = config_toml(&v);
        assert!(toml.contains("extra_udp_ports = [15080]"));
        assert!(toml.contains("t1_ms = 50\n"));
        assert!(toml.contains("dispatchers = [\"http://127.0.0.1:7070\"]"));
        assert!(!config_toml(&ConfigValues { t1_ms: None, ..v }).contains("t1_ms"));
    }
}
