//! A real SIP phone for the end-to-end tests: `baresip` (Debian package `baresip-core`), run
//! headless on a loopback address of its own with a private configuration directory.
//!
//! The harness's own [`crate::phone::Phone`] is written against our reading of the RFCs; a
//! phone somebody else wrote catches what that reading missed (e.g. baresip 1.0 gives up with
//! `Function not implemented` on a 401 that offers SHA-256 next to MD5). baresip is driven only
//! through its configuration and observed only through its output: with `-s` it prints every
//! SIP message it sends or receives with the transport, source and destination, which is how
//! the tests see *where* the cluster's requests came from. Every wait is for its output.
//!
//! What a [`Baresip`] writes into its temporary directory (see [`config_text`] and
//! [`account_line`]):
//! - `sip_listen` and `net_interface` on its loopback address: its SIP listeners, Contact and
//!   SDP address are there. Sockets it does not bind (its outgoing TCP/TLS connections, RTP)
//!   get their source address from the kernel: 127.0.0.1, still loopback;
//! - no sound card: source and player are one `aubridge` device (the call's audio echoed),
//!   ring tones go to another one nobody reads; only the G.711 codecs;
//! - no UI (stdin is closed): the `menu` module only prints the call events;
//! - one account, `answermode=auto`, registering through the given cluster socket.
//!
//! baresip 1.0 can place a call without a UI too: `-e "/dial sip:b@127.0.0.78:5098"` types
//! that menu command at start-up (tried by hand); the tests only need it to register and answer.
//!
//! TLS: baresip 1.0 (libre 1.1) does not verify the server's certificate at all; it trusts
//! whatever `sip_cafile` names and connects anyway when the chain does not lead there.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sipmsg::SipMessage;
use tempfile::TempDir;

use crate::phone::{Server, Transport, next_loopback_ip};
use crate::ports;
use crate::process::{Exited, Process};

/// The Debian package that provides the `baresip` command.
pub const PACKAGE: &str = "baresip-core";

/// The command the package installs.
pub const COMMAND: &str = "baresip";

/// Where distributions put baresip's modules; the first holding `g711.so` is used (baresip's
/// own default is the current directory when the config names no `module_path`).
const MODULE_DIRS: [&str; 3] =
    ["/usr/lib/baresip/modules", "/usr/local/lib/baresip/modules", "/usr/lib64/baresip/modules"];

/// How long baresip gets to print that it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Start-up attempts when baresip exits at start (most likely: its port was taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// Attempts at finding a SIP port (UDP and TCP) whose successor is free for TLS too.
const PORT_ATTEMPTS: usize = 32;

/// What a [`Baresip`] registers as, and through where.
#[derive(Debug, Clone)]
pub struct BaresipConfig {
    /// User part of the address of record; also the digest user name.
    pub user: String,
    /// Digest password (`auth_pass`).
    pub password: String,
    /// The cluster socket to register through. Its IP (and port) is the domain of the
    /// address of record, as on a phone configured with the old provider's server IP; its
    /// transport is the account's `transport` parameter.
    pub server: Server,
    /// Registration interval asked for (`regint`, the REGISTER's expiry).
    pub regint: u32,
    /// CA file for TLS (`sip_cafile`): the certificate the cluster presents on `server`, as a
    /// provisioned phone would have it (baresip 1.0 does not check it, see the module docs).
    pub cafile: Option<PathBuf>,
}

impl BaresipConfig {
    /// `user`/`password` registering through `server` for 300 s, no CA file.
    pub fn new(user: &str, password: &str, server: &Server) -> Self {
        BaresipConfig {
            user: user.to_owned(),
            password: password.to_owned(),
            server: server.clone(),
            regint: 300,
            cafile: None,
        }
    }

    /// The same, trusting the certificate in `cafile` for TLS.
    pub fn cafile(mut self, cafile: &Path) -> Self {
        self.cafile = Some(cafile.to_owned());
        self
    }
}

/// One SIP message from baresip's trace (`-s`): which way it went, over what, and its head.
#[derive(Debug, Clone)]
pub struct Traced {
    /// Whether baresip sent it rather than received it (see [`parse_trace`]).
    pub sent: bool,
    /// `UDP`, `TCP` or `TLS`.
    pub transport: String,
    /// Where it came from: the sending socket, or that end of the connection it went on.
    pub src: SocketAddr,
    /// Where it went.
    pub dst: SocketAddr,
    /// The start line and headers, parsed; the body is dropped.
    pub msg: SipMessage,
}

impl Traced {
    /// `METHOD uri` or `status reason` with the addresses, for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{} {} {} -> {}",
            crate::phone::summary(&self.msg),
            self.transport,
            self.src,
            self.dst
        )
    }
}

/// A running baresip with its own configuration directory. Dropping it kills the process (by
/// PID, SIGKILL: a phone pulled from the wall, no de-registration to wait for) and removes the
/// directory.
pub struct Baresip {
    // Field order is drop order: the process before its directory.
    process: Process,
    local: SocketAddrV4,
    config: BaresipConfig,
    dir: TempDir,
}

impl Baresip {
    /// Fails, naming the package, unless the `baresip` command is on `PATH`.
    pub fn check_installed() -> Result<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path).map(|d| d.join(COMMAND)).find(|p| p.is_file()).with_context(
            || {
                format!(
                    "`{COMMAND}` is not installed (not on PATH): install the Debian package \
                     {PACKAGE} (`apt-get install -y {PACKAGE}`; tests/run.sh does so when run \
                     as root)"
                )
            },
        )
    }

    /// Starts baresip on a fresh loopback address (see [`next_loopback_ip`]) with `config`.
    /// It starts registering at once; see [`Baresip::wait_registered`].
    pub fn start(config: BaresipConfig) -> Result<Self> {
        let program = Self::check_installed()?;
        let modules = module_dir()?;
        let mut attempt = 1;
        loop {
            match Self::try_start(&program, &modules, config.clone()) {
                Ok(b) => return Ok(b),
                // Exiting at start-up most likely means another program took the port between
                // our probe and baresip's bind: retry on a new address and port.
                Err(e) if attempt < START_ATTEMPTS && e.downcast_ref::<Exited>().is_some() => {
                    eprintln!("[baresip] start-up attempt {attempt} failed, retrying: {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(program: &Path, modules: &Path, config: BaresipConfig) -> Result<Self> {
        let ip = next_loopback_ip();
        let local = SocketAddrV4::new(ip, sip_port(ip)?);
        let dir = tempfile::Builder::new().prefix("sipalias-baresip-").tempdir()?;
        write(dir.path(), "config", &config_text(local, modules, config.cafile.as_deref()))?;
        write(dir.path(), "accounts", &format!("{}\n", account_line(&config)))?;
        let mut cmd = Command::new(program);
        // -f: only our directory; -s: trace every SIP message (what the tests read).
        cmd.arg("-f").arg(dir.path()).arg("-s");
        // baresip colours its output itself; the process reader strips the escapes.
        let process = Process::spawn(&format!("baresip {}", config.user), cmd)?;
        let me = Baresip { process, local, config, dir };
        me.process.wait_for_line("baresip is ready", START_TIMEOUT)?;
        // baresip starts even when a module or the account is missing, and would then just
        // never register: fail here, with what it said.
        let lines = me.process.lines();
        let missing = lines.iter().find(|l| l.starts_with("module ") && l.contains(": "));
        if missing.is_some() || !lines.iter().any(|l| l.contains("Populated 1 account")) {
            bail!("baresip did not load its modules or account; its output:\n{}", lines.join("\n"));
        }
        Ok(me)
    }

    /// baresip's SIP socket: UDP and TCP on this port, TLS on the next one.
    pub fn addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// The listener of the account's transport: what baresip puts in its Contact and Via.
    pub fn contact_addr(&self) -> SocketAddrV4 {
        match self.config.server.transport {
            Transport::Tls => SocketAddrV4::new(*self.local.ip(), self.local.port() + 1),
            Transport::Udp | Transport::Tcp => self.local,
        }
    }

    /// The account's user.
    pub fn user(&self) -> &str {
        &self.config.user
    }

    /// The process, for raw output waits.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The configuration directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until baresip reports its registration answered with 200
    /// (`1001@127.0.0.2: {0/UDP/v4} 200 OK () [1 binding]`), and returns that line. Fails as
    /// soon as it reports a failed registration, with its output: its warnings start with
    /// `reg: `, e.g. `reg: sip:1001@127.0.0.2:5060: Register: Function not implemented` (a
    /// challenge it could not answer) or `reg: …: 401 Unauthorized ()` (a wrong password).
    pub fn wait_registered(&self, timeout: Duration) -> Result<String> {
        let ok = format!("/{}/v4}} 200 ", self.config.server.transport.via_token());
        self.wait_for_either(&ok, "reg: ", timeout)
            .with_context(|| format!("baresip {} did not register", self.config.user))
    }

    /// Waits until baresip reports an established call (it auto-answers), returning the line.
    pub fn wait_established(&self, timeout: Duration) -> Result<String> {
        self.process.wait_for_line("Call established", timeout)
    }

    /// Waits until baresip reports the call ended: `<peer>: session closed: <reason>` (for a
    /// BYE from the other side the reason is, oddly, `Connection reset by peer`).
    pub fn wait_call_ended(&self, timeout: Duration) -> Result<String> {
        self.process.wait_for_line("session closed", timeout)
    }

    /// Waits until baresip's trace shows it received a request `method`, and returns the first
    /// such request.
    pub fn wait_received_request(&self, method: &str, timeout: Duration) -> Result<Traced> {
        self.wait_traced(&format!("baresip to receive {method}"), timeout, |t| {
            !t.sent && t.msg.method() == Some(method)
        })
    }

    /// Waits until baresip's trace shows it sent a response `status` to a `method` request,
    /// and returns the first such response. The other side may see it before the trace is
    /// read: the network is faster than baresip's output pipe.
    pub fn wait_sent_response(
        &self,
        method: &str,
        status: u16,
        timeout: Duration,
    ) -> Result<Traced> {
        self.wait_traced(&format!("baresip to send {status} to {method}"), timeout, |t| {
            t.sent
                && t.msg.status() == Some(status)
                && t.msg.header("cseq").and_then(|c| c.split_whitespace().nth(1)) == Some(method)
        })
    }

    /// Waits until the trace holds a message satisfying `pred`, and returns the first one.
    pub fn wait_traced(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Traced) -> bool,
    ) -> Result<Traced> {
        crate::wait::until(what, timeout, || {
            if let Some(t) = self.trace()?.into_iter().find(&pred) {
                return Ok(Some(t));
            }
            if !self.process.is_running() {
                bail!("baresip exited:\n{}", self.process.lines().join("\n"));
            }
            Ok(None)
        })
    }

    /// Every SIP message in baresip's trace so far, in order.
    pub fn trace(&self) -> Result<Vec<Traced>> {
        parse_trace(&self.process.lines(), self.local)
    }

    /// Waits for a line containing `good`; fails early on one starting with `bad`.
    fn wait_for_either(&self, good: &str, bad: &str, timeout: Duration) -> Result<String> {
        crate::wait::until(&format!("{good:?} from baresip"), timeout, || {
            let lines = self.process.lines();
            if let Some(l) = lines.iter().find(|l| l.contains(good)) {
                return Ok(Some(l.clone()));
            }
            if let Some(l) = lines.iter().find(|l| l.starts_with(bad)) {
                bail!("baresip printed {l:?}; its output:\n{}", lines.join("\n"));
            }
            if !self.process.is_running() {
                bail!("baresip exited; its output:\n{}", lines.join("\n"));
            }
            Ok(None)
        })
    }
}

impl Drop for Baresip {
    fn drop(&mut self) {
        // SIGTERM would make baresip un-REGISTER and wait for the answer, from a cluster the
        // test may have stopped already; a test has nothing to learn from that.
        if let Err(e) = self.process.kill() {
            eprintln!("[{}] could not kill pid {}: {e:#}", self.process.name(), self.process.pid());
        }
    }
}

/// The `config` file: SIP listeners, Contact and SDP on `local`'s IP, no audio device, no UI
/// but the status lines of the `menu` module (no `stdio`: stdin is closed).
pub fn config_text(local: SocketAddrV4, modules: &Path, cafile: Option<&Path>) -> String {
    let cafile = cafile.map(|c| format!("sip_cafile\t\t{}\n", c.display())).unwrap_or_default();
    format!(
        "# Written by the sipalias end-to-end harness.\n\
         poll_method\t\tepoll\n\
         # UDP and TCP on this port, TLS on the next.\n\
         sip_listen\t\t{local}\n\
         {cafile}\
         # The address put in SDP and Contact; an IP works where an interface name is expected.\n\
         net_interface\t\t{ip}\n\
         call_local_timeout\t30\n\
         call_max_calls\t\t4\n\
         # No sound card: aubridge's device `call` plays what the call receives into its own\n\
         # source (an echo, at whatever rate the codec has). Ring tones go to a device no\n\
         # source reads.\n\
         audio_source\t\taubridge,call\n\
         audio_player\t\taubridge,call\n\
         audio_alert\t\taubridge,alert\n\
         rtp_timeout\t\t0\n\
         module_path\t\t{modules}\n\
         module\t\t\tg711.so\n\
         module\t\t\taubridge.so\n\
         module_tmp\t\taccount.so\n\
         # Prints call events, e.g. `Call established`.\n\
         module_app\t\tmenu.so\n",
        ip = local.ip(),
        modules = modules.display(),
    )
}

/// The `accounts` line: the address of record in the server's IP (and port, as the test
/// cluster's ports are not 5060), its transport, the password, auto-answer and `regint`.
pub fn account_line(config: &BaresipConfig) -> String {
    let BaresipConfig { user, password, server, regint, .. } = config;
    let transport = match server.transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
    };
    format!(
        "<sip:{user}@{addr};transport={transport}>;auth_pass={password};answermode=auto;\
         regint={regint}",
        addr = server.addr,
    )
}

/// A port free for UDP and TCP on `ip` whose successor (baresip's TLS port) is free for TCP.
fn sip_port(ip: Ipv4Addr) -> Result<u16> {
    for _ in 0..PORT_ATTEMPTS {
        let port = ports::free_sip_port_on_all(&[ip])?;
        if port < u16::MAX && std::net::TcpListener::bind((ip, port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no SIP port with a free successor on {ip} after {PORT_ATTEMPTS} attempts")
}

/// The directory of baresip's modules, or an error naming the package.
fn module_dir() -> Result<PathBuf> {
    MODULE_DIRS.iter().map(PathBuf::from).find(|d| d.join("g711.so").is_file()).with_context(|| {
        format!("baresip's modules (g711.so) are in none of {MODULE_DIRS:?}: install {PACKAGE}")
    })
}

fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Whether a traced line is a SIP start line: a status line, or `METHOD uri SIP/2.0`.
fn is_start_line(line: &str) -> bool {
    let line = line.trim_end();
    line.starts_with("SIP/2.0 ") || (line.ends_with(" SIP/2.0") && line.split(' ').count() == 3)
}

/// Parses the SIP trace `baresip -s` prints: for each message a line `#`, a line
/// `TRANSPORT src -> dst`, then the message as sent (CRLF lines; the reader trimmed the CR).
/// Only the head is kept, and only once its closing blank line is there: a message still
/// being read is left out. `local` is baresip's SIP socket (its IP is what matters).
///
/// The trace does not say which way a message went, and the addresses cannot tell either:
/// baresip (libre) does not bind its outgoing TCP/TLS connections to its own IP, so they
/// leave from 127.0.0.1. The top Via can: baresip's requests name `local` there, and so do the
/// responses it receives; what it sends in answer to the cluster names the cluster.
pub fn parse_trace(lines: &[String], local: SocketAddrV4) -> Result<Vec<Traced>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "#" {
            i += 1;
            continue;
        }
        let Some((transport, src, dst)) = lines.get(i + 1).and_then(|l| parse_route(l)) else {
            i += 1;
            continue;
        };
        let rest = &lines[i + 2..];
        let Some(len) = rest.iter().position(|l| l.trim_end().is_empty()) else {
            // The head is still being read from the pipe: the message is not there yet.
            break;
        };
        // baresip's other threads log to the same pipe (e.g. `aubridge: thread start` when a
        // call is answered), sometimes between the route line and the start line: skip to it.
        let start = rest[..len].iter().position(|l| is_start_line(l)).unwrap_or(0);
        let head: Vec<&str> = rest[start..len]
            .iter()
            .map(|l| l.trim_end())
            .filter(|l| {
                let lower = l.to_ascii_lowercase();
                !lower.starts_with("content-length") && !lower.starts_with("l:")
            })
            .collect();
        i += 2 + len;
        let text = format!("{}\r\nContent-Length: 0\r\n\r\n", head.join("\r\n"));
        let msg = sipmsg::parse(text.as_bytes())
            .with_context(|| format!("baresip traced a message that does not parse:\n{text}"))?;
        let via = msg.top_via().context("baresip traced a message without Via")?;
        // Host only: over TLS the sent-by port is the TLS listener's, the next one.
        let via_is_ours = via.host == local.ip().to_string();
        let sent = via_is_ours == msg.method().is_some();
        out.push(Traced { sent, transport, src, dst, msg });
    }
    Ok(out)
}

/// `UDP 127.0.0.2:5060 -> 127.0.0.20:5062` → (transport, src, dst).
fn parse_route(line: &str) -> Option<(String, SocketAddr, SocketAddr)> {
    let mut words = line.split_whitespace();
    let transport = words.next()?;
    let src = words.next()?.parse().ok()?;
    (words.next()? == "->").then_some(())?;
    let dst = words.next()?.parse().ok()?;
    words.next().is_none().then(|| (transport.to_owned(), src, dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_gives_each_message_with_its_route() -> Result<()> {
        let local: SocketAddrV4 = "127.0.0.20:5062".parse()?;
        let lines: Vec<String> = [
            "baresip is ready.",
            "#",
            // libre's connection leaves from 127.0.0.1: the Via tells it is baresip's.
            "TCP 127.0.0.1:40000 -> 127.0.0.2:5060",
            "REGISTER sip:127.0.0.2:5060;transport=tcp SIP/2.0",
            "Via: SIP/2.0/TCP 127.0.0.20:5062;branch=z9hG4bK0;rport",
            "From: <sip:alice@127.0.0.2:5060>;tag=0",
            "To: <sip:alice@127.0.0.2:5060>",
            "Call-ID: r0",
            "CSeq: 1 REGISTER",
            "Content-Length: 0",
            "",
            "",
            "#",
            "TCP 127.0.0.2:5060 -> 127.0.0.1:40000",
            "INVITE sip:alice-0x1@127.0.0.20:5062;transport=tcp SIP/2.0",
            "Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK1",
            "From: <sip:bob@127.0.0.2>;tag=1",
            "To: <sip:alice@127.0.0.2>",
            "Call-ID: c1",
            "CSeq: 1 INVITE",
            "Content-Length: 3",
            "",
            "v=0",
            "Incoming call from: sip:bob@127.0.0.2",
            "#",
            "TCP 127.0.0.1:40000 -> 127.0.0.2:5060",
            // Another thread's log line, written between the route and the message.
            "aubridge: thread start: 8000 Hz, 1 channels, format=S16LE",
            "SIP/2.0 200 OK",
            "Via: SIP/2.0/TCP 127.0.0.2:5060;branch=z9hG4bK1",
            "From: <sip:bob@127.0.0.2>;tag=1",
            "To: <sip:alice@127.0.0.2>;tag=2",
            "Call-ID: c1",
            "CSeq: 1 INVITE",
            "Content-Length: 0",
            "",
        ]
        .map(str::to_owned)
        .to_vec();
        let t = parse_trace(&lines, local)?;
        assert_eq!(t.len(), 3);
        assert!(t[0].sent);
        assert_eq!(t[0].msg.method(), Some("REGISTER"));
        assert!(!t[1].sent);
        assert_eq!(t[1].transport, "TCP");
        assert_eq!(t[1].src, "127.0.0.2:5060".parse::<SocketAddr>()?);
        assert_eq!(t[1].dst, "127.0.0.1:40000".parse::<SocketAddr>()?);
        assert_eq!(t[1].msg.method(), Some("INVITE"));
        assert!(t[2].sent);
        assert_eq!(t[2].msg.status(), Some(200));
        Ok(())
    }

    #[test]
    fn a_message_whose_head_is_not_all_read_is_left_out() -> Result<()> {
        let local: SocketAddrV4 = "127.0.0.20:5062".parse()?;
        let lines: Vec<String> =
            ["#", "UDP 127.0.0.2:5060 -> 127.0.0.20:5062", "BYE sip:a@127.0.0.20:5062 SIP/2.0"]
                .map(str::to_owned)
                .to_vec();
        assert!(parse_trace(&lines, local)?.is_empty());
        Ok(())
    }

    #[test]
    fn account_line_names_the_server_socket_and_transport() -> Result<()> {
        let server = Server {
            addr: "127.0.0.3:5061".parse()?,
            domain: "127.0.0.3".to_owned(),
            transport: Transport::Tls,
        };
        assert_eq!(
            account_line(&BaresipConfig::new("1001", "pw", &server)),
            "<sip:1001@127.0.0.3:5061;transport=tls>;auth_pass=pw;answermode=auto;regint=300"
        );
        Ok(())
    }
}
