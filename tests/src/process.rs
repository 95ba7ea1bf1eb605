//! A child process under test: its output captured line by line, waited on by content, and
//! stopped by PID when dropped.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a process gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// Lines a failure message quotes from the end of a process's output.
const TAIL_LINES: usize = 30;

/// Output lines of a process (stdout and stderr interleaved as they arrive).
#[derive(Default)]
struct Output {
    lines: Vec<String>,
    /// When each line was read, for measuring how long after one event another came.
    times: Vec<Instant>,
    /// Streams still open; 0 once the process has closed both (normally: exited).
    open: usize,
}

struct Shared {
    output: Mutex<Output>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Output> {
        // A reader thread cannot panic while holding the lock, but don't turn one test's
        // failure into a second panic in Drop either.
        self.output.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A process closed its output (exited) while a test waited for it to print something.
#[derive(Debug)]
pub struct Exited {
    /// The process's name.
    pub name: String,
    /// Its exit status, as text.
    pub status: String,
    /// What was being waited for.
    pub waiting_for: String,
    /// Its last lines of output.
    pub tail: String,
}

impl std::fmt::Display for Exited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited ({}) before printing {:?}; last output:\n{}",
            self.name, self.status, self.waiting_for, self.tail
        )
    }
}

impl std::error::Error for Exited {}

/// A running child process. Dropping it sends SIGTERM, then SIGKILL after a grace period.
pub struct Process {
    name: String,
    child: Mutex<Child>,
    shared: Arc<Shared>,
}

impl Process {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured. Every captured line is echoed
    /// to the test's stderr prefixed with `[name]` (shown by the test runner when a test fails).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let shared = Arc::new(Shared {
            output: Mutex::new(Output { lines: Vec::new(), times: Vec::new(), open: 2 }),
            changed: Condvar::new(),
        });
        let stdout = child.stdout.take().context("stdout not piped")?;
        let stderr = child.stderr.take().context("stderr not piped")?;
        spawn_reader(name, stdout, Arc::clone(&shared))?;
        spawn_reader(name, stderr, Arc::clone(&shared))?;
        Ok(Process { name: name.to_owned(), child: Mutex::new(child), shared })
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// Number of lines captured so far: pass it to [`Process::wait_for_line_since`] to wait for
    /// a line printed after this point.
    pub fn mark(&self) -> usize {
        self.shared.lock().lines.len()
    }

    /// Every line captured so far.
    pub fn lines(&self) -> Vec<String> {
        self.shared.lock().lines.clone()
    }

    /// Waits until a line containing `needle` has been printed (at any time since start).
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line_since(0, needle, timeout)
    }

    /// Waits until a line containing `needle` is printed at or after line number `mark`.
    /// Fails early, with the tail of the output, if the process closes its output (exits).
    pub fn wait_for_line_since(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_line_at(mark, needle, timeout).map(|(_, line)| line)
    }

    /// Like [`Process::wait_for_line_since`], and also returns when the line was read (not
    /// when the wait noticed it), so tests can measure the time between two events.
    pub fn wait_for_line_at(
        &self,
        mark: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        let mut out = self.shared.lock();
        loop {
            if let Some(i) = out.lines.iter().skip(mark).position(|l| l.contains(needle)) {
                let i = mark + i;
                return Ok((out.times[i], out.lines[i].clone()));
            }
            if out.open == 0 {
                let tail = tail(&out.lines);
                drop(out);
                return Err(Exited {
                    name: self.name.clone(),
                    status: self.try_status(),
                    waiting_for: needle.to_owned(),
                    tail,
                }
                .into());
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; last output:\n{}",
                    self.name,
                    tail(&out.lines)
                );
            }
            out = self
                .shared
                .changed
                .wait_timeout(out, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        matches!(self.child().try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (a crash, no clean shutdown) and reaps it.
    pub fn kill(&self) -> Result<ExitStatus> {
        let mut child = self.child();
        if child.try_wait()?.is_none() {
            child.kill().with_context(|| format!("killing {}", self.name))?;
        }
        Ok(child.wait()?)
    }

    /// Sends SIGHUP (a service re-reads its log level), if the process still runs.
    pub fn send_hup(&self) -> Result<()> {
        self.signal("HUP")
    }

    /// Sends SIGTERM (if the process still runs) and returns at once.
    pub fn send_term(&self) -> Result<()> {
        self.signal("TERM")
    }

    /// Sends signal `name` to exactly this PID, if the process still runs.
    fn signal(&self, name: &str) -> Result<()> {
        let pid = self.pid();
        if self.child().try_wait()?.is_none() {
            // No signal crate in the workspace: `kill(1)` signals exactly this PID.
            let status = Command::new("kill")
                .args([format!("-{name}"), pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .with_context(|| format!("running kill -{name} {pid} ({})", self.name))?;
            // kill fails when the process exited meanwhile: nothing left to signal.
            if !status.success() && self.child().try_wait()?.is_none() {
                bail!("kill -{name} {pid} ({}) failed: {status}", self.name);
            }
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the process to exit; kills it after a grace period.
    pub fn terminate(&self) -> Result<ExitStatus> {
        self.send_term()?;
        let deadline = Instant::now() + TERM_GRACE;
        loop {
            if let Some(status) = self.child().try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return self.kill();
            }
            // Polling a child for exit: std offers no wait-with-timeout.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit by itself, killing it after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child().try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.kill();
                bail!("{} still running after {timeout:?}; killed it", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_status(&self) -> String {
        match self.child().try_wait() {
            Ok(Some(s)) => s.to_string(),
            Ok(None) => "output closed, still running".to_owned(),
            Err(e) => format!("status unknown: {e}"),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("[{}] could not stop pid {}: {e:#}", self.name, self.pid());
        }
    }
}

fn spawn_reader(name: &str, stream: impl Read + Send + 'static, shared: Arc<Shared>) -> Result<()> {
    let prefix = name.to_owned();
    std::thread::Builder::new()
        .name(format!("{name}-output"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                        let at = Instant::now();
                        eprintln!("[{prefix}] {line}");
                        let mut out = shared.lock();
                        out.lines.push(line);
                        out.times.push(at);
                        drop(out);
                        shared.changed.notify_all();
                    }
                }
            }
            shared.lock().open -= 1;
            shared.changed.notify_all();
        })
        .with_context(|| format!("starting the output reader of {name}"))?;
    Ok(())
}

fn tail(lines: &[String]) -> String {
    let from = lines.len().saturating_sub(TAIL_LINES);
    lines[from..].join("\n")
}

/// Removes ANSI escape sequences (colour codes) so lines can be matched as plain text even if a
/// binary ignores `NO_COLOR`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_ansi_removes_colour_codes() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m processor p1 connected"),
            "2025  INFO processor p1 connected"
        );
    }

    #[test]
    fn waits_for_a_line_and_reports_an_early_exit() -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; echo two >&2; read _ < /dev/null; echo three"]);
        let p = Process::spawn("sh", cmd)?;
        assert_eq!(p.wait_for_line("two", Duration::from_secs(5))?, "two");
        p.wait_for_line("three", Duration::from_secs(5))?;
        let err = p.wait_for_line("never", Duration::from_secs(5)).expect_err("exited");
        assert!(err.to_string().contains("exited"), "{err:#}");
        Ok(())
    }

    #[test]
    fn drop_terminates_a_running_process() -> Result<()> {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let p = Process::spawn("sleep", cmd)?;
        let pid = p.pid();
        assert!(p.is_running());
        drop(p);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[test]
    fn wait_since_mark_ignores_earlier_lines() -> Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo ready; exec sleep 600"]);
        let p = Process::spawn("sh", cmd)?;
        p.wait_for_line("ready", Duration::from_secs(5))?;
        let mark = p.mark();
        let err = p.wait_for_line_since(mark, "ready", Duration::from_millis(100));
        assert!(err.is_err());
        Ok(())
    }
}
