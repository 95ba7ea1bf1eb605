//! Running a `sipp` scenario from `tests/sipp/` as one more process under test, and reading
//! its verdict: the exit code (0 = every call successful) and the `-trace_stat` counters.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sipmsg::SipMessage;

use crate::process::Process;
use crate::{ports, wait};

/// sipp's own limit on a run (`-timeout`), after which it gives up with an error.
pub const GLOBAL_TIMEOUT_SECS: u32 = 20;

/// Where the scenario files live.
pub fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sipp")
}

/// A sipp run to start.
#[derive(Debug, Clone)]
pub struct SippConfig {
    /// Label for logs and file names.
    pub name: String,
    /// Scenario file name in [`scenario_dir`], e.g. `uas_callee.xml`.
    pub scenario: String,
    /// Local socket (`-i`, `-p`).
    pub local: SocketAddrV4,
    /// Where a UAC sends (`remote_host:port`); `None` for a UAS.
    pub remote: Option<SocketAddr>,
    /// `-key name value` pairs.
    pub keys: Vec<(String, String)>,
    /// Further arguments, e.g. `-inf users.csv`, `-d 500`, `-auth_uri x`.
    pub args: Vec<String>,
}

impl SippConfig {
    /// A run of `scenario` on `local`, one call (`-m 1`).
    pub fn new(name: &str, scenario: &str, local: SocketAddrV4) -> Self {
        SippConfig {
            name: name.to_owned(),
            scenario: scenario.to_owned(),
            local,
            remote: None,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Sets the remote address (UAC).
    pub fn remote(mut self, remote: SocketAddr) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Adds `-key name value`.
    pub fn key(mut self, name: &str, value: impl Into<String>) -> Self {
        self.keys.push((name.to_owned(), value.into()));
        self
    }

    /// Adds raw arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running sipp.
pub struct Sipp {
    process: Process,
    local: SocketAddrV4,
    stat_file: PathBuf,
    error_file: PathBuf,
    message_file: PathBuf,
}

/// How a sipp run ended.
#[derive(Debug)]
pub struct SippOutcome {
    /// sipp's exit status: 0 when every call succeeded.
    pub status: ExitStatus,
    /// The last line of its statistics, by column name.
    pub stats: SippStats,
    /// Its error log (unexpected messages, timeouts), possibly empty.
    pub errors: String,
    /// Its message trace: every message sent and received.
    pub messages: String,
}

impl SippOutcome {
    /// Fails with the error log and message trace unless sipp exited 0 with one successful
    /// call and no failed one.
    pub fn assert_one_successful_call(&self, who: &str) -> Result<()> {
        let ok = self.status.success()
            && self.stats.get("SuccessfulCall(C)") == Some(1)
            && self.stats.get("FailedCall(C)") == Some(0);
        if !ok {
            bail!(
                "sipp {who}: {} successful={:?} failed={:?}\nerrors:\n{}\nmessages:\n{}",
                self.status,
                self.stats.get("SuccessfulCall(C)"),
                self.stats.get("FailedCall(C)"),
                self.errors,
                self.messages
            );
        }
        Ok(())
    }
}

/// Cumulative counters from a `-trace_stat` file (`;`-separated, header line first).
#[derive(Debug, Default, Clone)]
pub struct SippStats {
    columns: HashMap<String, String>,
}

impl SippStats {
    /// Parses the last data line of a statistics file.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().context("empty sipp statistics file")?;
        let last = lines.next_back().context("sipp statistics without data line")?;
        let columns = header
            .split(';')
            .zip(last.split(';'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(SippStats { columns })
    }

    /// A numeric column, e.g. `SuccessfulCall(C)`.
    pub fn get(&self, column: &str) -> Option<u64> {
        self.columns.get(column)?.parse().ok()
    }

    /// A column as text.
    pub fn text(&self, column: &str) -> Option<&str> {
        self.columns.get(column).map(String::as_str)
    }
}

impl Sipp {
    /// Starts sipp for one call (`-m 1`), with statistics, errors and messages traced into
    /// files in `dir`.
    pub fn spawn(dir: &Path, config: SippConfig) -> Result<Self> {
        let file = |what: &str| dir.join(format!("{}.{what}", config.name));
        let (stat_file, error_file, message_file) =
            (file("stat.csv"), file("err.log"), file("msg.log"));
        let mut cmd = Command::new("sipp");
        if let Some(remote) = config.remote {
            cmd.arg(remote.to_string());
        }
        cmd.arg("-sf").arg(scenario_dir().join(&config.scenario));
        cmd.arg("-i").arg(config.local.ip().to_string());
        cmd.arg("-p").arg(config.local.port().to_string());
        // Media socket on the same private IP, on a port of its own.
        cmd.arg("-mp").arg(ports::free_udp_port(*config.local.ip())?.to_string());
        cmd.args(["-m", "1", "-nostdin", "-timeout_error", "-recv_timeout", "10000"]);
        cmd.arg("-timeout").arg(format!("{GLOBAL_TIMEOUT_SECS}s"));
        cmd.args(["-trace_stat", "-fd", "1"]).arg("-stf").arg(&stat_file);
        cmd.arg("-trace_err").arg("-error_file").arg(&error_file);
        cmd.arg("-trace_msg").arg("-message_file").arg(&message_file);
        for (k, v) in &config.keys {
            cmd.arg("-key").arg(k).arg(v);
        }
        cmd.args(&config.args);
        cmd.current_dir(dir);
        let process = Process::spawn(&format!("sipp {}", config.name), cmd)?;
        Ok(Sipp { process, local: config.local, stat_file, error_file, message_file })
    }

    /// Waits until sipp has bound its local UDP socket, so a UAS is ready for calls.
    pub fn wait_listening(&self, timeout: Duration) -> Result<()> {
        wait::until(&format!("sipp to bind {}", self.local), timeout, || {
            if ports::udp_bound(self.local)? {
                return Ok(Some(()));
            }
            if !self.process.is_running() {
                bail!(
                    "sipp exited before binding {}:\n{}",
                    self.local,
                    self.process.lines().join("\n")
                );
            }
            Ok(None)
        })
    }

    /// Waits for sipp to finish (killing it after `timeout`) and collects its verdict.
    pub fn finish(self, timeout: Duration) -> Result<SippOutcome> {
        let status = self.process.wait_exit(timeout)?;
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let stats_text = read(&self.stat_file);
        let stats = SippStats::parse(&stats_text).unwrap_or_default();
        Ok(SippOutcome {
            status,
            stats,
            errors: read(&self.error_file),
            messages: read(&self.message_file),
        })
    }
}

/// The head (start line and headers, body dropped) of the first request with `method` in a
/// sipp message trace (`-trace_msg`), parsed; e.g. to check which socket the cluster sent an
/// INVITE from.
pub fn first_received(messages: &str, method: &str) -> Option<SipMessage> {
    received(messages, method).into_iter().next()
}

/// The heads of every request with `method` in a sipp message trace, in order, parsed.
pub fn received(messages: &str, method: &str) -> Vec<SipMessage> {
    let needle = format!("\n{method} sip:");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = messages[from..].find(&needle) {
        let start = from + at + 1;
        let head: Vec<&str> = messages[start..]
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .take_while(|l| !l.is_empty())
            .filter(|l| {
                !l.to_ascii_lowercase().starts_with("content-length") && !l.starts_with("l:")
            })
            .collect();
        let text = format!("{}\r\nContent-Length: 0\r\n\r\n", head.join("\r\n"));
        if let Ok(m) = sipmsg::parse(text.as_bytes()) {
            out.push(m);
        }
        from = start;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::phone::{Phone, next_loopback_ip};

    const T: Duration = Duration::from_secs(30);

    fn local() -> Result<SocketAddrV4> {
        let ip: Ipv4Addr = next_loopback_ip();
        Ok(SocketAddrV4::new(ip, ports::free_udp_port(ip)?))
    }

    /// The shipped caller and callee scenarios complete a call with each other (no cluster,
    /// so no challenge), and the harness reads their verdicts and traces.
    #[test]
    fn caller_and_callee_scenarios_complete_a_call_directly() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("calls.csv"),
            "SEQUENTIAL\nbob;alice;[authentication username=bob password=pw]\n",
        )?;
        let uas_addr = local()?;
        let uas = Sipp::spawn(dir.path(), SippConfig::new("uas", "uas_callee.xml", uas_addr))?;
        uas.wait_listening(Duration::from_secs(10))?;
        let uac = Sipp::spawn(
            dir.path(),
            SippConfig::new("uac", "uac_call.xml", local()?)
                .remote(SocketAddr::V4(uas_addr))
                .key("domain", "sip.example.net")
                .args(["-inf", "calls.csv", "-d", "200"]),
        )?;
        uac.finish(T)?.assert_one_successful_call("uac")?;
        let uas = uas.finish(T)?;
        uas.assert_one_successful_call("uas")?;
        let invite = first_received(&uas.messages, "INVITE").context("no INVITE in the trace")?;
        assert_eq!(invite.from()?.uri.to_string(), "sip:bob@sip.example.net");
        Ok(())
    }

    /// The shipped REGISTER scenario answers a 401 with credentials whose digest `uri` is the
    /// Request-URI (thanks to `-auth_uri`) and that verify against the password.
    #[test]
    fn register_scenario_answers_the_challenge() -> Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("users.csv"),
            "SEQUENTIAL\nalice;s3cret;[authentication username=alice password=s3cret]\n",
        )?;
        let mut registrar = Phone::new("registrar", "-")?;
        let registrar_addr = registrar.addr();
        let t = Duration::from_secs(10);
        let script = std::thread::spawn(move || -> Result<String> {
            let first = registrar.recv_request("REGISTER", t)?;
            let mut c = SipMessage::response_to(&first.msg, 401, "Unauthorized", Some("t"));
            c.push_header("WWW-Authenticate", "Digest realm=\"voip.oldprovider.example\", nonce=\"n1\", qop=\"auth\", algorithm=MD5");
            registrar.send(&c, first.from)?;
            let second = registrar.recv_request("REGISTER", t)?;
            let auth = second.msg.header("authorization").context("no Authorization")?.to_owned();
            registrar
                .send(&SipMessage::response_to(&second.msg, 200, "OK", Some("t")), second.from)?;
            Ok(auth)
        });
        let reg = Sipp::spawn(
            dir.path(),
            SippConfig::new("reg", "register_auth.xml", local()?)
                .remote(registrar_addr)
                .key("domain", "127.0.0.2")
                .key("contact_hostport", "127.0.0.99:5062")
                .key("expires", "300")
                .args(["-inf", "users.csv", "-auth_uri", "127.0.0.2"]),
        )?;
        let outcome = reg.finish(T)?;
        let auth = script.join().map_err(|_| anyhow::anyhow!("registrar panicked"))??;
        outcome.assert_one_successful_call("register")?;
        let cred = sipmsg::digest::Credentials::parse(&auth)?;
        assert_eq!(cred.uri, "sip:127.0.0.2");
        let ha1 = sipmsg::digest::ha1(
            sipmsg::digest::Algorithm::Md5,
            "alice",
            "voip.oldprovider.example",
            "s3cret",
        );
        let expected = sipmsg::digest::response(
            sipmsg::digest::Algorithm::Md5,
            &ha1,
            &sipmsg::digest::ResponseInput {
                method: "REGISTER",
                uri: &cred.uri,
                nonce: &cred.nonce,
                qop: cred.qop.as_deref(),
                nc: cred.nc.as_deref().unwrap_or_default(),
                cnonce: cred.cnonce.as_deref().unwrap_or_default(),
            },
        );
        assert!(sipmsg::digest::hex_eq(&cred.response, &expected), "{auth}");
        Ok(())
    }

    #[test]
    fn stats_last_line_by_column() -> Result<()> {
        let s = SippStats::parse(
            "StartTime;TotalCallCreated;SuccessfulCall(C);FailedCall(C);\n\
             x;0;0;0;\n\
             y;1;1;0;\n",
        )?;
        assert_eq!(s.get("SuccessfulCall(C)"), Some(1));
        assert_eq!(s.get("FailedCall(C)"), Some(0));
        assert_eq!(s.text("StartTime"), Some("y"));
        Ok(())
    }

    #[test]
    fn first_received_finds_the_request_head() {
        let trace = "----- 2025\nUDP message received [300] bytes :\n\nINVITE sip:alice@127.0.0.21:5062 SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK1\nFrom: <sip:bob@127.0.0.2>;tag=1\n\nv=0\n";
        let head = first_received(trace, "INVITE").expect("found");
        assert_eq!(head.request_uri(), Some("sip:alice@127.0.0.21:5062"));
        assert_eq!(head.top_via().map(|v| v.host).ok().as_deref(), Some("127.0.0.2"));
        assert_eq!(head.from().map(|f| f.uri.host).ok().as_deref(), Some("127.0.0.2"));
        assert!(head.body.is_empty());
    }
}
