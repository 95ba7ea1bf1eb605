//! Dispatcher configuration: built-in defaults, then the `[dispatcher]` table of the cluster's
//! TOML file, then `SIPALIAS_DISPATCHER__*` environment variables.
//!
//! The cluster shares one TOML file between services, so only the `[dispatcher]` table is read;
//! `[processor]`, `[billing]` and anything else belong to others and are ignored. Inside
//! `[dispatcher]` unknown keys are rejected: a misspelt key silently falling back to its default
//! is worse than refusing to start.
//!
//! Everything is validated here, before any socket is bound, and every error names the key as
//! the operator wrote it, e.g. `dispatcher.aliases[1].ip: "10.0.0.x" is not an IP address`.
//! (Certificate files are read by [`crate::tls`] at start-up, also before binding, and their
//! errors name `tls_cert` / `tls_key` the same way.)

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use sipalias_proto::edge::{LocalSocket, Transport};
use sipmsg::net::Net;
use sipmsg::scan::is_valid_node_id;

use crate::error::Error;
use crate::wire::transport_name;

/// The TOML table this crate reads.
const TABLE: &str = "dispatcher";
/// Prefix of environment overrides; `__` separates table and keys, as in
/// `SIPALIAS_DISPATCHER__ID=d2` or `SIPALIAS_DISPATCHER__MAIN__IP=10.0.0.1`.
const ENV_PREFIX: &str = "SIPALIAS_";

fn default_log_level() -> String {
    sipalias_startup::DEFAULT_LOG_LEVEL.to_owned()
}

/// Default of `dispatcher.grpc_listen`.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7070";
/// Default of `dispatcher.retry_after_secs`.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 5;
/// Default of `dispatcher.queue_depth`.
pub const DEFAULT_QUEUE_DEPTH: usize = 4096;
/// Default of `dispatcher.heartbeat_timeout_secs`: three of the processors' 2 s heartbeats.
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: u64 = 6;
/// Largest accepted `dispatcher.heartbeat_timeout_secs` (a day): a processor silent longer is
/// certainly gone, and the bound keeps deadline arithmetic far from overflow.
pub const MAX_HEARTBEAT_TIMEOUT_SECS: u64 = 86_400;
/// Default SIP UDP port of the main IP and of each alias.
pub const DEFAULT_UDP_PORT: u16 = 5060;
/// Default SIP TCP port of the main IP and of each alias.
pub const DEFAULT_TCP_PORT: u16 = 5060;
/// Default SIP TLS port of the main IP and of each alias (RFC 3261 §19.1.2).
pub const DEFAULT_TLS_PORT: u16 = 5061;
/// Default of `dispatcher.max_message_size`: the largest message framed on a stream.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_535;
/// Smallest accepted `dispatcher.max_message_size`: below this ordinary INVITEs with SDP fail.
pub const MIN_MAX_MESSAGE_SIZE: usize = 1024;
/// Default of `dispatcher.tcp_idle_timeout_secs`. Registered phones keep their connection
/// open for hours and ping it with CRLF (RFC 5626), so this is long.
pub const DEFAULT_TCP_IDLE_TIMEOUT_SECS: u64 = 3600;
/// Default of `dispatcher.tcp_message_timeout_secs`.
pub const DEFAULT_TCP_MESSAGE_TIMEOUT_SECS: u64 = 10;
/// Default of `dispatcher.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of `dispatcher.max_connections_per_ip`.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 100;
/// Default of `dispatcher.tls_reload_secs`.
pub const DEFAULT_TLS_RELOAD_SECS: u64 = 5;
/// Default of `dispatcher.socket_drain_secs`: long enough for the calls of a busy hour's
/// usual length to end through a removed alias, short enough that it is soon truly gone.
pub const DEFAULT_SOCKET_DRAIN_SECS: u64 = 300;
/// Longest `dispatcher.socket_drain_secs` accepted: a day.
pub const MAX_SOCKET_DRAIN_SECS: u64 = 86_400;

/// Default of `dispatcher.source_rate_limit`: messages a second from one source. A phone sends
/// a few a minute, an office of a hundred behind one NAT a few a second; floods and password
/// guessers send thousands.
pub const DEFAULT_SOURCE_RATE_LIMIT: u32 = 500;
/// Default of `dispatcher.max_outbound_connections`.
pub const DEFAULT_MAX_OUTBOUND_CONNECTIONS: usize = 2_000;
/// Default of `dispatcher.source_rate_ban_secs`.
pub const DEFAULT_SOURCE_RATE_BAN_SECS: u64 = 60;
/// Longest `dispatcher.source_rate_ban_secs` accepted: a day.
pub const MAX_SOURCE_RATE_BAN_SECS: u64 = 86_400;
/// The validated `[dispatcher]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatcherConfig {
    /// Cluster-unique dispatcher id (`dispatcher.id`, required): 1–32 of `[A-Za-z0-9-]`.
    /// Processors record it in every binding made through this dispatcher.
    pub id: String,
    /// Where processors dial in (`dispatcher.grpc_listen`, default `127.0.0.1:7070`).
    pub grpc_listen: SocketAddr,
    /// `Retry-After` of the dispatcher's own `503` when no processor can take a request
    /// (`dispatcher.retry_after_secs`, default 5).
    pub retry_after_secs: u32,
    /// Messages queued per processor before the dispatcher answers `503` itself
    /// (`dispatcher.queue_depth`, default 4096).
    pub queue_depth: usize,
    /// A processor from which nothing (no heartbeat, no send) has arrived for this long is
    /// removed from routing and its link ended (`dispatcher.heartbeat_timeout_secs`, default
    /// 6; processors send a heartbeat every 2 s).
    pub heartbeat_timeout: Duration,
    /// TCP and TLS connections (the `dispatcher.*` stream keys).
    pub streams: StreamLimits,
    /// The main (virtual) IP (`dispatcher.main`, required).
    pub main: IpConfig,
    /// IP aliases: old providers' server addresses routed to us (`dispatcher.aliases`).
    pub aliases: Vec<IpConfig>,
    /// Runtime threads (`dispatcher.worker_threads`, default 0 = one per core). 1 runs on one
    /// thread, which costs the least CPU per message where the dispatcher shares a small host
    /// with processors (measured in docs/benchmarks.md).
    pub worker_threads: usize,
    /// The cluster's shared secret (`dispatcher.link_secret`): every processor linking in and
    /// every `status` call must present it ([`sipalias_proto::link_auth`]). Required unless
    /// `grpc_listen` is a loopback address.
    pub link_secret: String,
    /// The edge guard: rate limit, bans, scanners, admission (the `dispatcher.*` guard keys).
    pub guard: crate::guard::GuardConfig,
    /// Networks never sent to (`dispatcher.destination_deny_networks`, default unspecified,
    /// multicast, broadcast, link-local), each with its text as configured.
    pub destination_deny_networks: Vec<(String, Net)>,
    /// The operations listener (`/metrics`, `/healthz`, `/readyz`; `dispatcher.metrics_listen`,
    /// default empty = none). Meant for a private address: it has no authentication.
    pub metrics_listen: Option<SocketAddr>,
    /// `text` (default) or `json` log lines (`dispatcher.log_format`).
    pub log_format: sipalias_startup::LogFormat,
    /// Log filter (`dispatcher.log_level`, `RUST_LOG` syntax, default `info`); `RUST_LOG`
    /// overrides it at start, and SIGHUP re-reads it from the file.
    pub log_level: String,
    /// How long a socket removed from the configuration at runtime (SIGHUP) keeps serving
    /// what is under way before it is closed (`dispatcher.socket_drain_secs`, default 300):
    /// a UDP socket for exactly this long, a TCP or TLS socket until its last connection has
    /// closed or this has passed. It accepts no new connection meanwhile.
    pub socket_drain: Duration,
}

/// Limits and timeouts of TCP and TLS connections, and outbound TLS; top-level keys of
/// `[dispatcher]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLimits {
    /// Largest message accepted on a stream, head and body (`max_message_size`, default
    /// 65,535). A bigger one is answered `513 Message Too Large` and the connection closed.
    pub max_message_size: usize,
    /// A connection that receives nothing (not even a CRLF keepalive) for this long is closed
    /// (`tcp_idle_timeout_secs`, default 3600).
    pub idle_timeout: Duration,
    /// A message that has started to arrive must be complete within this; also the limit for
    /// a TLS handshake, an outbound connect and one write (`tcp_message_timeout_secs`,
    /// default 10).
    pub message_timeout: Duration,
    /// Connections accepted from phones and open at once (`max_connections`, default 10,000).
    pub max_connections: usize,
    /// Connections the dispatcher opened toward phones and open at once
    /// (`max_outbound_connections`, default 2,000): a budget of their own, so sends toward
    /// unreachable or hostile Contacts cannot use up the room real phones connect into.
    pub max_outbound_connections: usize,
    /// Accepted connections from one source IP (`max_connections_per_ip`, default 100).
    pub max_connections_per_ip: usize,
    /// How often certificate and key files are checked for changes (`tls_reload_secs`,
    /// default 5).
    pub tls_reload: Duration,
    /// Whether outbound TLS connections to phones verify the phone's certificate against
    /// `tls_ca_file` and its IP (`tls_verify_peer`, default false: phones mostly have
    /// self-signed certificates).
    pub tls_verify_peer: bool,
    /// PEM bundle of the certificate authorities phones' certificates are checked against
    /// (`tls_ca_file`, required when `tls_verify_peer` is true).
    pub tls_ca_file: Option<PathBuf>,
}

/// One local IP the cluster answers SIP on: the main IP or an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The IP address (`ip`, required). A wildcard (`0.0.0.0`, `::`) is refused: a response
    /// must leave from the exact IP its request came in on.
    pub ip: IpAddr,
    /// Canonical SIP domain of the users reached through this IP (`domain`, required).
    pub domain: String,
    /// Digest realm the phones behind this IP expect (`realm`, defaults to `domain`).
    pub realm: String,
    /// Digest algorithms challenged and accepted on this IP, most preferred first
    /// (`digest_algorithms`: `MD5`, `SHA-256`; default empty = the processors'
    /// `digest_algorithms`). Phones behind an old provider's IP expect what that provider sent.
    pub digest_algorithms: Vec<String>,
    /// The transports this IP listens on (`transports`, default UDP and TCP, plus TLS when
    /// `tls_cert` is set), in the order UDP, TCP, TLS.
    pub transports: Vec<Transport>,
    /// Standard SIP UDP port (`udp_port`, default 5060).
    pub udp_port: u16,
    /// Additional UDP ports, for networks where the standard one is blocked
    /// (`extra_udp_ports`, default none).
    pub extra_udp_ports: Vec<u16>,
    /// Standard SIP TCP port (`tcp_port`, default 5060).
    pub tcp_port: u16,
    /// Additional TCP ports (`extra_tcp_ports`, default none).
    pub extra_tcp_ports: Vec<u16>,
    /// Standard SIP TLS port (`tls_port`, default 5061); used only when TLS is on.
    pub tls_port: u16,
    /// Additional TLS ports (`extra_tls_ports`, default none).
    pub extra_tls_ports: Vec<u16>,
    /// PEM certificate chain presented on this IP's TLS ports (`tls_cert`). TLS listeners on
    /// an IP exist only when it has a certificate.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (`tls_key`, required with `tls_cert`).
    pub tls_key: Option<PathBuf>,
}

impl IpConfig {
    /// Whether this IP listens on `transport`.
    pub fn serves(&self, transport: Transport) -> bool {
        self.transports.contains(&transport)
    }
}

/// One row of the socket table, with the key that configured it (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketEntry {
    pub(crate) addr: SocketAddr,
    pub(crate) transport: Transport,
    pub(crate) alias: bool,
    pub(crate) domain: String,
    pub(crate) realm: String,
    pub(crate) digest_algorithms: Vec<String>,
    pub(crate) key: String,
}

impl SocketEntry {
    /// The entry as `Welcome` announces it.
    pub(crate) fn local_socket(&self) -> LocalSocket {
        LocalSocket {
            ip: self.addr.ip().to_string(),
            port: u32::from(self.addr.port()),
            transport: self.transport.into(),
            alias: self.alias,
            domain: self.domain.clone(),
            realm: self.realm.clone(),
            digest_algorithms: self.digest_algorithms.clone(),
        }
    }
}

impl DispatcherConfig {
    /// Loads the configuration: defaults, then the `[dispatcher]` table of the TOML file at
    /// `path` (which must exist when given), then `SIPALIAS_DISPATCHER__<KEY>` environment
    /// variables (`__` also separates nested keys). The result is validated.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let mut sources = Figment::new();
        if let Some(path) = path {
            // `file_exact`: a named file that is missing is an error, not an empty config.
            sources = sources.merge(Toml::file_exact(path));
        }
        Self::extract(sources.merge(Env::prefixed(ENV_PREFIX).split("__")))
    }

    /// Parses the `[dispatcher]` table of a TOML document over the defaults, without looking
    /// at the environment. The result is validated.
    pub fn from_toml_str(toml: &str) -> Result<Self, Error> {
        Self::extract(Figment::from(Toml::string(toml)))
    }

    fn extract(sources: Figment) -> Result<Self, Error> {
        // Defaults are serde defaults on `RawConfig`, so they sit under the file and the env.
        let raw: RawConfig = sources.focus(TABLE).extract().map_err(describe)?;
        let config = raw.resolve()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: node id, limits, domains, ports, wildcard IPs, TLS key
    /// pairs, and that no IP or socket is configured twice. [`run`](crate::run) calls it
    /// again, so a hand-built configuration is held to the same rules.
    pub fn validate(&self) -> Result<(), Error> {
        if !is_valid_node_id(&self.id) {
            return Err(key_error(
                "id",
                format!("{:?} is not a valid node id (1–32 characters of A-Z a-z 0-9 -)", self.id),
            ));
        }
        if self.queue_depth == 0 {
            return Err(key_error("queue_depth", "must be at least 1"));
        }
        if self.heartbeat_timeout < Duration::from_secs(1) {
            return Err(key_error("heartbeat_timeout_secs", "must be at least 1"));
        }
        if self.heartbeat_timeout > Duration::from_secs(MAX_HEARTBEAT_TIMEOUT_SECS) {
            return Err(key_error(
                "heartbeat_timeout_secs",
                format!("must be at most {MAX_HEARTBEAT_TIMEOUT_SECS}"),
            ));
        }
        sipalias_proto::link_auth::validate(&self.link_secret)
            .map_err(|why| key_error("link_secret", why))?;
        if self.link_secret.is_empty() && !self.grpc_listen.ip().is_loopback() {
            return Err(key_error(
                "link_secret",
                format!(
                    "required when grpc_listen ({}) is not a loopback address: without it anyone \
                     who reaches that port could link as a processor",
                    self.grpc_listen
                ),
            ));
        }
        let ban = self.guard.source_rate_ban.as_secs();
        if ban == 0 || ban > MAX_SOURCE_RATE_BAN_SECS {
            return Err(key_error(
                "source_rate_ban_secs",
                format!("must be between 1 and {MAX_SOURCE_RATE_BAN_SECS}"),
            ));
        }
        for (i, ua) in self.guard.scanner_user_agents.iter().enumerate() {
            if ua.trim().is_empty() || ua.chars().any(char::is_control) {
                return Err(key_error(
                    &format!("scanner_user_agents[{i}]"),
                    format!("{ua:?} must be non-empty, without control characters"),
                ));
            }
        }
        let drain = self.socket_drain.as_secs();
        if drain == 0 || drain > MAX_SOCKET_DRAIN_SECS {
            return Err(key_error(
                "socket_drain_secs",
                format!("must be between 1 and {MAX_SOCKET_DRAIN_SECS}"),
            ));
        }
        self.streams.validate()?;
        let mut ips: HashMap<IpAddr, String> = HashMap::new();
        for (key, site) in self.sites() {
            if site.ip.is_unspecified() || site.ip.is_multicast() {
                return Err(key_error(
                    &format!("{key}.ip"),
                    format!("{} is not a unicast address phones can send to", site.ip),
                ));
            }
            if let Some(first) = ips.insert(site.ip, format!("{TABLE}.{key}.ip")) {
                return Err(key_error(
                    &format!("{key}.ip"),
                    format!(
                        "{} is already configured by {first}; list more ports of one IP in \
                         its extra_udp_ports, extra_tcp_ports or extra_tls_ports",
                        site.ip
                    ),
                ));
            }
            check_name(&format!("{key}.domain"), &site.domain)?;
            check_name(&format!("{key}.realm"), &site.realm)?;
            check_algorithms(&format!("{key}.digest_algorithms"), &site.digest_algorithms)?;
            site.validate_transports(&key)?;
        }
        // UDP has its own port space; TCP and TLS share one (both are TCP listeners).
        let mut seen: HashMap<(SocketAddr, bool), String> = HashMap::new();
        for entry in self.socket_entries() {
            if entry.addr.port() == 0 {
                return Err(key_error(&entry.key, "port 0 is not a port phones can send to"));
            }
            let space = (entry.addr, entry.transport == Transport::Udp);
            if let Some(first) = seen.insert(space, format!("{TABLE}.{}", entry.key)) {
                return Err(key_error(
                    &entry.key,
                    format!(
                        "socket {}/{} is already configured by {first}",
                        entry.addr,
                        transport_name(entry.transport)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The socket table: every (IP, port, transport) the dispatcher listens on, main IP first,
    /// then each alias in order; for each IP its `udp_port`, `extra_udp_ports`, `tcp_port`,
    /// `extra_tcp_ports`, `tls_port`, `extra_tls_ports` (each transport only if the IP serves
    /// it). This is what a processor receives in `Welcome`.
    pub fn sockets(&self) -> Vec<LocalSocket> {
        self.socket_entries().iter().map(SocketEntry::local_socket).collect()
    }

    /// The UDP addresses to bind, in socket-table order.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Transport::Udp)
    }

    /// The addresses of the TCP listeners carrying plain SIP over TCP, in socket-table order.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Transport::Tcp)
    }

    /// The addresses of the TCP listeners carrying SIP over TLS, in socket-table order.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Transport::Tls)
    }

    fn addrs(&self, transport: Transport) -> Vec<SocketAddr> {
        self.socket_entries()
            .into_iter()
            .filter(|e| e.transport == transport)
            .map(|e| e.addr)
            .collect()
    }

    pub(crate) fn socket_entries(&self) -> Vec<SocketEntry> {
        let mut out = Vec::new();
        for (key, site) in self.sites() {
            let alias = key != "main";
            let groups = [
                (Transport::Udp, "udp", site.udp_port, &site.extra_udp_ports),
                (Transport::Tcp, "tcp", site.tcp_port, &site.extra_tcp_ports),
                (Transport::Tls, "tls", site.tls_port, &site.extra_tls_ports),
            ];
            for (transport, name, port, extra) in groups {
                if !site.serves(transport) {
                    continue;
                }
                let ports = std::iter::once((format!("{key}.{name}_port"), port)).chain(
                    extra
                        .iter()
                        .enumerate()
                        .map(|(i, p)| (format!("{key}.extra_{name}_ports[{i}]"), *p)),
                );
                for (key, port) in ports {
                    out.push(SocketEntry {
                        addr: SocketAddr::new(site.ip, port),
                        transport,
                        alias,
                        domain: site.domain.clone(),
                        realm: site.realm.clone(),
                        digest_algorithms: site.digest_algorithms.clone(),
                        key,
                    });
                }
            }
        }
        out
    }

    /// The main IP and every alias, each with its key relative to the table.
    pub(crate) fn sites(&self) -> impl Iterator<Item = (String, &IpConfig)> {
        std::iter::once(("main".to_owned(), &self.main))
            .chain(self.aliases.iter().enumerate().map(|(i, a)| (format!("aliases[{i}]"), a)))
    }
}

impl StreamLimits {
    fn validate(&self) -> Result<(), Error> {
        if self.max_message_size < MIN_MAX_MESSAGE_SIZE {
            return Err(key_error(
                "max_message_size",
                format!("must be at least {MIN_MAX_MESSAGE_SIZE}"),
            ));
        }
        for (key, value) in [
            ("tcp_idle_timeout_secs", self.idle_timeout),
            ("tcp_message_timeout_secs", self.message_timeout),
            ("tls_reload_secs", self.tls_reload),
        ] {
            if value.is_zero() {
                return Err(key_error(key, "must be at least 1"));
            }
        }
        if self.max_connections == 0 {
            return Err(key_error("max_connections", "must be at least 1"));
        }
        if self.max_connections_per_ip == 0 {
            return Err(key_error("max_connections_per_ip", "must be at least 1"));
        }
        if self.max_outbound_connections == 0 {
            return Err(key_error("max_outbound_connections", "must be at least 1"));
        }
        if self.tls_verify_peer && self.tls_ca_file.is_none() {
            return Err(key_error(
                "tls_ca_file",
                "required when tls_verify_peer is true (the authorities phones' certificates \
                 are checked against)",
            ));
        }
        Ok(())
    }
}

impl IpConfig {
    /// TLS needs a certificate and key; ports of a transport the IP does not serve are a
    /// mistake worth stopping for.
    fn validate_transports(&self, key: &str) -> Result<(), Error> {
        if self.transports.is_empty() {
            return Err(key_error(
                &format!("{key}.transports"),
                "must list at least one transport",
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(key_error(
                    &format!("{key}.tls_key"),
                    "missing: tls_cert needs its private key",
                ));
            }
            (None, Some(_)) => {
                return Err(key_error(
                    &format!("{key}.tls_cert"),
                    "missing: tls_key is set but not the certificate it belongs to",
                ));
            }
            _ => {}
        }
        let has_cert = self.tls_cert.is_some();
        if self.serves(Transport::Tls) && !has_cert {
            return Err(key_error(
                &format!("{key}.tls_cert"),
                "missing: transports lists tls, which needs tls_cert and tls_key",
            ));
        }
        if has_cert && !self.serves(Transport::Tls) {
            return Err(key_error(
                &format!("{key}.tls_cert"),
                "is set but transports does not list tls",
            ));
        }
        for (transport, name, extra) in [
            (Transport::Udp, "udp", &self.extra_udp_ports),
            (Transport::Tcp, "tcp", &self.extra_tcp_ports),
            (Transport::Tls, "tls", &self.extra_tls_ports),
        ] {
            if !extra.is_empty() && !self.serves(transport) {
                let why = if transport == Transport::Tls {
                    "TLS listeners need tls_cert and tls_key".to_owned()
                } else {
                    format!("transports does not list {name}")
                };
                return Err(key_error(&format!("{key}.extra_{name}_ports"), why));
            }
        }
        Ok(())
    }
}

/// Digest algorithm names of one IP: each `MD5` or `SHA-256` (any case), none twice.
fn check_algorithms(key: &str, names: &[String]) -> Result<(), Error> {
    let mut seen = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let Some(alg) = sipmsg::digest::Algorithm::parse(name) else {
            return Err(key_error(
                &format!("{key}[{i}]"),
                format!("{name:?} is not MD5 or SHA-256"),
            ));
        };
        if seen.contains(&alg) {
            return Err(key_error(&format!("{key}[{i}]"), format!("{name:?} is listed twice")));
        }
        seen.push(alg);
    }
    Ok(())
}

/// A domain or realm: not empty, no whitespace or control characters (it ends up in headers).
fn check_name(key: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(key_error(key, "must not be empty"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"') {
        return Err(key_error(
            key,
            format!("{value:?} must not contain whitespace, quotes or control characters"),
        ));
    }
    Ok(())
}

pub(crate) fn key_error(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{TABLE}.{key}: {msg}"))
}

/// The table as written. Addresses are strings so that a bad one is reported by us, with the
/// key and the value, rather than as serde's generic "invalid IP address syntax".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    id: NodeIdValue,
    #[serde(default = "default_grpc_listen")]
    grpc_listen: String,
    #[serde(default = "default_retry_after_secs")]
    retry_after_secs: u32,
    #[serde(default = "default_queue_depth")]
    queue_depth: usize,
    #[serde(default)]
    worker_threads: usize,
    #[serde(default)]
    link_secret: String,
    #[serde(default)]
    metrics_listen: String,
    #[serde(default)]
    log_format: sipalias_startup::LogFormat,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default = "default_source_rate_limit")]
    source_rate_limit: u32,
    #[serde(default = "default_source_rate_ban_secs")]
    source_rate_ban_secs: u64,
    #[serde(default)]
    rate_limit_exempt: Vec<String>,
    #[serde(default)]
    admission_rate: u32,
    #[serde(default = "default_scanner_user_agents")]
    scanner_user_agents: Vec<String>,
    #[serde(default = "default_destination_deny_networks")]
    destination_deny_networks: Vec<String>,
    #[serde(default = "default_max_outbound_connections")]
    max_outbound_connections: usize,
    #[serde(default = "default_heartbeat_timeout_secs")]
    heartbeat_timeout_secs: u64,
    #[serde(default = "default_max_message_size")]
    max_message_size: usize,
    #[serde(default = "default_tcp_idle_timeout_secs")]
    tcp_idle_timeout_secs: u64,
    #[serde(default = "default_tcp_message_timeout_secs")]
    tcp_message_timeout_secs: u64,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_connections_per_ip")]
    max_connections_per_ip: usize,
    #[serde(default = "default_tls_reload_secs")]
    tls_reload_secs: u64,
    #[serde(default = "default_socket_drain_secs")]
    socket_drain_secs: u64,
    #[serde(default)]
    tls_verify_peer: bool,
    tls_ca_file: Option<PathBuf>,
    main: RawIp,
    #[serde(default)]
    aliases: Vec<RawIp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIp {
    ip: String,
    domain: String,
    realm: Option<String>,
    #[serde(default)]
    digest_algorithms: Vec<String>,
    transports: Option<Vec<String>>,
    #[serde(default = "default_udp_port")]
    udp_port: u16,
    #[serde(default)]
    extra_udp_ports: Vec<u16>,
    #[serde(default = "default_tcp_port")]
    tcp_port: u16,
    #[serde(default)]
    extra_tcp_ports: Vec<u16>,
    #[serde(default = "default_tls_port")]
    tls_port: u16,
    #[serde(default)]
    extra_tls_ports: Vec<u16>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

/// A node id as written. An all-digit id given in the environment (`SIPALIAS_DISPATCHER__ID=7`)
/// arrives as a number, so numbers are accepted and turned back into text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NodeIdValue {
    Text(String),
    Number(u64),
}

fn default_source_rate_limit() -> u32 {
    DEFAULT_SOURCE_RATE_LIMIT
}
fn default_source_rate_ban_secs() -> u64 {
    DEFAULT_SOURCE_RATE_BAN_SECS
}
fn default_scanner_user_agents() -> Vec<String> {
    sipmsg::scan::KNOWN_SCANNERS.map(String::from).to_vec()
}
fn default_destination_deny_networks() -> Vec<String> {
    sipmsg::net::DEFAULT_DENY_NETWORKS.map(String::from).to_vec()
}
fn default_max_outbound_connections() -> usize {
    DEFAULT_MAX_OUTBOUND_CONNECTIONS
}
fn default_grpc_listen() -> String {
    DEFAULT_GRPC_LISTEN.to_owned()
}
fn default_retry_after_secs() -> u32 {
    DEFAULT_RETRY_AFTER_SECS
}
fn default_queue_depth() -> usize {
    DEFAULT_QUEUE_DEPTH
}
fn default_heartbeat_timeout_secs() -> u64 {
    DEFAULT_HEARTBEAT_TIMEOUT_SECS
}
fn default_udp_port() -> u16 {
    DEFAULT_UDP_PORT
}
fn default_tcp_port() -> u16 {
    DEFAULT_TCP_PORT
}
fn default_tls_port() -> u16 {
    DEFAULT_TLS_PORT
}
fn default_max_message_size() -> usize {
    DEFAULT_MAX_MESSAGE_SIZE
}
fn default_tcp_idle_timeout_secs() -> u64 {
    DEFAULT_TCP_IDLE_TIMEOUT_SECS
}
fn default_tcp_message_timeout_secs() -> u64 {
    DEFAULT_TCP_MESSAGE_TIMEOUT_SECS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_connections_per_ip() -> usize {
    DEFAULT_MAX_CONNECTIONS_PER_IP
}
fn default_tls_reload_secs() -> u64 {
    DEFAULT_TLS_RELOAD_SECS
}
fn default_socket_drain_secs() -> u64 {
    DEFAULT_SOCKET_DRAIN_SECS
}

impl RawConfig {
    fn resolve(self) -> Result<DispatcherConfig, Error> {
        let grpc_listen = self.grpc_listen.trim().parse().map_err(|_| {
            key_error(
                "grpc_listen",
                format!("{:?} is not a socket address (ip:port)", self.grpc_listen),
            )
        })?;
        let main = self.main.resolve("main")?;
        let aliases = self
            .aliases
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.resolve(&format!("aliases[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(DispatcherConfig {
            id: match self.id {
                NodeIdValue::Text(s) => s,
                NodeIdValue::Number(n) => n.to_string(),
            },
            grpc_listen,
            retry_after_secs: self.retry_after_secs,
            queue_depth: self.queue_depth,
            worker_threads: self.worker_threads,
            link_secret: self.link_secret,
            metrics_listen: sipalias_ops::parse_listen(&self.metrics_listen)
                .map_err(|why| key_error("metrics_listen", why))?,
            log_format: self.log_format,
            log_level: {
                sipalias_startup::check_log_level(&self.log_level)
                    .map_err(|why| key_error("log_level", why))?;
                self.log_level
            },
            guard: crate::guard::GuardConfig {
                source_rate_limit: self.source_rate_limit,
                source_rate_ban: Duration::from_secs(self.source_rate_ban_secs),
                rate_limit_exempt: self
                    .rate_limit_exempt
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        Net::parse(n.trim()).map_err(|why| {
                            key_error(&format!("rate_limit_exempt[{i}]"), format!("{n:?}: {why}"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
                admission_rate: self.admission_rate,
                scanner_user_agents: self
                    .scanner_user_agents
                    .iter()
                    .map(|s| s.to_ascii_lowercase())
                    .collect(),
            },
            destination_deny_networks: self
                .destination_deny_networks
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Net::parse(n.trim()).map(|net| (n.clone(), net)).map_err(|why| {
                        key_error(
                            &format!("destination_deny_networks[{i}]"),
                            format!("{n:?}: {why}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            heartbeat_timeout: Duration::from_secs(self.heartbeat_timeout_secs),
            socket_drain: Duration::from_secs(self.socket_drain_secs),
            streams: StreamLimits {
                max_message_size: self.max_message_size,
                idle_timeout: Duration::from_secs(self.tcp_idle_timeout_secs),
                message_timeout: Duration::from_secs(self.tcp_message_timeout_secs),
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                max_outbound_connections: self.max_outbound_connections,
                tls_reload: Duration::from_secs(self.tls_reload_secs),
                tls_verify_peer: self.tls_verify_peer,
                tls_ca_file: self.tls_ca_file,
            },
            main,
            aliases,
        })
    }
}

impl RawIp {
    fn resolve(self, key: &str) -> Result<IpConfig, Error> {
        let ip = self.ip.trim().parse().map_err(|_| {
            key_error(&format!("{key}.ip"), format!("{:?} is not an IP address", self.ip))
        })?;
        let transports = match self.transports {
            // The default: what every phone may expect; TLS only where there is a certificate,
            // so configurations written before TLS existed keep working unchanged.
            None => {
                let mut t = vec![Transport::Udp, Transport::Tcp];
                if self.tls_cert.is_some() {
                    t.push(Transport::Tls);
                }
                t
            }
            Some(names) => {
                let mut listed = Vec::new();
                for (i, name) in names.iter().enumerate() {
                    let transport = match name.trim().to_ascii_lowercase().as_str() {
                        "udp" => Transport::Udp,
                        "tcp" => Transport::Tcp,
                        "tls" => Transport::Tls,
                        _ => {
                            return Err(key_error(
                                &format!("{key}.transports[{i}]"),
                                format!("{name:?} is not one of udp, tcp, tls"),
                            ));
                        }
                    };
                    listed.push(transport);
                }
                [Transport::Udp, Transport::Tcp, Transport::Tls]
                    .into_iter()
                    .filter(|t| listed.contains(t))
                    .collect()
            }
        };
        Ok(IpConfig {
            ip,
            realm: self.realm.unwrap_or_else(|| self.domain.clone()),
            domain: self.domain,
            digest_algorithms: self.digest_algorithms,
            transports,
            udp_port: self.udp_port,
            extra_udp_ports: self.extra_udp_ports,
            tcp_port: self.tcp_port,
            extra_tcp_ports: self.extra_tcp_ports,
            tls_port: self.tls_port,
            extra_tls_ports: self.extra_tls_ports,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
        })
    }
}

/// Turns figment's errors into one message naming each offending key as the operator wrote it
/// (`dispatcher.aliases[1].realm`), plus where the value came from.
fn describe(err: figment::Error) -> Error {
    Error::Config(sipalias_startup::config_error(TABLE, err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const LOCAL: &str = include_str!("../../deploy/local.toml");

    fn config_error(result: Result<DispatcherConfig, Error>) -> String {
        match result {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// A minimal valid table plus `extra` lines appended inside `[dispatcher]`.
    fn minimal(extra: &str) -> String {
        format!(
            "[dispatcher]\nid = \"d1\"\n{extra}\n[dispatcher.main]\nip = \"127.0.0.1\"\ndomain = \"sip.example.net\"\n"
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn parses_the_shipped_local_config() -> Result<(), Error> {
        let c = DispatcherConfig::from_toml_str(LOCAL)?;
        assert_eq!(c.id, "d1");
        assert_eq!(c.grpc_listen, "127.0.0.1:7070".parse().map_err(|_| Error::Config("x".into()))?);
        assert_eq!(c.retry_after_secs, 5);
        assert_eq!(c.queue_depth, DEFAULT_QUEUE_DEPTH);
        assert_eq!(c.worker_threads, 1, "the local cluster runs the dispatcher on one thread");
        assert_eq!(c.main.ip, ip("127.0.0.1"));
        assert_eq!(c.main.realm, "sip.example.net", "realm defaults to the domain");
        assert_eq!(c.aliases.len(), 2);
        assert_eq!(c.aliases[0].realm, "voip.oldprovider.example");
        assert_eq!(c.aliases[1].extra_udp_ports, vec![5080]);

        assert_eq!(c.aliases[1].extra_tls_ports, vec![5081]);
        assert_eq!(c.streams.max_connections_per_ip, DEFAULT_MAX_CONNECTIONS_PER_IP);
        assert!(c.main.tls_cert.is_some() && c.aliases[1].tls_key.is_some());
        assert!(c.aliases[0].tls_cert.is_none(), "127.0.0.2 has no TLS");

        let table: Vec<(String, u32, Transport, bool, String)> = c
            .sockets()
            .into_iter()
            .map(|s| (s.ip.clone(), s.port, s.transport(), s.alias, s.realm))
            .collect();
        let row = |ip: &str, port, t, alias, realm: &str| {
            (ip.to_owned(), port, t, alias, realm.to_owned())
        };
        let (main, a2, a3) =
            ("sip.example.net", "voip.oldprovider.example", "sip.another-old.example");
        assert_eq!(
            table,
            vec![
                row("127.0.0.1", 5060, Transport::Udp, false, main),
                row("127.0.0.1", 5060, Transport::Tcp, false, main),
                row("127.0.0.1", 5061, Transport::Tls, false, main),
                row("127.0.0.2", 5060, Transport::Udp, true, a2),
                row("127.0.0.2", 5060, Transport::Tcp, true, a2),
                row("127.0.0.3", 5060, Transport::Udp, true, a3),
                row("127.0.0.3", 5080, Transport::Udp, true, a3),
                row("127.0.0.3", 5060, Transport::Tcp, true, a3),
                row("127.0.0.3", 5080, Transport::Tcp, true, a3),
                row("127.0.0.3", 5061, Transport::Tls, true, a3),
                row("127.0.0.3", 5081, Transport::Tls, true, a3),
            ]
        );
        Ok(())
    }

    #[test]
    fn defaults_fill_unset_keys() -> Result<(), Error> {
        let c = DispatcherConfig::from_toml_str(&minimal(""))?;
        assert_eq!(c.grpc_listen.to_string(), DEFAULT_GRPC_LISTEN);
        assert_eq!(c.retry_after_secs, DEFAULT_RETRY_AFTER_SECS);
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(6));
        assert_eq!(c.socket_drain, Duration::from_secs(300));
        assert_eq!(c.main.udp_port, DEFAULT_UDP_PORT);
        assert_eq!((c.main.tcp_port, c.main.tls_port), (DEFAULT_TCP_PORT, DEFAULT_TLS_PORT));
        assert_eq!(
            c.main.transports,
            vec![Transport::Udp, Transport::Tcp],
            "no TLS without a cert"
        );
        assert!(c.aliases.is_empty());
        assert_eq!(
            c.streams,
            StreamLimits {
                max_message_size: 65_535,
                idle_timeout: Duration::from_secs(3600),
                message_timeout: Duration::from_secs(10),
                max_connections: 10_000,
                max_connections_per_ip: 100,
                max_outbound_connections: 2_000,
                tls_reload: Duration::from_secs(5),
                tls_verify_peer: false,
                tls_ca_file: None,
            }
        );
        assert_eq!(c.udp_addrs(), c.tcp_addrs(), "UDP and TCP on 5060");
        assert!(c.tls_addrs().is_empty());
        Ok(())
    }

    #[test]
    fn transports_switch_selects_listeners() -> Result<(), Error> {
        let c = DispatcherConfig::from_toml_str(&minimal("").replace(
            "domain = ",
            "transports = [\"TLS\", \"udp\"]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nextra_tls_ports = [5071]\ndomain = ",
        ))?;
        assert_eq!(c.main.transports, vec![Transport::Udp, Transport::Tls]);
        assert!(c.tcp_addrs().is_empty());
        assert_eq!(c.tls_addrs().iter().map(|a| a.port()).collect::<Vec<_>>(), vec![5061, 5071]);
        Ok(())
    }

    #[test]
    #[expect(clippy::result_large_err, reason = "the closure type is figment::Jail's")]
    fn env_overrides_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("sipalias.toml", LOCAL)?;
            jail.set_env("SIPALIAS_DISPATCHER__ID", "d2");
            jail.set_env("SIPALIAS_DISPATCHER__RETRY_AFTER_SECS", "30");
            jail.set_env("SIPALIAS_DISPATCHER__MAIN__UDP_PORT", "5070");
            // Another binary's override must not trip `deny_unknown_fields` here.
            jail.set_env("SIPALIAS_PROCESSOR__ID", "p9");
            let c = DispatcherConfig::load(Some(Path::new("sipalias.toml")))
                .map_err(|e| e.to_string())?;
            assert_eq!(c.id, "d2");
            assert_eq!(c.retry_after_secs, 30);
            assert_eq!(c.main.udp_port, 5070);
            assert_eq!(c.aliases.len(), 2, "the file's other keys stay");
            Ok(())
        });
    }

    #[test]
    #[expect(clippy::result_large_err, reason = "the closure type is figment::Jail's")]
    fn numeric_id_from_env_is_accepted() {
        Jail::expect_with(|jail| {
            jail.create_file("sipalias.toml", LOCAL)?;
            jail.set_env("SIPALIAS_DISPATCHER__ID", "7");
            let c = DispatcherConfig::load(Some(Path::new("sipalias.toml")))
                .map_err(|e| e.to_string())?;
            assert_eq!(c.id, "7");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        let msg = config_error(DispatcherConfig::load(Some(Path::new("/nonexistent/x.toml"))));
        assert!(msg.contains("/nonexistent/x.toml"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let msg = config_error(DispatcherConfig::from_toml_str(&minimal("grpc_lisen = \"x\"")));
        assert!(msg.starts_with("dispatcher.grpc_lisen: "), "{msg}");

        let toml = format!(
            "{}[[dispatcher.aliases]]\nip = \"127.0.0.2\"\ndomain = \"d\"\n[[dispatcher.aliases]]\nip = \"127.0.0.3\"\ndomain = \"d\"\nrealmm = \"r\"\n",
            minimal("")
        );
        let msg = config_error(DispatcherConfig::from_toml_str(&toml));
        assert!(msg.starts_with("dispatcher.aliases[1].realmm: "), "{msg}");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let msg = config_error(DispatcherConfig::from_toml_str(
            "[dispatcher.main]\nip = \"127.0.0.1\"\ndomain = \"d\"\n",
        ));
        assert!(msg.starts_with("dispatcher.id: "), "{msg}");
        let msg = config_error(DispatcherConfig::from_toml_str("[dispatcher]\nid = \"d1\"\n"));
        assert!(msg.starts_with("dispatcher.main: "), "{msg}");
    }

    /// Each validation error names its key.
    #[test]
    fn validation_errors_name_the_key() {
        let alias = |body: &str| format!("{}[[dispatcher.aliases]]\n{body}\n", minimal(""));
        let cases: Vec<(String, &str)> = vec![
            (
                minimal("").replace("\"d1\"", "\"a.b\""),
                "dispatcher.id: \"a.b\" is not a valid node id",
            ),
            (
                minimal("grpc_listen = \"nowhere\""),
                "dispatcher.grpc_listen: \"nowhere\" is not a socket address",
            ),
            (minimal("queue_depth = 0"), "dispatcher.queue_depth: must be at least 1"),
            (
                minimal("grpc_listen = \"10.1.2.3:7070\""),
                "dispatcher.link_secret: required when grpc_listen (10.1.2.3:7070) is not a \
                 loopback address",
            ),
            (minimal("link_secret = \"short\""), "dispatcher.link_secret: must be 16 to 256"),
            (
                minimal("metrics_listen = \"9090\""),
                "dispatcher.metrics_listen: \"9090\" is not an ip:port",
            ),
            (
                minimal("metrics_listen = \"evil.example:9090\""),
                "dispatcher.metrics_listen: \"evil.example:9090\" is not an ip:port",
            ),
            (
                minimal("source_rate_ban_secs = 0"),
                "dispatcher.source_rate_ban_secs: must be between 1 and 86400",
            ),
            (
                minimal("source_rate_ban_secs = 86401"),
                "dispatcher.source_rate_ban_secs: must be between 1 and 86400",
            ),
            (
                minimal("socket_drain_secs = 0"),
                "dispatcher.socket_drain_secs: must be between 1 and 86400",
            ),
            (
                minimal("socket_drain_secs = 9223372036854775807"),
                "dispatcher.socket_drain_secs: must be between 1 and 86400",
            ),
            (
                minimal("rate_limit_exempt = [\"10.0.0.0/8\", \"10.0.0.0/33\"]"),
                "dispatcher.rate_limit_exempt[1]: \"10.0.0.0/33\": bad prefix length",
            ),
            (
                minimal("rate_limit_exempt = [\"any\"]"),
                "dispatcher.rate_limit_exempt[0]: \"any\": not an IP address or CIDR",
            ),
            (
                minimal("max_outbound_connections = 0"),
                "dispatcher.max_outbound_connections: must be at least 1",
            ),
            (
                minimal("destination_deny_networks = [\"224.0.0.0/4\", \"nowhere\"]"),
                "dispatcher.destination_deny_networks[1]: \"nowhere\"",
            ),
            (
                minimal("scanner_user_agents = [\"ok\", \" \"]"),
                "dispatcher.scanner_user_agents[1]: \" \" must be non-empty",
            ),
            (
                minimal("scanner_user_agents = [\"a\\u0000b\"]"),
                "dispatcher.scanner_user_agents[0]: ",
            ),
            (
                minimal("link_secret = \"0123456789abcdef\\r\\nX-Injected: 1\""),
                "dispatcher.link_secret: may hold only visible ASCII characters",
            ),
            (
                minimal("heartbeat_timeout_secs = 0"),
                "dispatcher.heartbeat_timeout_secs: must be at least 1",
            ),
            (
                minimal("heartbeat_timeout_secs = 86401"),
                "dispatcher.heartbeat_timeout_secs: must be at most 86400",
            ),
            (
                minimal("").replace("127.0.0.1", "0.0.0.0"),
                "dispatcher.main.ip: 0.0.0.0 is not a unicast address",
            ),
            (
                minimal("").replace("\"sip.example.net\"", "\"\""),
                "dispatcher.main.domain: must not be empty",
            ),
            (
                format!(
                    "{}[[dispatcher.aliases]]\nip = \"127.0.0.2\"\ndomain = \"d\"\n[[dispatcher.aliases]]\nip = \"10.0.0.x\"\ndomain = \"d\"\n",
                    minimal("")
                ),
                "dispatcher.aliases[1].ip: \"10.0.0.x\" is not an IP address",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nrealm = \"\""),
                "dispatcher.aliases[0].realm: must not be empty",
            ),
            (
                alias(
                    "ip = \"127.0.0.2\"\ndomain = \"d\"\ndigest_algorithms = [\"MD5\", \"SHA-512\"]",
                ),
                "dispatcher.aliases[0].digest_algorithms[1]: \"SHA-512\" is not MD5 or SHA-256",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ndigest_algorithms = [\"md5\", \"MD5\"]"),
                "dispatcher.aliases[0].digest_algorithms[1]: \"MD5\" is listed twice",
            ),
            (
                alias(
                    "ip = \"127.0.0.2\"\ndomain = \"d\"\ndigest_algorithms = [\"MD5\\r\\nX: y\"]",
                ),
                "dispatcher.aliases[0].digest_algorithms[0]: \"MD5\\r\\nX: y\" is not MD5 or SHA-256",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"a b\""),
                "dispatcher.aliases[0].domain: \"a b\" must not contain whitespace",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nextra_udp_ports = [5080, 0]"),
                "dispatcher.aliases[0].extra_udp_ports[1]: port 0",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nudp_port = 0"),
                "dispatcher.aliases[0].udp_port: port 0",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nextra_udp_ports = [5060]"),
                "dispatcher.aliases[0].extra_udp_ports[0]: socket 127.0.0.2:5060/udp is already configured by dispatcher.aliases[0].udp_port",
            ),
            (
                alias("ip = \"127.0.0.1\"\ndomain = \"d\"\nudp_port = 5070"),
                "dispatcher.aliases[0].ip: 127.0.0.1 is already configured by dispatcher.main.ip",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nudp_port = 70000"),
                "dispatcher.aliases[0].udp_port: ",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nextra_tls_ports = [5071]"),
                "dispatcher.aliases[0].extra_tls_ports: TLS listeners need tls_cert and tls_key",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ntls_cert = \"c.pem\""),
                "dispatcher.aliases[0].tls_key: missing",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ntls_key = \"k.pem\""),
                "dispatcher.aliases[0].tls_cert: missing",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ntransports = [\"udp\", \"tls\"]"),
                "dispatcher.aliases[0].tls_cert: missing: transports lists tls",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ntransports = [\"udp\", \"sctp\"]"),
                "dispatcher.aliases[0].transports[1]: \"sctp\" is not one of udp, tcp, tls",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ntransports = []"),
                "dispatcher.aliases[0].transports: must list at least one transport",
            ),
            (
                alias(
                    "ip = \"127.0.0.2\"\ndomain = \"d\"\ntransports = [\"udp\"]\nextra_tcp_ports = [5070]",
                ),
                "dispatcher.aliases[0].extra_tcp_ports: transports does not list tcp",
            ),
            (
                alias(
                    "ip = \"127.0.0.2\"\ndomain = \"d\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_port = 5060",
                ),
                "dispatcher.aliases[0].tls_port: socket 127.0.0.2:5060/tls is already configured by dispatcher.aliases[0].tcp_port",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\nextra_tcp_ports = [5070, 5070]"),
                "dispatcher.aliases[0].extra_tcp_ports[1]: socket 127.0.0.2:5070/tcp is already configured by dispatcher.aliases[0].extra_tcp_ports[0]",
            ),
            (
                alias("ip = \"127.0.0.2\"\ndomain = \"d\"\ntcp_port = 0"),
                "dispatcher.aliases[0].tcp_port: port 0",
            ),
            (
                minimal("max_message_size = 100"),
                "dispatcher.max_message_size: must be at least 1024",
            ),
            (
                minimal("tcp_idle_timeout_secs = 0"),
                "dispatcher.tcp_idle_timeout_secs: must be at least 1",
            ),
            (
                minimal("tcp_message_timeout_secs = 0"),
                "dispatcher.tcp_message_timeout_secs: must be at least 1",
            ),
            (minimal("max_connections = 0"), "dispatcher.max_connections: must be at least 1"),
            (
                minimal("max_connections_per_ip = 0"),
                "dispatcher.max_connections_per_ip: must be at least 1",
            ),
            (minimal("tls_reload_secs = 0"), "dispatcher.tls_reload_secs: must be at least 1"),
            (
                minimal("tls_verify_peer = true"),
                "dispatcher.tls_ca_file: required when tls_verify_peer is true",
            ),
            (minimal("tcp_idle_timeout_secs = -1"), "dispatcher.tcp_idle_timeout_secs: "),
        ];
        for (toml, expected) in cases {
            let msg = config_error(DispatcherConfig::from_toml_str(&toml));
            assert!(msg.starts_with(expected), "expected {expected:?}, got {msg:?}\n{toml}");
        }
    }

    #[test]
    fn main_may_have_extra_ports_too() -> Result<(), Error> {
        let c = DispatcherConfig::from_toml_str(&minimal("").replace(
            "domain = ",
            "extra_udp_ports = [5070]\nextra_tcp_ports = [5072]\ndomain = ",
        ))?;
        assert_eq!(c.udp_addrs().iter().map(|a| a.port()).collect::<Vec<_>>(), vec![5060, 5070]);
        assert_eq!(c.tcp_addrs().iter().map(|a| a.port()).collect::<Vec<_>>(), vec![5060, 5072]);
        Ok(())
    }

    #[test]
    #[expect(clippy::result_large_err, reason = "the closure type is figment::Jail's")]
    fn stream_keys_come_from_the_environment_too() {
        Jail::expect_with(|jail| {
            jail.create_file("sipalias.toml", LOCAL)?;
            jail.set_env("SIPALIAS_DISPATCHER__MAX_CONNECTIONS_PER_IP", "7");
            jail.set_env("SIPALIAS_DISPATCHER__MAIN__TRANSPORTS", "[udp, tls]");
            let c = DispatcherConfig::load(Some(Path::new("sipalias.toml")))
                .map_err(|e| e.to_string())?;
            assert_eq!(c.streams.max_connections_per_ip, 7);
            assert_eq!(
                c.main.transports,
                vec![Transport::Udp, Transport::Tls],
                "no tcp on the main IP"
            );
            Ok(())
        });
    }
}
