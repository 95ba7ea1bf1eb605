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

/// A running `redis-server` (no TCP port, no persistence); stopped by PID when dropped.
pub struct RedisServer {
    process: Process,
    socket: PathBuf,
}

impl RedisServer {
    /// Starts redis-server with its socket and working directory in `dir`, and waits until it
    /// answers `PING`.
    pub fn start(dir: &Path) -> Result<Self> {
        let socket = dir.join("redis.sock");
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg("");
        let process = Process::spawn("redis", cmd)?;
        let server = RedisServer { process, socket };
        wait::until("redis-server to accept connections", READY_TIMEOUT, || {
            if UnixStream::connect(&server.socket).is_ok() {
                return Ok(Some(()));
            }
            if !server.process.is_running() {
                bail!("redis-server exited:\n{}", server.process.lines().join("\n"));
            }
            Ok(None)
        })?;
        let pong: String = redis::cmd("PING").query(&mut server.client()?)?;
        if pong != "PONG" {
            bail!("redis-server answered PING with {pong:?}");
        }
        Ok(server)
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

    /// The redis-server process.
    pub fn process(&self) -> &Process {
        &self.process
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
        let pid = server.process().pid();
        drop(con);
        drop(server);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }
}
