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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use sipalias_proto::edge::{LocalSocket, Transport};
use sipmsg::scan::is_valid_node_id;

use crate::error::Error;

/// The TOML table this crate reads.
const TABLE: &str = "dispatcher";
/// Prefix of environment overrides; `__` separates table and keys, as in
/// `SIPALIAS_DISPATCHER__ID=d2` or `SIPALIAS_DISPATCHER__MAIN__IP=10.0.0.1`.
const ENV_PREFIX: &str = "SIPALIAS_";

/// Default of `dispatcher.grpc_listen`.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:7070";
/// Default of `dispatcher.retry_after_secs`.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 5;
/// Default of `dispatcher.queue_depth`.
pub const DEFAULT_QUEUE_DEPTH: usize = 4096;
/// Default SIP UDP port of the main IP and of each alias.
pub const DEFAULT_UDP_PORT: u16 = 5060;

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
    /// The main (virtual) IP (`dispatcher.main`, required).
    pub main: IpConfig,
    /// IP aliases: old providers' server addresses routed to us (`dispatcher.aliases`).
    pub aliases: Vec<IpConfig>,
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
    /// Standard SIP UDP port (`udp_port`, default 5060).
    pub udp_port: u16,
    /// Additional UDP ports, for networks where the standard one is blocked
    /// (`extra_udp_ports`, default none).
    pub extra_udp_ports: Vec<u16>,
}

/// One row of the socket table, with the key that configured it (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SocketEntry {
    pub(crate) addr: SocketAddr,
    pub(crate) alias: bool,
    pub(crate) domain: String,
    pub(crate) realm: String,
    pub(crate) key: String,
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

    /// Checks everything serde cannot: node id, queue depth, domains, ports, wildcard IPs,
    /// and that no IP or (IP, port) socket is configured twice. [`run`](crate::run) calls it
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
                         its extra_udp_ports",
                        site.ip
                    ),
                ));
            }
            check_name(&format!("{key}.domain"), &site.domain)?;
            check_name(&format!("{key}.realm"), &site.realm)?;
        }
        let mut seen: HashMap<SocketAddr, String> = HashMap::new();
        for entry in self.socket_entries() {
            if entry.addr.port() == 0 {
                return Err(key_error(&entry.key, "port 0 is not a port phones can send to"));
            }
            if let Some(first) = seen.insert(entry.addr, format!("{TABLE}.{}", entry.key)) {
                return Err(key_error(
                    &entry.key,
                    format!("socket {}/udp is already configured by {first}", entry.addr),
                ));
            }
        }
        Ok(())
    }

    /// The socket table: every (IP, port, transport) the dispatcher listens on, main IP first,
    /// then each alias in order; for each IP its `udp_port`, then its `extra_udp_ports`.
    /// This is what a processor receives in `Welcome`.
    pub fn sockets(&self) -> Vec<LocalSocket> {
        self.socket_entries()
            .into_iter()
            .map(|e| LocalSocket {
                ip: e.addr.ip().to_string(),
                port: u32::from(e.addr.port()),
                transport: Transport::Udp.into(),
                alias: e.alias,
                domain: e.domain,
                realm: e.realm,
            })
            .collect()
    }

    /// The UDP addresses to bind, in socket-table order.
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.socket_entries().into_iter().map(|e| e.addr).collect()
    }

    pub(crate) fn socket_entries(&self) -> Vec<SocketEntry> {
        let mut out = Vec::new();
        for (key, site) in self.sites() {
            let alias = key != "main";
            let ports = std::iter::once((format!("{key}.udp_port"), site.udp_port)).chain(
                site.extra_udp_ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("{key}.extra_udp_ports[{i}]"), *p)),
            );
            for (key, port) in ports {
                out.push(SocketEntry {
                    addr: SocketAddr::new(site.ip, port),
                    alias,
                    domain: site.domain.clone(),
                    realm: site.realm.clone(),
                    key,
                });
            }
        }
        out
    }

    /// The main IP and every alias, each with its key relative to the table.
    fn sites(&self) -> impl Iterator<Item = (String, &IpConfig)> {
        std::iter::once(("main".to_owned(), &self.main))
            .chain(self.aliases.iter().enumerate().map(|(i, a)| (format!("aliases[{i}]"), a)))
    }
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

fn key_error(key: &str, msg: impl std::fmt::Display) -> Error {
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
    #[serde(default = "default_udp_port")]
    udp_port: u16,
    #[serde(default)]
    extra_udp_ports: Vec<u16>,
}

/// A node id as written. An all-digit id given in the environment (`SIPALIAS_DISPATCHER__ID=7`)
/// arrives as a number, so numbers are accepted and turned back into text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NodeIdValue {
    Text(String),
    Number(u64),
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
fn default_udp_port() -> u16 {
    DEFAULT_UDP_PORT
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
        Ok(IpConfig {
            ip,
            realm: self.realm.unwrap_or_else(|| self.domain.clone()),
            domain: self.domain,
            udp_port: self.udp_port,
            extra_udp_ports: self.extra_udp_ports,
        })
    }
}

/// Turns figment's errors into one message naming each offending key as the operator wrote it
/// (`dispatcher.aliases[1].realm`), plus where the value came from.
fn describe(err: figment::Error) -> Error {
    let messages: Vec<String> = err
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            match &e.kind {
                figment::error::Kind::UnknownField(field, _) if path.last() != Some(field) => {
                    path.push(field.clone());
                }
                figment::error::Kind::MissingField(field)
                    if path.last().map(String::as_str) != Some(field.as_ref()) =>
                {
                    path.push(field.to_string());
                }
                _ => {}
            }
            let origin = match e.metadata.as_ref() {
                Some(md) => match &md.source {
                    Some(source) => format!(" (in {source})"),
                    None => format!(" (from {})", md.name),
                },
                None => String::new(),
            };
            // Some messages (I/O, TOML syntax) end in a newline.
            let kind = e.kind.to_string();
            let kind = kind.trim_end();
            if path.is_empty() {
                // Not about a key: unreadable file, TOML syntax error, ...
                format!("{kind}{origin}")
            } else {
                format!("{TABLE}{}: {kind}{origin}", key_path(&path))
            }
        })
        .collect();
    Error::Config(messages.join("; "))
}

/// `["aliases", "1", "ip"]` → `.aliases[1].ip`.
fn key_path(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            out.push('.');
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;
    use std::net::Ipv4Addr;

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
        assert_eq!(c.main.ip, ip("127.0.0.1"));
        assert_eq!(c.main.realm, "sip.example.net", "realm defaults to the domain");
        assert_eq!(c.aliases.len(), 2);
        assert_eq!(c.aliases[0].realm, "voip.oldprovider.example");
        assert_eq!(c.aliases[1].extra_udp_ports, vec![5080]);

        let table: Vec<(String, u32, bool, String)> = c
            .sockets()
            .into_iter()
            .map(|s| {
                assert_eq!(s.transport(), Transport::Udp);
                (s.ip, s.port, s.alias, s.realm)
            })
            .collect();
        assert_eq!(
            table,
            vec![
                ("127.0.0.1".into(), 5060, false, "sip.example.net".into()),
                ("127.0.0.2".into(), 5060, true, "voip.oldprovider.example".into()),
                ("127.0.0.3".into(), 5060, true, "sip.another-old.example".into()),
                ("127.0.0.3".into(), 5080, true, "sip.another-old.example".into()),
            ]
        );
        Ok(())
    }

    #[test]
    fn defaults_fill_unset_keys() -> Result<(), Error> {
        let c = DispatcherConfig::from_toml_str(&minimal(""))?;
        assert_eq!(c.grpc_listen.to_string(), DEFAULT_GRPC_LISTEN);
        assert_eq!(c.retry_after_secs, DEFAULT_RETRY_AFTER_SECS);
        assert_eq!(c.main.udp_port, DEFAULT_UDP_PORT);
        assert!(c.aliases.is_empty());
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
        ];
        for (toml, expected) in cases {
            let msg = config_error(DispatcherConfig::from_toml_str(&toml));
            assert!(msg.starts_with(expected), "expected {expected:?}, got {msg:?}\n{toml}");
        }
    }

    #[test]
    fn main_may_have_extra_ports_too() -> Result<(), Error> {
        let c = DispatcherConfig::from_toml_str(
            &minimal("").replace("domain = ", "extra_udp_ports = [5070]\ndomain = "),
        )?;
        assert_eq!(c.udp_addrs().iter().map(|a| a.port()).collect::<Vec<_>>(), vec![5060, 5070]);
        Ok(())
    }
}
