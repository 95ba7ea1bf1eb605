//! A private `redis-server` per test, listening only on a unix socket in the test's directory.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::Process;
use crate::wait;

/// How long redis-server gets to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` (no TCP port); stopped by PID when dropped. Without persistence it keeps
/// nothing on disk; with it (append-only file, fsync on every write) a restart keeps every key.
pub struct RedisServer {
    /// `None` while stopped with [`RedisServer::stop`].
    process: Option<Process>,
    socket: PathBuf,
    dir: PathBuf,
    persistence: bool,
}

impl RedisServer {
    /// Starts redis-server without persistence, with its socket and working directory in
    /// `dir`, and waits until it answers `PING`.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, false)
    }

    /// Starts redis-server with its socket and working directory in `dir`; with `persistence`
    /// every write is appended to a file and fsynced before it is acknowledged
    /// (`--appendonly yes --appendfsync always`), so a restart loses nothing.
    pub fn start_with(dir: &Path, persistence: bool) -> Result<Self> {
        let mut server = RedisServer {
            process: None,
            socket: dir.join("redis.sock"),
            dir: dir.to_owned(),
            persistence,
        };
        server.start_again()?;
        Ok(server)
    }

    /// Stops redis-server (SIGTERM, by PID) and waits for it to exit. Clients see their
    /// connections closed and new ones refused until [`RedisServer::start_again`].
    pub fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.process.take() {
            p.terminate()?;
        }
        Ok(())
    }

    /// Starts redis-server again after [`RedisServer::stop`], on the same socket and in the
    /// same directory, and waits until it answers `PING` (with persistence: until it has loaded
    /// its data).
    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("redis-server is already running");
        }
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&self.socket)
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg("");
        if self.persistence {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let process = Process::spawn("redis", cmd)?;
        let result = wait::until("redis-server to answer PING", READY_TIMEOUT, || {
            if !process.is_running() {
                bail!("redis-server exited:\n{}", process.lines().join("\n"));
            }
            if UnixStream::connect(&self.socket).is_err() {
                return Ok(None);
            }
            // While it loads its append-only file it answers -LOADING: not ready yet.
            let pong: Result<String> = self
                .client()
                .and_then(|mut c| redis::cmd("PING").query(&mut c).map_err(Into::into));
            Ok(pong.ok().filter(|p| p == "PONG"))
        });
        // Stored even on failure, so that it is stopped by PID either way.
        self.process = Some(process);
        result.map(|_| ())
    }

    /// Stops redis-server and starts it again on the same socket and directory.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// The URL services are configured with: `redis+unix:///.../redis.sock`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// A new synchronous connection, for the test's own assertions.
    pub fn client(&self) -> Result<redis::Connection> {
        let client = redis::Client::open(self.url()).context("redis url")?;
        client.get_connection().with_context(|| format!("connecting to {}", self.url()))
    }

    /// The redis-server process, unless stopped.
    pub fn process(&self) -> Option<&Process> {
        self.process.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_is_gone_after_drop() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let server = RedisServer::start(dir.path())?;
        let mut con = server.client()?;
        let () = redis::cmd("SET").arg("k").arg("v").query(&mut con)?;
        let v: String = redis::cmd("GET").arg("k").query(&mut con)?;
        assert_eq!(v, "v");
        let pid = server.process().context("running")?.pid();
        drop(con);
        drop(server);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    fn survives_restart(persistence: bool) -> Result<bool> {
        let dir = tempfile::tempdir()?;
        let mut server = RedisServer::start_with(dir.path(), persistence)?;
        let () = redis::cmd("SET").arg("k").arg("v").query(&mut server.client()?)?;
        let pid = server.process().context("running")?.pid();
        server.stop()?;
        assert!(server.client().is_err(), "redis still answers after stop");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        server.start_again()?;
        let v: Option<String> = redis::cmd("GET").arg("k").query(&mut server.client()?)?;
        Ok(v.as_deref() == Some("v"))
    }

    #[test]
    fn restart_keeps_keys_only_with_persistence() -> Result<()> {
        assert!(survives_restart(true)?, "persistent redis lost a key over a restart");
        assert!(!survives_restart(false)?, "redis without persistence kept a key");
        Ok(())
    }
}
