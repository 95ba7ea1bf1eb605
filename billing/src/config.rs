//! Billing configuration: built-in defaults, then the `[billing]` table of the cluster's TOML
//! file, then `SIPALIAS_BILLING__*` environment variables.
//!
//! The cluster shares one TOML file between services, so only the `[billing]` table is read;
//! `[dispatcher]`, `[processor]` and anything else at the top level belong to others and are
//! ignored. Inside `[billing]` unknown keys are rejected, because a misspelt key silently
//! falling back to its default is worse than refusing to start.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The TOML table this crate reads.
const TABLE: &str = "billing";
/// Prefix of environment overrides; `__` separates the table from the key, as in
/// `SIPALIAS_BILLING__LISTEN=127.0.0.1:9999`.
const ENV_PREFIX: &str = "SIPALIAS_";

/// Settings of the billing service and its CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingConfig {
    /// Address the gRPC server binds (`billing.listen`, default `127.0.0.1:7080`).
    pub listen: SocketAddr,
    /// Redis to keep accounts and CDRs in (`billing.redis_url`, default
    /// `redis://127.0.0.1:6379/`). `redis+unix:///path/to.sock` and `unix:///path/to.sock` select
    /// a unix socket.
    pub redis_url: String,
    /// Prefix of every Redis key billing writes (`billing.key_prefix`, default `sipalias:`), so
    /// several clusters or test runs can share one Redis.
    pub key_prefix: String,
    /// Longest call `Authorize` allows, in seconds; 0 means no limit
    /// (`billing.default_max_duration_secs`, default 0).
    pub default_max_duration_secs: u32,
    /// Rate plan of accounts that name none (`billing.default_rate_plan`, default empty = none:
    /// such accounts' calls are not rated).
    pub default_rate_plan: String,
    /// Runtime threads of `serve` (`billing.worker_threads`, default 0 = one per core). 1 runs
    /// on one thread, the cheapest per request where billing shares a small host (measured in
    /// docs/benchmarks.md).
    pub worker_threads: usize,
    /// The cluster's shared secret (`billing.link_secret`): every call must present it
    /// ([`sipalias_proto::link_auth`]), so only cluster members check digests, authorize and
    /// account calls. Required unless `listen` is a loopback address.
    #[serde(default)]
    pub link_secret: String,
    /// `ip:port` of the operations listener (`/metrics`, `/healthz`, `/readyz`;
    /// `billing.metrics_listen`); empty (the default) opens none. Meant for a private address:
    /// it has no authentication.
    #[serde(default)]
    pub metrics_listen: String,
    /// `text` (default) or `json` log lines (`billing.log_format`).
    #[serde(default)]
    pub log_format: sipalias_startup::LogFormat,
    /// Log filter (`billing.log_level`, `RUST_LOG` syntax, default `info`); `RUST_LOG`
    /// overrides it at start, and SIGHUP re-reads it from the file.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

fn default_log_level() -> String {
    sipalias_startup::DEFAULT_LOG_LEVEL.to_owned()
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7080)),
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
            key_prefix: "sipalias:".to_owned(),
            default_max_duration_secs: 0,
            default_rate_plan: String::new(),
            worker_threads: 0,
            link_secret: String::new(),
            metrics_listen: String::new(),
            log_format: sipalias_startup::LogFormat::Text,
            log_level: default_log_level(),
        }
    }
}

impl BillingConfig {
    /// Loads the configuration: defaults, then the `[billing]` table of the TOML file at `path`
    /// (which must exist when given), then `SIPALIAS_BILLING__<KEY>` environment variables.
    ///
    /// The result is validated; errors name the key, e.g. `billing.redis_url: ...`.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let mut sources = Figment::new();
        if let Some(path) = path {
            // `file_exact`: an explicitly named file that is missing is an error, not an
            // empty configuration, and no parent directories are searched.
            sources = sources.merge(Toml::file_exact(path));
        }
        let sources = sources.merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::extract(sources)
    }

    /// Parses the `[billing]` table of a TOML document over the defaults, without looking at
    /// the environment. Meant for tests and tools that already hold the file's text.
    pub fn from_toml_str(toml: &str) -> Result<Self, Error> {
        Self::extract(Figment::from(Toml::string(toml)))
    }

    fn extract(sources: Figment) -> Result<Self, Error> {
        let config: Self = Figment::from(Serialized::defaults(Self::default()))
            .merge(sources.focus(TABLE))
            .extract()
            .map_err(describe)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: that the prefix is usable, the default rate plan is a valid
    /// name and the Redis URL parses.
    pub fn validate(&self) -> Result<(), Error> {
        sipalias_proto::link_auth::validate(&self.link_secret)
            .map_err(|why| key_error("link_secret", &why))?;
        if self.link_secret.is_empty() && !self.listen.ip().is_loopback() {
            return Err(key_error(
                "link_secret",
                &format!(
                    "required when listen ({}) is not a loopback address: without it anyone who \
                     reaches that port could authorize or end calls",
                    self.listen
                ),
            ));
        }
        if self.key_prefix.is_empty() {
            return Err(key_error("key_prefix", "must not be empty"));
        }
        if let Err(why) = sipalias_ops::parse_listen(&self.metrics_listen) {
            return Err(key_error("metrics_listen", &why));
        }
        if let Err(why) = sipalias_startup::check_log_level(&self.log_level) {
            return Err(key_error("log_level", &why));
        }
        if self.key_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(key_error(
                "key_prefix",
                "must not contain whitespace or control characters",
            ));
        }
        if !self.default_rate_plan.is_empty()
            && crate::rating::validate_plan_name("default_rate_plan", &self.default_rate_plan)
                .is_err()
        {
            return Err(key_error(
                "default_rate_plan",
                "must be empty or 1 to 64 characters of A-Z a-z 0-9 _ . -",
            ));
        }
        // `Client::open` only parses; it does not connect. The URL may carry a password, so
        // it is not echoed back.
        if let Err(e) = redis::Client::open(self.redis_url.as_str()) {
            return Err(key_error(
                "redis_url",
                &format!(
                    "not a valid Redis URL ({e}); expected redis://host:port/, \
                     redis+unix:///path/to.sock or unix:///path/to.sock"
                ),
            ));
        }
        Ok(())
    }
}

fn key_error(key: &str, msg: &str) -> Error {
    Error::Config(format!("{TABLE}.{key}: {msg}"))
}

/// Turns figment's errors into one message that names each offending key as the operator
/// wrote it (`billing.listen`), plus where the value came from.
fn describe(err: figment::Error) -> Error {
    Error::Config(sipalias_startup::config_error(TABLE, err))
}

#[cfg(test)]
// `Jail::expect_with` dictates the closure's `Result<(), figment::Error>`.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn config_error(result: Result<BillingConfig, Error>) -> String {
        match result {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_when_table_is_absent() {
        let c = BillingConfig::from_toml_str("[dispatcher]\nlisten = 'x'\n").expect("config");
        assert_eq!(c, BillingConfig::default());
        assert_eq!(c.listen.to_string(), "127.0.0.1:7080");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379/");
        assert_eq!(c.key_prefix, "sipalias:");
        assert_eq!(c.default_max_duration_secs, 0);
    }

    #[test]
    fn toml_table_overrides_defaults_and_other_tables_are_ignored() {
        let c = BillingConfig::from_toml_str(
            r#"
            [dispatcher]
            whatever = 1
            [processor]
            listen = "0.0.0.0:5060"
            [billing]
            listen = "127.0.0.1:9000"
            redis_url = "redis+unix:///run/redis/redis.sock"
            default_max_duration_secs = 3600
            default_rate_plan = "retail"
            "#,
        )
        .expect("config");
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.redis_url, "redis+unix:///run/redis/redis.sock");
        assert_eq!(c.key_prefix, "sipalias:");
        assert_eq!(c.default_max_duration_secs, 3600);
        assert_eq!(c.default_rate_plan, "retail");
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let c = BillingConfig::from_toml_str(include_str!("../../deploy/local.toml"))
            .expect("deploy/local.toml");
        assert_eq!(c.listen.to_string(), "127.0.0.1:7080");
    }

    #[test]
    fn unix_socket_urls_are_accepted() {
        for url in ["unix:///tmp/r.sock", "redis+unix:///tmp/r.sock", "redis://10.0.0.1:6380/2"] {
            let toml = format!("[billing]\nredis_url = {url:?}\n");
            let c = BillingConfig::from_toml_str(&toml).expect("config");
            assert_eq!(c.redis_url, url);
        }
    }

    #[test]
    fn unknown_key_is_rejected_and_named() {
        let msg =
            config_error(BillingConfig::from_toml_str("[billing]\nlisten_addr = \"1.2.3.4:5\"\n"));
        assert!(msg.contains("billing.listen_addr"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let msg = config_error(BillingConfig::from_toml_str("[billing]\nlisten = \"nope\"\n"));
        assert!(msg.contains("billing.listen"), "{msg}");

        let msg = config_error(BillingConfig::from_toml_str(
            "[billing]\ndefault_max_duration_secs = -1\n",
        ));
        assert!(msg.contains("billing.default_max_duration_secs"), "{msg}");

        let msg =
            config_error(BillingConfig::from_toml_str("[billing]\nredis_url = \"http://x/\"\n"));
        assert!(msg.starts_with("billing.redis_url: "), "{msg}");

        let msg = config_error(BillingConfig::from_toml_str("[billing]\nkey_prefix = \"\"\n"));
        assert!(msg.starts_with("billing.key_prefix: "), "{msg}");

        let msg = config_error(BillingConfig::from_toml_str(
            "[billing]\ndefault_rate_plan = \"two words\"\n",
        ));
        assert!(msg.starts_with("billing.default_rate_plan: "), "{msg}");

        // Off loopback, billing must know the cluster's secret; hostile secrets are refused.
        let msg =
            config_error(BillingConfig::from_toml_str("[billing]\nlisten = \"0.0.0.0:7080\"\n"));
        assert!(msg.starts_with("billing.link_secret: required when listen"), "{msg}");
        for bad in ["short", "0123456789abcdef\\r\\nX: y", "0123456789 abcdef"] {
            let msg = config_error(BillingConfig::from_toml_str(&format!(
                "[billing]\nlisten = \"0.0.0.0:7080\"\nlink_secret = \"{bad}\"\n"
            )));
            assert!(msg.starts_with("billing.link_secret: "), "{bad}: {msg}");
        }
        let ok = BillingConfig::from_toml_str(
            "[billing]\nlisten = \"0.0.0.0:7080\"\nlink_secret = \"0123456789abcdef\"\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn file_then_env_override() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "sipalias.toml",
                r#"
                [processor]
                anything = true
                [billing]
                listen = "127.0.0.1:7001"
                key_prefix = "file:"
                "#,
            )?;
            jail.set_env("SIPALIAS_BILLING__LISTEN", "127.0.0.1:9999");
            jail.set_env("SIPALIAS_BILLING__DEFAULT_MAX_DURATION_SECS", "60");
            // Other services' variables and the CLI's own are not billing's business.
            jail.set_env("SIPALIAS_PROCESSOR__LISTEN", "whatever");
            jail.set_env("SIPALIAS_CONFIG", "sipalias.toml");

            let c = BillingConfig::load(Some(Path::new("sipalias.toml"))).expect("config");
            assert_eq!(c.listen.to_string(), "127.0.0.1:9999");
            assert_eq!(c.key_prefix, "file:");
            assert_eq!(c.default_max_duration_secs, 60);
            assert_eq!(c.redis_url, "redis://127.0.0.1:6379/");
            Ok(())
        });
    }

    #[test]
    fn env_only_and_bad_env_value_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("SIPALIAS_BILLING__KEY_PREFIX", "env:");
            let c = BillingConfig::load(None).expect("config");
            assert_eq!(c.key_prefix, "env:");

            jail.set_env("SIPALIAS_BILLING__LISTEN", "not-an-address");
            let msg = config_error(BillingConfig::load(None));
            assert!(msg.contains("billing.listen"), "{msg}");
            jail.set_env("SIPALIAS_BILLING__LISTEN", "127.0.0.1:7080");

            for hostile in ["9090", "evil.example:9090", "127.0.0.1:9090;x", "127.0.0.1:-1"] {
                jail.set_env("SIPALIAS_BILLING__METRICS_LISTEN", hostile);
                let msg = config_error(BillingConfig::load(None));
                assert!(msg.contains("billing.metrics_listen"), "{hostile}: {msg}");
            }
            jail.set_env("SIPALIAS_BILLING__METRICS_LISTEN", "127.0.0.1:9093");
            let c = BillingConfig::load(None).expect("config");
            assert_eq!(c.metrics_listen, "127.0.0.1:9093");
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        Jail::expect_with(|_jail| {
            let msg = config_error(BillingConfig::load(Some(Path::new("does-not-exist.toml"))));
            assert!(msg.contains("does-not-exist.toml"), "{msg}");
            Ok(())
        });
    }
}
