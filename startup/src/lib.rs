//! The start-up skeleton of the three sipalias binaries: one logging set-up, one runtime
//! builder, one cooperative shutdown and one format for configuration errors, so that the
//! dispatcher, the processor and billing start, report and stop alike.
//!
//! ```no_run
//! let stop = sipalias_startup::Stop::new();
//! sipalias_startup::init_logging(sipalias_startup::LogFormat::Text, "info");
//! let runtime = sipalias_startup::runtime(1).expect("a runtime");
//! runtime.block_on(async {
//!     let mut stopping = stop.stopping();
//!     tokio::spawn(async move { stopping.wait().await });
//!     sipalias_startup::signal().await;
//!     stop.trigger();
//! });
//! ```

use std::future::Future;
use std::io::IsTerminal;

use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

/// How log lines are written (`log_format` of each service's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (the default): `time LEVEL target: message k=v …`.
    #[default]
    Text,
    /// One JSON object per line, for log shippers: `timestamp`, `level`, `target`, `fields`.
    Json,
}

/// The default `log_level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Checks a `log_level` value (`RUST_LOG` syntax: `info`, `warn,sipalias_processor=debug`).
pub fn check_log_level(directives: &str) -> Result<(), String> {
    if directives.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    EnvFilter::try_new(directives).map(|_| ()).map_err(|e| format!("{directives:?}: {e}"))
}

/// The running process's log filter, changeable while it runs ([`LogLevel::set`]).
#[derive(Clone)]
pub struct LogLevel(reload::Handle<EnvFilter, Registry>);

impl LogLevel {
    /// Replaces the filter with `directives` (`RUST_LOG` syntax).
    pub fn set(&self, directives: &str) -> Result<(), String> {
        check_log_level(directives)?;
        let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

/// Logs to stderr as `format`, filtered by `RUST_LOG` when it is set, else by `level` (the
/// configuration's `log_level`). Text has colours only on a terminal, so that logs captured to
/// a file, a journal or a pipe (the end-to-end harness reads them) stay plain. Returns the
/// handle that changes the filter later; `None` if a subscriber was already set (an
/// embedding program), which is left as it is.
pub fn init_logging(format: LogFormat, level: &str) -> Option<LogLevel> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_LEVEL));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt.json().with_ansi(false).boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).try_init().ok()?;
    Some(LogLevel(handle))
}

/// With a `level` handle (logging was set up here), spawns [`reload_log_level_on_hangup`]
/// on the current runtime.
pub fn watch_log_level(
    level: Option<LogLevel>,
    reread: impl Fn() -> Result<String, String> + Send + 'static,
    stopping: Stopping,
) {
    if let Some(level) = level {
        tokio::spawn(reload_log_level_on_hangup(level, reread, stopping));
    }
}

/// Until `stopping`, re-reads the log level on every SIGHUP: `reread` loads the configuration
/// again and returns its `log_level`; a configuration that no longer loads changes nothing
/// (and says why). `RUST_LOG`, if set, is only the level at start.
pub async fn reload_log_level_on_hangup(
    level: LogLevel,
    reread: impl Fn() -> Result<String, String>,
    mut stopping: Stopping,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot listen for SIGHUP: the log level is fixed");
            return;
        };
        loop {
            tokio::select! {
                _ = stopping.wait() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match reread().and_then(|l| level.set(&l).map(|()| l)) {
                Ok(l) => info!(log_level = %l, "SIGHUP: log level set"),
                Err(e) => warn!(error = %e, "SIGHUP: log level unchanged"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (level, reread);
        stopping.wait().await;
    }
}

/// The tokio runtime of a service: `worker_threads` 1 is a current-thread runtime (no
/// cross-thread hand-offs), 0 one worker per core, N that many workers.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    builder.enable_all().build()
}

/// Completes on SIGTERM or Ctrl-C (SIGINT), logging which. Without any signal handler it
/// never completes (the process then runs until killed), rather than stopping at once.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => info!("interrupt: shutting down"),
                }
                return;
            }
            Err(e) => warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops this process"),
        }
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => info!("interrupt: shutting down"),
        Err(e) => {
            warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    }
}

/// The sending side of a cooperative shutdown: every task holding a [`Stopping`] ends its
/// loop once [`Stop::trigger`] is called (or this is dropped), finishing what it is doing
/// first, instead of being aborted at an arbitrary await.
#[derive(Debug)]
pub struct Stop(watch::Sender<bool>);

impl Stop {
    /// Not triggered yet.
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    /// A handle for one task.
    pub fn stopping(&self) -> Stopping {
        Stopping(self.0.subscribe())
    }

    /// Tells every task to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Default for Stop {
    fn default() -> Self {
        Self::new()
    }
}

/// The receiving side of a [`Stop`]: one per task.
#[derive(Debug, Clone)]
pub struct Stopping(watch::Receiver<bool>);

impl Stopping {
    /// Completes once the stop is triggered (at once if it already was), or its [`Stop`] is
    /// gone, which also means stop.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Runs `work` until it ends or the stop is triggered, whichever comes first; `None` when
    /// stopped. For loops whose every await is a safe place to end (timers, polls, a link
    /// that the peer sees closed); a loop with work to finish watches [`Stopping::wait`]
    /// itself.
    pub async fn run_until<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            () = self.wait() => None,
            out = work => Some(out),
        }
    }

    /// Whether the stop has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// The one format of a configuration error, whichever binary reports it: each problem figment
/// found as `<table>.<key path>: <what is wrong> (in <file>)` — `<table>.aliases[1].ip: ...`
/// — or, when it is about no key (an unreadable file, a TOML syntax error), the message and
/// where; several are joined with `; `.
pub fn config_error(table: &str, err: figment::Error) -> String {
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
            // Some messages (I/O, TOML syntax) span lines: one line per error, for logs.
            let kind = e.kind.to_string();
            let kind: Vec<&str> =
                kind.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).collect();
            let kind = kind.join(" ");
            if path.is_empty() {
                format!("{kind}{origin}")
            } else {
                format!("{table}{}: {kind}{origin}", key_path(&path))
            }
        })
        .collect();
    messages.join("; ")
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

    #[tokio::test]
    async fn stopping_completes_once_triggered_or_when_the_stop_is_gone() {
        let stop = Stop::new();
        let mut a = stop.stopping();
        let b = stop.stopping();
        assert!(!a.is_triggered());
        stop.trigger();
        a.wait().await;
        assert!(b.is_triggered());
        // A handle taken after the trigger sees it too.
        stop.stopping().wait().await;

        let mut c = stop.stopping();
        assert_eq!(c.run_until(std::future::pending::<()>()).await, None);
        let fresh = Stop::new();
        assert_eq!(fresh.stopping().run_until(async { 3 }).await, Some(3));

        let gone = Stop::new();
        let mut orphan = gone.stopping();
        drop(gone);
        orphan.wait().await;
    }

    #[test]
    fn log_levels_are_checked_before_use() {
        for good in ["info", "warn,sipalias_processor=debug", "off", "sipalias::security=info"] {
            assert!(check_log_level(good).is_ok(), "{good}");
        }
        for bad in ["info\nx", "=", "sipalias=loud", "a=b=c"] {
            assert!(check_log_level(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn runtimes_of_every_size_build() {
        for n in [0, 1, 2] {
            let rt = runtime(n).expect("a runtime");
            assert_eq!(rt.block_on(async { 7 }), 7);
        }
    }

    #[test]
    fn configuration_errors_name_the_table_and_key() {
        use figment::providers::{Format, Toml};
        let fig = figment::Figment::from(Toml::string("[t]\nport = 'x'\n[[t.list]]\nip = 1\n"));
        let e = fig.extract_inner::<u16>("t.port").expect_err("a string is no port");
        let text = config_error("t", e);
        assert!(text.starts_with("t.t.port: ") || text.starts_with("t.port: "), "{text}");
        assert_eq!(key_path(&["aliases".into(), "1".into(), "ip".into()]), ".aliases[1].ip");
        let syntax = figment::Figment::from(Toml::string("[t\nport = 1"));
        let e = syntax.extract_inner::<u16>("t.port").expect_err("not TOML");
        assert!(!config_error("t", e).contains('\n'), "one line");
    }
}
