//! A whole sipalias cluster on loopback: redis-server, billing, one dispatcher listening on the
//! main IP 127.0.0.1 and two alias IPs (127.0.0.2, 127.0.0.3 with extra ports), and N
//! processors — every one a real process, with ports of its own so tests can run in parallel.
//!
//! Every IP listens on UDP and TCP port P. 127.0.0.1 and 127.0.0.3 also listen on TLS port T,
//! each with a self-signed certificate of its own made at start-up; 127.0.0.3 has an extra UDP,
//! TCP and TLS port.
//!
//! With [`ClusterOptions::second_dispatcher`] a second dispatcher, `d2`, runs beside `d1` with
//! IPs of its own (two dispatchers on one host cannot bind the same IPs without VRRP): main IP
//! 127.0.0.4 (same canonical domain) and alias 127.0.0.5 (realm of its own), UDP and TCP, and
//! every processor links to both.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::cdr::{self, Cdr};
use crate::phone::{Server, Transport};
use crate::process::{Exited, Process};
use crate::redis::RedisServer;
use crate::tls::CertFiles;
use crate::{binary, ports, wait};

/// The canonical domain of every user.
pub const DOMAIN: &str = "sip.example.net";
/// The main IP.
pub const MAIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// The first alias: an old provider's server IP.
pub const ALIAS2_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The digest realm phones of the first alias expect.
pub const ALIAS2_REALM: &str = "voip.oldprovider.example";
/// The second alias, which also listens on extra UDP, TCP and TLS ports.
pub const ALIAS3_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// The digest realm phones of the second alias expect.
pub const ALIAS3_REALM: &str = "sip.another-old.example";
/// Subject (common name) of the main IP's TLS certificate.
pub const MAIN_CERT_SUBJECT: &str = "sip.example.net";
/// Subject (common name) of the second alias's TLS certificate: the old provider's server.
pub const ALIAS3_CERT_SUBJECT: &str = "sip.another-old.example";
/// Main IP of the second dispatcher (same canonical domain as [`MAIN_IP`]).
pub const D2_MAIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// Alias IP of the second dispatcher.
pub const D2_ALIAS_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
/// The digest realm phones of the second dispatcher's alias expect.
pub const D2_ALIAS_REALM: &str = "sip.third-old.example";
/// Prefix of every Redis key; not the default, to prove the setting is honoured.
pub const KEY_PREFIX: &str = "e2e:";
/// The cluster's link secret: every dispatcher, processor and billing of a test cluster has it.
pub const LINK_SECRET: &str = "e2e-cluster-link-secret";

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
    /// Extra lines for the `[dispatcher]` table (e.g. `max_connections_per_ip = 5`).
    pub dispatcher_toml: String,
    /// Extra lines for the table of alias 127.0.0.3 (e.g. `digest_algorithms = ["SHA-256"]`).
    pub alias3_toml: String,
    /// TLS listeners on 127.0.0.1 and 127.0.0.3 (on by default; certificates are made at
    /// start-up). Without, those IPs listen on UDP and TCP only.
    pub tls: bool,
    /// Run Redis with an append-only file fsynced on every write, so that
    /// [`Cluster::restart_redis`] keeps bindings and dialogs (off by default: nothing on disk).
    pub redis_persistence: bool,
    /// A second dispatcher, `d2`, on 127.0.0.4 (main, domain `sip.example.net`) and 127.0.0.5
    /// (alias, realm [`D2_ALIAS_REALM`]) over UDP and TCP, with its own port and gRPC port;
    /// every processor lists both dispatchers and is waited for on both. Off by default.
    pub second_dispatcher: bool,
    /// Every service opens its operations listener (`metrics_listen`) on a free port of
    /// 127.0.0.1: [`Cluster::ops_addr`]. Off by default.
    pub metrics: bool,
}

/// A service of the cluster, for [`Cluster::ops_addr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The (first) dispatcher.
    Dispatcher,
    /// Processor `pN`.
    Processor(usize),
    /// Billing.
    Billing,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            processors: 2,
            t1_ms: None,
            keepalive_interval_secs: 0,
            processor_toml: String::new(),
            alias3_toml: String::new(),
            dispatcher_toml: String::new(),
            tls: true,
            redis_persistence: false,
            second_dispatcher: false,
            metrics: false,
        }
    }
}

/// The stream ports of a cluster, besides P.
#[derive(Debug, Clone)]
struct StreamPorts {
    /// TLS port of 127.0.0.1 and 127.0.0.3.
    tls: u16,
    /// Extra TCP port of 127.0.0.3.
    extra_tcp: u16,
    /// Extra TLS port of 127.0.0.3.
    extra_tls: u16,
}

/// The certificates of the TLS IPs.
#[derive(Debug, Clone)]
struct Certificates {
    main: CertFiles,
    alias3: CertFiles,
}

/// The second dispatcher (`d2`) of a cluster started with
/// [`ClusterOptions::second_dispatcher`].
struct SecondDispatcher {
    /// `None` once killed ([`Cluster::kill_second_dispatcher`]).
    process: Option<Process>,
    /// Its own TOML file: the `[dispatcher]` table with its id, edge and IPs.
    config: PathBuf,
    /// Its edge (gRPC) address.
    grpc: SocketAddr,
    /// Its UDP and TCP port on both its IPs.
    sip_port: u16,
}

/// A processor that was sent SIGTERM and has not been seen to exit yet.
struct Terminating {
    /// When SIGTERM was sent.
    at: Instant,
    /// The dispatcher's output line count then, to wait for its `disconnected` line.
    dispatcher_mark: usize,
}

/// How a processor ended after SIGTERM ([`Cluster::terminate_processor`]).
#[derive(Debug, Clone, Copy)]
pub struct Terminated {
    /// Its exit status.
    pub status: ExitStatus,
    /// From SIGTERM to its exit.
    pub took: Duration,
}

/// What [`Cluster::restart_dispatcher`] saw.
#[derive(Debug, Clone, Copy)]
pub struct DispatcherRestart {
    /// When the new dispatcher logged that its edge (gRPC) listens: from then on processors
    /// can link.
    pub listening_at: Instant,
    /// From then until the dispatcher logged the last running processor as connected (zero
    /// when they all linked before the line was read, or none was running).
    pub processors_back_after: Duration,
}

/// A running cluster. Dropping it stops every process (processors first) and removes its
/// directory.
pub struct Cluster {
    // Field order is drop order: clients of Redis before Redis, the directory last.
    /// Processor `pN` at index N-1; `None` when not running (killed, terminated, or a gap
    /// below a processor started beyond `options.processors`).
    processors: Vec<Option<Process>>,
    /// Processors sent SIGTERM, by number, until [`Cluster::wait_processor_exit`].
    terminating: BTreeMap<usize, Terminating>,
    dispatcher: Process,
    second: Option<SecondDispatcher>,
    billing: Option<Process>,
    redis: RedisServer,
    config: PathBuf,
    /// Billing's gRPC address.
    billing_addr: SocketAddr,
    /// The (first) dispatcher's edge gRPC address.
    edge_addr: SocketAddr,
    sip_port: u16,
    extra_port: u16,
    streams: StreamPorts,
    certs: Option<Certificates>,
    options: ClusterOptions,
    /// Operations listeners, with `options.metrics`: each service's address.
    ops: std::sync::Mutex<BTreeMap<ServiceKey, SocketAddr>>,
    dir: TempDir,
}

/// [`Service`] as a map key.
type ServiceKey = (u8, usize);

fn service_key(s: Service) -> ServiceKey {
    match s {
        Service::Dispatcher => (0, 0),
        Service::Processor(n) => (1, n),
        Service::Billing => (2, 0),
    }
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
        let redis = RedisServer::start_with(dir.path(), options.redis_persistence)?;
        let sip_port = ports::free_sip_port_on_all(&[MAIN_IP, ALIAS2_IP, ALIAS3_IP])?;
        let extra_port = loop {
            let p = ports::free_udp_port(ALIAS3_IP)?;
            if p != sip_port {
                break p;
            }
        };
        // TCP and TLS listeners share one port space per IP: every stream port is distinct.
        let mut taken = vec![sip_port, extra_port];
        let mut distinct = |ips: &[Ipv4Addr]| -> Result<u16> {
            loop {
                let p = ports::free_tcp_port_on_all(ips)?;
                if !taken.contains(&p) {
                    taken.push(p);
                    return Ok(p);
                }
            }
        };
        let streams = StreamPorts {
            tls: distinct(&[MAIN_IP, ALIAS3_IP])?,
            extra_tcp: distinct(&[ALIAS3_IP])?,
            extra_tls: distinct(&[ALIAS3_IP])?,
        };
        let certs = if options.tls {
            Some(Certificates {
                main: CertFiles::create(dir.path(), "main", MAIN_IP.into(), MAIN_CERT_SUBJECT)?,
                alias3: CertFiles::create(
                    dir.path(),
                    "alias3",
                    ALIAS3_IP.into(),
                    ALIAS3_CERT_SUBJECT,
                )?,
            })
        } else {
            None
        };
        let grpc = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
        let billing_addr = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
        let second = if options.second_dispatcher {
            let config = dir.path().join("sipalias-d2.toml");
            let grpc = loop {
                let a = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
                if a != grpc && a != billing_addr {
                    break a;
                }
            };
            let sip_port = ports::free_sip_port_on_all(&[D2_MAIN_IP, D2_ALIAS_IP])?;
            std::fs::write(&config, second_dispatcher_toml(grpc, sip_port))
                .with_context(|| format!("writing {}", config.display()))?;
            Some(SecondDispatcher { process: None, config, grpc, sip_port })
        } else {
            None
        };
        let config = dir.path().join("sipalias.toml");
        let toml = config_toml(&ConfigValues {
            grpc,
            second_grpc: second.as_ref().map(|d| d.grpc),
            billing: billing_addr,
            redis_url: &redis.url(),
            sip_port,
            extra_port,
            streams: &streams,
            certs: certs.as_ref(),
            t1_ms: options.t1_ms,
            keepalive_interval_secs: options.keepalive_interval_secs,
            processor_toml: &options.processor_toml,
            alias3_toml: &options.alias3_toml,
            dispatcher_toml: &options.dispatcher_toml,
        });
        std::fs::write(&config, toml).with_context(|| format!("writing {}", config.display()))?;

        let mut ops = BTreeMap::new();
        let mut billing_cmd = service_command(binary::BILLING, &config, &["serve"])?;
        let mut dispatcher_cmd = service_command(binary::DISPATCHER, &config, &[])?;
        if options.metrics {
            for (service, cmd, var) in [
                (Service::Billing, &mut billing_cmd, "SIPALIAS_BILLING__METRICS_LISTEN"),
                (Service::Dispatcher, &mut dispatcher_cmd, "SIPALIAS_DISPATCHER__METRICS_LISTEN"),
            ] {
                let addr = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
                cmd.env(var, addr.to_string());
                ops.insert(service_key(service), addr);
            }
        }
        let billing = Process::spawn("billing", billing_cmd)?;
        billing.wait_for_line("billing listening on", START_TIMEOUT)?;

        let dispatcher = Process::spawn("dispatcher", dispatcher_cmd)?;
        wait_dispatcher_listening(
            &dispatcher,
            &listening_sockets(sip_port, extra_port, &streams, certs.is_some()),
        )?;
        let second = match second {
            Some(mut d2) => {
                let p =
                    Process::spawn("d2", service_command(binary::DISPATCHER, &d2.config, &[])?)?;
                wait_dispatcher_listening(&p, &second_dispatcher_sockets(d2.sip_port))?;
                d2.process = Some(p);
                Some(d2)
            }
            None => None,
        };

        let mut cluster = Cluster {
            processors: Vec::new(),
            terminating: BTreeMap::new(),
            dispatcher,
            second,
            billing: Some(billing),
            redis,
            config,
            billing_addr,
            edge_addr: grpc,
            sip_port,
            extra_port,
            streams,
            certs,
            options,
            ops: std::sync::Mutex::new(ops),
            dir,
        };
        for n in 1..=cluster.options.processors {
            let p = cluster.spawn_processor(n)?;
            cluster.processors.push(Some(p));
        }
        for n in 1..=cluster.options.processors {
            for d in cluster.dispatchers() {
                d.wait_for_line(&format!("processor p{n} connected"), START_TIMEOUT)?;
            }
        }
        Ok(cluster)
    }

    // ----- addresses ----------------------------------------------------------------------

    /// A server socket of this cluster: `ip:port` over `transport`, with the domain phones
    /// behind that IP use (the canonical domain on the main IP, the alias IP itself on an
    /// alias).
    pub fn server(ip: Ipv4Addr, port: u16, transport: Transport) -> Server {
        let domain = if ip == MAIN_IP { DOMAIN.to_owned() } else { ip.to_string() };
        Server { addr: SocketAddr::from((ip, port)), domain, transport }
    }

    /// The main IP (UDP), for phones configured with the canonical domain.
    pub fn main(&self) -> Server {
        Self::server(MAIN_IP, self.sip_port, Transport::Udp)
    }

    /// Billing's gRPC address (a TCP service of the cluster).
    pub fn billing_addr(&self) -> SocketAddr {
        self.billing_addr
    }

    /// The (first) dispatcher's edge gRPC address, where processors link in.
    pub fn edge_addr(&self) -> SocketAddr {
        self.edge_addr
    }

    /// The first alias (UDP); its phones use the alias IP as their domain.
    pub fn alias2(&self) -> Server {
        Self::server(ALIAS2_IP, self.sip_port, Transport::Udp)
    }

    /// The second alias on the standard (cluster) UDP port.
    pub fn alias3(&self) -> Server {
        Self::server(ALIAS3_IP, self.sip_port, Transport::Udp)
    }

    /// The second alias on its extra UDP port.
    pub fn alias3_extra(&self) -> Server {
        Self::server(ALIAS3_IP, self.extra_port, Transport::Udp)
    }

    /// The main IP over TCP (port P).
    pub fn main_tcp(&self) -> Server {
        Self::server(MAIN_IP, self.sip_port, Transport::Tcp)
    }

    /// The main IP over TLS (port T).
    pub fn main_tls(&self) -> Server {
        Self::server(MAIN_IP, self.streams.tls, Transport::Tls)
    }

    /// The first alias over TCP (port P). It has no TLS.
    pub fn alias2_tcp(&self) -> Server {
        Self::server(ALIAS2_IP, self.sip_port, Transport::Tcp)
    }

    /// The second alias over TCP on the standard port P.
    pub fn alias3_tcp(&self) -> Server {
        Self::server(ALIAS3_IP, self.sip_port, Transport::Tcp)
    }

    /// The second alias over TLS on the standard port T.
    pub fn alias3_tls(&self) -> Server {
        Self::server(ALIAS3_IP, self.streams.tls, Transport::Tls)
    }

    /// The second alias over TCP on its extra TCP port.
    pub fn alias3_extra_tcp(&self) -> Server {
        Self::server(ALIAS3_IP, self.streams.extra_tcp, Transport::Tcp)
    }

    /// The second alias over TLS on its extra TLS port.
    pub fn alias3_extra_tls(&self) -> Server {
        Self::server(ALIAS3_IP, self.streams.extra_tls, Transport::Tls)
    }

    /// The second dispatcher's main IP 127.0.0.4 (UDP), for phones configured with the
    /// canonical domain. Fails without [`ClusterOptions::second_dispatcher`].
    pub fn d2_main(&self) -> Result<Server> {
        let d2 = self.second.as_ref().context("the cluster has no second dispatcher")?;
        Ok(Server {
            addr: SocketAddr::from((D2_MAIN_IP, d2.sip_port)),
            domain: DOMAIN.to_owned(),
            transport: Transport::Udp,
        })
    }

    /// The second dispatcher's alias 127.0.0.5 (UDP); its phones use the alias IP as their
    /// domain and answer challenges with [`D2_ALIAS_REALM`].
    pub fn d2_alias(&self) -> Result<Server> {
        let d2 = self.second.as_ref().context("the cluster has no second dispatcher")?;
        Ok(Self::server(D2_ALIAS_IP, d2.sip_port, Transport::Udp))
    }

    /// The certificate the dispatcher presents on `ip`'s TLS ports, if it has TLS.
    pub fn certificate(&self, ip: Ipv4Addr) -> Option<&CertFiles> {
        let certs = self.certs.as_ref()?;
        match ip {
            MAIN_IP => Some(&certs.main),
            ALIAS3_IP => Some(&certs.alias3),
            _ => None,
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

    /// The TLS port of the main IP and the second alias (T).
    pub fn tls_port(&self) -> u16 {
        self.streams.tls
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

    /// The second dispatcher (`d2`), while it runs.
    pub fn second_dispatcher(&self) -> Option<&Process> {
        self.second.as_ref()?.process.as_ref()
    }

    /// Every running dispatcher: `d1`, then `d2` if started and not killed.
    fn dispatchers(&self) -> impl Iterator<Item = &Process> {
        std::iter::once(&self.dispatcher).chain(self.second_dispatcher())
    }

    /// Kills the second dispatcher with SIGKILL (a crash) and waits until every running
    /// processor has logged a line about its link to it since (the link failing, or a
    /// re-dial being refused): from then on each processor knows `d2` is gone.
    pub fn kill_second_dispatcher(&mut self) -> Result<()> {
        let d2 = self.second.as_mut().context("the cluster has no second dispatcher")?;
        let url = format!("http://{}", d2.grpc);
        let p = d2.process.take().context("the second dispatcher is not running")?;
        let marks: Vec<(usize, usize)> = (1..=self.processors.len())
            .filter_map(|n| self.processor(n).map(|p| (n, p.mark())))
            .collect();
        p.kill()?;
        drop(p);
        for (n, mark) in marks {
            if let Some(p) = self.processor(n) {
                p.wait_for_line_since(mark, &url, START_TIMEOUT)?;
            }
        }
        Ok(())
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

    /// Fails naming the first service process that is no longer running (Redis and billing
    /// only while not stopped on purpose).
    pub fn check_all_running(&self) -> Result<()> {
        let all = self
            .dispatchers()
            .chain(self.redis.process())
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

    /// Starts processor `pN` — again with the same id, or a new one (any `n` ≥ 1, also beyond
    /// `options.processors`) — and waits until it is connected. Returns when the dispatcher
    /// logged `processor pN connected`: from then on it is routable.
    pub fn start_processor(&mut self, n: usize) -> Result<Instant> {
        if n == 0 {
            bail!("processors are numbered from 1");
        }
        if self.processor(n).is_some() {
            bail!("processor p{n} is already running");
        }
        if self.processors.len() < n {
            self.processors.resize_with(n, || None);
        }
        self.terminating.remove(&n);
        let mark = self.dispatcher.mark();
        let second_mark = self.second_dispatcher().map(Process::mark);
        let p = self.spawn_processor(n)?;
        self.processors[n - 1] = Some(p);
        let connected = format!("processor p{n} connected");
        let (at, _) = self.dispatcher.wait_for_line_at(mark, &connected, START_TIMEOUT)?;
        if let (Some(d2), Some(mark)) = (self.second_dispatcher(), second_mark) {
            d2.wait_for_line_since(mark, &connected, START_TIMEOUT)?;
        }
        Ok(at)
    }

    /// Kills processor `pN` and starts it again (same id), waiting for it to reconnect.
    pub fn restart_processor(&mut self, n: usize) -> Result<()> {
        self.kill_processor(n)?;
        self.start_processor(n).map(|_| ())
    }

    /// Sends SIGTERM to processor `pN` (a graceful drain) and returns at once; the processor
    /// keeps running until its drain ends: see [`Cluster::wait_processor_exit`].
    pub fn signal_processor_term(&mut self, n: usize) -> Result<()> {
        let p = self.processor(n).with_context(|| format!("processor p{n} is not running"))?;
        let dispatcher_mark = self.dispatcher.mark();
        let at = Instant::now();
        p.send_term()?;
        self.terminating.insert(n, Terminating { at, dispatcher_mark });
        Ok(())
    }

    /// Waits up to `timeout` for processor `pN`, sent SIGTERM by
    /// [`Cluster::signal_processor_term`], to exit, then for the dispatcher to log it as
    /// disconnected. Fails (having killed it) if it is still running after `timeout`.
    pub fn wait_processor_exit(&mut self, n: usize, timeout: Duration) -> Result<Terminated> {
        let term = self
            .terminating
            .remove(&n)
            .with_context(|| format!("processor p{n} was not sent SIGTERM"))?;
        let slot = self.processors.get_mut(n.wrapping_sub(1)).context("no such processor")?;
        let p = slot.take().with_context(|| format!("processor p{n} is not running"))?;
        let left = timeout.saturating_sub(term.at.elapsed());
        let status = p.wait_exit(left).with_context(|| {
            format!("p{n} did not exit within {timeout:?} of SIGTERM; last output:\n{}", {
                let lines = p.lines();
                lines[lines.len().saturating_sub(20)..].join("\n")
            })
        })?;
        let took = term.at.elapsed();
        drop(p);
        self.dispatcher.wait_for_line_since(
            term.dispatcher_mark,
            &format!("processor p{n} disconnected"),
            START_TIMEOUT,
        )?;
        Ok(Terminated { status, took })
    }

    /// Sends SIGTERM to processor `pN` and waits up to `timeout` for it to exit (see
    /// [`Cluster::wait_processor_exit`]): its exit status and how long it took.
    pub fn terminate_processor(&mut self, n: usize, timeout: Duration) -> Result<Terminated> {
        self.signal_processor_term(n)?;
        self.wait_processor_exit(n, timeout)
    }

    /// Kills the dispatcher (SIGKILL: no goodbye to the processors) and starts it again with
    /// the same configuration; waits until every socket listens and every running processor
    /// has linked to it again.
    pub fn restart_dispatcher(&mut self) -> Result<DispatcherRestart> {
        self.dispatcher.kill()?;
        let dispatcher =
            Process::spawn("dispatcher", service_command(binary::DISPATCHER, &self.config, &[])?)?;
        // The old one is dead already: dropping it only reaps nothing twice.
        self.dispatcher = dispatcher;
        // Marks taken from the old dispatcher's output mean nothing to the new one.
        self.terminating.clear();
        let listening_at = wait_dispatcher_listening(
            &self.dispatcher,
            &listening_sockets(self.sip_port, self.extra_port, &self.streams, self.certs.is_some()),
        )?;
        let mut processors_back_after = Duration::ZERO;
        let running: Vec<usize> =
            (1..=self.processors.len()).filter(|n| self.processor(*n).is_some()).collect();
        for n in running {
            let (at, _) = self.dispatcher.wait_for_line_at(
                0,
                &format!("processor p{n} connected"),
                START_TIMEOUT,
            )?;
            processors_back_after =
                processors_back_after.max(at.saturating_duration_since(listening_at));
        }
        Ok(DispatcherRestart { listening_at, processors_back_after })
    }

    /// The cluster view: the output of `sipalias-dispatcher status --config F`.
    pub fn status(&self) -> Result<String> {
        self.run_cli(binary::DISPATCHER, &["status"])
    }

    /// The sources the dispatcher drops: the output of `sipalias-dispatcher bans`.
    pub fn bans(&self) -> Result<String> {
        self.run_cli(binary::DISPATCHER, &["bans"])
    }

    /// Lifts a ban: the output of `sipalias-dispatcher bans lift SOURCE`.
    pub fn lift_ban(&self, source: &str) -> Result<String> {
        self.run_cli(binary::DISPATCHER, &["bans", "lift", source])
    }

    /// The second dispatcher's view: `sipalias-dispatcher status --grpc http://<d2 edge>`.
    pub fn second_dispatcher_status(&self) -> Result<String> {
        let d2 = self.second.as_ref().context("the cluster has no second dispatcher")?;
        self.run_cli(binary::DISPATCHER, &["status", "--grpc", &format!("http://{}", d2.grpc)])
    }

    fn spawn_processor(&self, n: usize) -> Result<Process> {
        let mut cmd = service_command(binary::PROCESSOR, &self.config, &[])?;
        cmd.env("SIPALIAS_PROCESSOR__ID", format!("p{n}"));
        if self.options.metrics {
            let addr = SocketAddr::from((MAIN_IP, ports::free_tcp_port(MAIN_IP)?));
            cmd.env("SIPALIAS_PROCESSOR__METRICS_LISTEN", addr.to_string());
            self.ops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(service_key(Service::Processor(n)), addr);
        }
        Process::spawn(&format!("p{n}"), cmd)
    }

    /// The operations listener of `service` (`/metrics`, `/healthz`, `/readyz`); needs
    /// [`ClusterOptions::metrics`].
    pub fn ops_addr(&self, service: Service) -> Result<SocketAddr> {
        let map = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&service_key(service)).copied().with_context(|| {
            format!("no operations listener for {service:?} (ClusterOptions::metrics)")
        })
    }

    // ----- billing ------------------------------------------------------------------------

    /// Creates `user@sip.example.net` with credentials for the domain and both alias realms
    /// (and the second dispatcher's alias realm when it runs one).
    pub fn add_account(&self, user: &str, password: &str) -> Result<()> {
        self.add_account_with(user, password, &[])
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
        if self.options.second_dispatcher {
            args.extend_from_slice(&["--realm", D2_ALIAS_REALM]);
        }
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
        self.run_cli(binary::BILLING, args)
    }

    /// `sipalias-processor --config <the cluster's file> ARGS…` (an operator command); its
    /// stdout, or an error with its output when it fails.
    pub fn processor_cli(&self, args: &[&str]) -> Result<String> {
        self.run_cli(binary::PROCESSOR, args)
    }

    /// Runs `sipalias-dispatcher --config F ARGS…` (an operator command such as `sockets
    /// --json`) and returns its standard output; fails if it exits non-zero.
    pub fn dispatcher_cli(&self, args: &[&str]) -> Result<String> {
        self.run_cli(binary::DISPATCHER, args)
    }

    /// Runs `BIN --config F ARGS…` to completion and returns its stdout; fails with its
    /// output if it exits unsuccessfully.
    fn run_cli(&self, bin: &str, args: &[&str]) -> Result<String> {
        let stamp = format!("{:x}", rand::random::<u32>());
        let out_path = self.dir.path().join(format!("cli-{stamp}.out"));
        let err_path = self.dir.path().join(format!("cli-{stamp}.err"));
        let mut cmd = service_command(bin, &self.config, args)?;
        cmd.stdin(Stdio::null()).stdout(File::create(&out_path)?).stderr(File::create(&err_path)?);
        let mut child = cmd.spawn().with_context(|| format!("running {bin} {args:?}"))?;
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{bin} {args:?} did not finish within {CLI_TIMEOUT:?}");
            }
            // Polling the child for exit: std has no wait-with-timeout.
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = std::fs::read_to_string(&out_path)?;
        let stderr = std::fs::read_to_string(&err_path)?;
        if !status.success() {
            bail!("{bin} {args:?} failed ({status}):\n{stdout}{stderr}");
        }
        Ok(stdout)
    }

    // ----- redis --------------------------------------------------------------------------

    /// Stops redis-server (an outage); the services keep running.
    pub fn stop_redis(&mut self) -> Result<()> {
        self.redis.stop()
    }

    /// Starts redis-server again after [`Cluster::stop_redis`], on the same socket and
    /// directory, and waits until it answers (with persistence: has loaded its data).
    pub fn start_redis(&mut self) -> Result<()> {
        self.redis.start_again()
    }

    /// Stops redis-server and starts it again on the same socket and directory. Only with
    /// [`ClusterOptions::redis_persistence`] does its data survive.
    pub fn restart_redis(&mut self) -> Result<()> {
        self.redis.restart()
    }

    /// The Redis keys matching a glob `pattern` (prefix included, e.g. `e2e:dlg:*`), sorted.
    pub fn redis_keys(&self, pattern: &str) -> Result<Vec<String>> {
        let mut con = self.redis.client()?;
        let mut keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut con)?;
        keys.sort();
        Ok(keys)
    }

    /// Billing's reference of an answered call (minted by the processor, see
    /// `docs/security.md`), read from the dialog index in Redis by the Call-ID of either leg;
    /// waits up to `timeout` for the call to be stored.
    pub fn call_ref_of(&self, call_id: &str, timeout: Duration) -> Result<String> {
        let key = format!("{KEY_PREFIX}dlgleg:{{{call_id}}}");
        crate::wait::until(&format!("the call {call_id} to be stored"), timeout, || {
            let mut con = self.redis.client()?;
            let found: Option<String> = redis::cmd("GET").arg(&key).query(&mut con)?;
            Ok(found)
        })
    }

    /// The Redis key of an answered call, by its `call_ref`.
    pub fn dialog_key(call_ref: &str) -> String {
        format!("{KEY_PREFIX}dlg:{{{call_ref}}}")
    }

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

/// Every socket the dispatcher of a cluster listens on: (transport, ip, port).
fn listening_sockets(
    sip_port: u16,
    extra_port: u16,
    streams: &StreamPorts,
    tls: bool,
) -> Vec<(&'static str, Ipv4Addr, u16)> {
    let mut sockets = vec![
        ("udp", MAIN_IP, sip_port),
        ("udp", ALIAS2_IP, sip_port),
        ("udp", ALIAS3_IP, sip_port),
        ("udp", ALIAS3_IP, extra_port),
        ("tcp", MAIN_IP, sip_port),
        ("tcp", ALIAS2_IP, sip_port),
        ("tcp", ALIAS3_IP, sip_port),
        ("tcp", ALIAS3_IP, streams.extra_tcp),
    ];
    if tls {
        sockets.extend([
            ("tls", MAIN_IP, streams.tls),
            ("tls", ALIAS3_IP, streams.tls),
            ("tls", ALIAS3_IP, streams.extra_tls),
        ]);
    }
    sockets
}

/// Every socket the second dispatcher listens on: UDP and TCP `sip_port` on both its IPs.
fn second_dispatcher_sockets(sip_port: u16) -> Vec<(&'static str, Ipv4Addr, u16)> {
    vec![
        ("udp", D2_MAIN_IP, sip_port),
        ("udp", D2_ALIAS_IP, sip_port),
        ("tcp", D2_MAIN_IP, sip_port),
        ("tcp", D2_ALIAS_IP, sip_port),
    ]
}

/// The second dispatcher's own file: a `[dispatcher]` table (all it reads) with id `d2`, its
/// edge, and its own main IP (the cluster's domain) and alias.
fn second_dispatcher_toml(grpc: SocketAddr, sip_port: u16) -> String {
    format!(
        r#"# Written by the sipalias end-to-end harness: the second dispatcher.
[dispatcher]
id = "d2"
grpc_listen = "{grpc}"
retry_after_secs = 5
link_secret = "{LINK_SECRET}"

[dispatcher.main]
ip = "{D2_MAIN_IP}"
domain = "{DOMAIN}"
udp_port = {sip_port}
tcp_port = {sip_port}

[[dispatcher.aliases]]
ip = "{D2_ALIAS_IP}"
domain = "{DOMAIN}"
realm = "{D2_ALIAS_REALM}"
udp_port = {sip_port}
tcp_port = {sip_port}
"#
    )
}

/// Waits until a (new) dispatcher's edge and every SIP socket listen; returns when it logged
/// its edge as listening.
fn wait_dispatcher_listening(
    dispatcher: &Process,
    sockets: &[(&'static str, Ipv4Addr, u16)],
) -> Result<Instant> {
    let (edge, _) = dispatcher.wait_for_line_at(0, "edge grpc listening on", START_TIMEOUT)?;
    for (transport, ip, port) in sockets {
        dispatcher
            .wait_for_line(&format!("sip {transport} listening on {ip}:{port}"), START_TIMEOUT)?;
    }
    Ok(edge)
}

/// The values that differ between clusters.
struct ConfigValues<'a> {
    grpc: SocketAddr,
    /// The second dispatcher's edge, which processors dial too.
    second_grpc: Option<SocketAddr>,
    billing: SocketAddr,
    redis_url: &'a str,
    sip_port: u16,
    extra_port: u16,
    streams: &'a StreamPorts,
    certs: Option<&'a Certificates>,
    t1_ms: Option<u64>,
    keepalive_interval_secs: u32,
    processor_toml: &'a str,
    alias3_toml: &'a str,
    dispatcher_toml: &'a str,
}

/// The one TOML file all three binaries read (layout of `deploy/local.toml`).
fn config_toml(v: &ConfigValues<'_>) -> String {
    let ConfigValues {
        grpc,
        second_grpc,
        billing,
        redis_url,
        sip_port,
        extra_port,
        streams,
        certs,
        t1_ms,
        keepalive_interval_secs,
        processor_toml,
        alias3_toml,
        dispatcher_toml,
    } = v;
    let t1 = t1_ms.map(|t| format!("t1_ms = {t}\n")).unwrap_or_default();
    let dispatchers = std::iter::once(grpc)
        .chain(second_grpc)
        .map(|g| format!("\"http://{g}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let StreamPorts { tls, extra_tcp, extra_tls } = streams;
    // TOML basic strings: a temporary directory's path has no quote or backslash.
    let tls_of = |c: &CertFiles| {
        format!(
            "tls_port = {tls}\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        )
    };
    let (main_tls, alias3_tls) = match certs {
        Some(c) => {
            (tls_of(&c.main), format!("{}extra_tls_ports = [{extra_tls}]\n", tls_of(&c.alias3)))
        }
        None => (String::new(), String::new()),
    };
    format!(
        r#"# Written by the sipalias end-to-end harness.
[dispatcher]
id = "d1"
grpc_listen = "{grpc}"
retry_after_secs = 5
link_secret = "{LINK_SECRET}"
{dispatcher_toml}

[dispatcher.main]
ip = "{MAIN_IP}"
domain = "{DOMAIN}"
udp_port = {sip_port}
tcp_port = {sip_port}
{main_tls}
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
extra_tcp_ports = [{extra_tcp}]
{alias3_toml}
{alias3_tls}
[processor]
id = "p1"
dispatchers = [{dispatchers}]
billing_url = "http://{billing}"
redis_url = "{redis_url}"
key_prefix = "{KEY_PREFIX}"
auth_secret = "e2e-shared-secret"
link_secret = "{LINK_SECRET}"
keepalive_interval_secs = {keepalive_interval_secs}
{t1}{processor_toml}

[billing]
listen = "{billing}"
redis_url = "{redis_url}"
key_prefix = "{KEY_PREFIX}"
link_secret = "{LINK_SECRET}"
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
            second_grpc: None,
            billing: SocketAddr::from((MAIN_IP, 7080)),
            redis_url: "redis+unix:///tmp/x/redis.sock",
            sip_port: 15060,
            extra_port: 15080,
            streams: &StreamPorts { tls: 15061, extra_tcp: 15090, extra_tls: 15091 },
            certs: None,
            t1_ms: Some(50),
            keepalive_interval_secs: 0,
            processor_toml: "",
            alias3_toml: "",
            dispatcher_toml: "max_connections_per_ip = 5",
        };
        let toml = config_toml(&v);
        assert!(toml.contains("extra_udp_ports = [15080]"));
        assert!(toml.contains("extra_tcp_ports = [15090]"));
        assert!(toml.contains("t1_ms = 50\n"));
        assert!(toml.contains("dispatchers = [\"http://127.0.0.1:7070\"]"));
        assert!(
            toml.contains(
                "link_secret = \"e2e-cluster-link-secret\"\nmax_connections_per_ip = 5\n"
            )
        );
        assert!(!toml.contains("tls"), "no TLS without certificates:\n{toml}");
        assert!(!config_toml(&ConfigValues { t1_ms: None, ..v }).contains("t1_ms"));
    }

    #[test]
    fn processors_list_both_dispatchers_and_the_second_has_its_own_ips() {
        let toml = config_toml(&ConfigValues {
            grpc: SocketAddr::from((MAIN_IP, 7070)),
            second_grpc: Some(SocketAddr::from((MAIN_IP, 7071))),
            billing: SocketAddr::from((MAIN_IP, 7080)),
            redis_url: "redis+unix:///tmp/x/redis.sock",
            sip_port: 15060,
            extra_port: 15080,
            streams: &StreamPorts { tls: 15061, extra_tcp: 15090, extra_tls: 15091 },
            certs: None,
            t1_ms: None,
            keepalive_interval_secs: 0,
            processor_toml: "",
            alias3_toml: "",
            dispatcher_toml: "",
        });
        assert!(
            toml.contains("dispatchers = [\"http://127.0.0.1:7070\", \"http://127.0.0.1:7071\"]"),
            "{toml}"
        );
        let d2 = second_dispatcher_toml(SocketAddr::from((MAIN_IP, 7071)), 15070);
        assert!(d2.contains("id = \"d2\"\ngrpc_listen = \"127.0.0.1:7071\""), "{d2}");
        assert!(d2.contains("ip = \"127.0.0.4\"\ndomain = \"sip.example.net\""), "{d2}");
        assert!(
            d2.contains(&format!(
                "ip = \"127.0.0.5\"\ndomain = \"{DOMAIN}\"\nrealm = \"{D2_ALIAS_REALM}\""
            )),
            "{d2}"
        );
        assert_eq!(d2.matches("udp_port = 15070").count(), 2, "{d2}");
        assert!(!d2.contains("[processor]") && !d2.contains("tls"), "{d2}");
    }

    #[test]
    fn config_gives_main_and_second_alias_their_own_certificate() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let certs = Certificates {
            main: CertFiles::create(dir.path(), "main", MAIN_IP.into(), MAIN_CERT_SUBJECT)?,
            alias3: CertFiles::create(dir.path(), "a3", ALIAS3_IP.into(), ALIAS3_CERT_SUBJECT)?,
        };
        let toml = config_toml(&ConfigValues {
            grpc: SocketAddr::from((MAIN_IP, 7070)),
            second_grpc: None,
            billing: SocketAddr::from((MAIN_IP, 7080)),
            redis_url: "redis+unix:///tmp/x/redis.sock",
            sip_port: 15060,
            extra_port: 15080,
            streams: &StreamPorts { tls: 15061, extra_tcp: 15090, extra_tls: 15091 },
            certs: Some(&certs),
            t1_ms: None,
            keepalive_interval_secs: 0,
            processor_toml: "",
            alias3_toml: "",
            dispatcher_toml: "",
        });
        let main = format!("tls_cert = \"{}\"", certs.main.cert.display());
        let alias3 = format!("tls_cert = \"{}\"", certs.alias3.cert.display());
        assert_eq!(toml.matches("tls_port = 15061").count(), 2, "{toml}");
        assert!(toml.contains(&main) && toml.contains(&alias3), "{toml}");
        assert!(toml.contains("extra_tls_ports = [15091]"), "{toml}");
        // 127.0.0.2 has no TLS: its table ends before the second alias's.
        let alias2 = toml.split("[[dispatcher.aliases]]").nth(1).unwrap_or_default();
        assert!(!alias2.contains("tls"), "{alias2}");
        Ok(())
    }
}
