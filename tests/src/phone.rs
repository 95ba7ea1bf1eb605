//! A scriptable SIP phone on its own loopback address, over UDP, TCP or TLS.
//!
//! It does what a simple hardware phone does and no more: registers with digest auth, places a
//! call (answering a 401/407 challenge once), answers, ACKs, hangs up, cancels. Everything else
//! is left to the test, which reads each message the phone receives together with the address it
//! came from — the point of the whole suite is asserting *which socket* the cluster used — and,
//! over TCP/TLS, the connection it came on.
//!
//! Over UDP the phone has one socket. Over TCP/TLS ([`crate::stream`]) it connects to the server
//! when it first sends to it and keeps using that connection; it also listens on its Contact
//! address, as a phone must for the cluster to reach it when its own connection is gone.
//! Responses go back on the connection their request came on.
//!
//! Messages arriving while the test waits for something else are kept in arrival order and
//! returned by later receives, so a test never loses a message to a wait for another one.
//! There is no retransmission: on loopback nothing is lost, and a phone that stays silent is
//! exactly what the Timer A test needs.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sipmsg::headers::NameAddr;
use sipmsg::{SipMessage, Uri};

use crate::auth::Challenge;
pub use crate::stream::{Connection, KeepAlive, Transport};
use crate::stream::{Polled, Streams};

/// One step of reading a phone's connections.
enum Step {
    /// A message arrived.
    Message(Box<Incoming>),
    /// Another event (a connection accepted or closed, a keepalive) was recorded.
    Other,
    /// Nothing arrived in time.
    Nothing,
}

/// Where a phone sends its requests: the server socket, its transport, and the domain the
/// phone is configured with (the main domain, or — for a phone of the old provider — the alias
/// IP itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The cluster's socket.
    pub addr: SocketAddr,
    /// The phone's SIP domain: host part of its From/To and of the Request-URI.
    pub domain: String,
    /// The transport of the socket.
    pub transport: Transport,
}

impl Server {
    /// The host part of the server's socket, e.g. `127.0.0.2`.
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.addr, self.transport, self.domain)
    }
}

/// A message a phone received, with where it came from and when.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The parsed message.
    pub msg: SipMessage,
    /// Where it came from: the UDP source address (the cluster socket that sent it), or the
    /// peer of the connection it came on.
    pub from: SocketAddr,
    /// When it arrived (UDP: when the phone read it from its socket).
    pub at: Instant,
    /// The TCP/TLS connection it came on; `None` over UDP.
    pub conn: Option<Connection>,
}

impl Incoming {
    /// `METHOD uri` or `status reason`, for messages in assertions.
    pub fn summary(&self) -> String {
        match &self.conn {
            Some(c) => format!("{} from {} on connection #{}", summary(&self.msg), self.from, c.id),
            None => format!("{} from {}", summary(&self.msg), self.from),
        }
    }
}

/// The outcome of a request that may be challenged: the challenge, if any, and the final answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The 401/407 the first attempt got, if the server challenged.
    pub challenge: Option<Incoming>,
    /// The final response to the last attempt.
    pub response: Incoming,
}

impl Exchange {
    /// Status code of the final response.
    pub fn status(&self) -> u16 {
        self.response.msg.status().unwrap_or_default()
    }

    /// The MD5 challenge of the 401/407, if there was one.
    pub fn md5_challenge(&self) -> Option<Challenge> {
        let c = &self.challenge.as_ref()?.msg;
        Challenge::pick_md5(c.headers_named(challenge_header(c)?)).ok()
    }
}

/// Which side of the call this phone is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The phone placed the call.
    Caller,
    /// The phone answered it.
    Callee,
}

/// The phone's state of one call: the INVITE transaction while it is pending, then the dialog.
#[derive(Debug, Clone)]
pub struct Call {
    /// Which side this phone is.
    pub role: Role,
    /// Call-ID of this leg.
    pub call_id: String,
    /// Our tag.
    pub local_tag: String,
    /// The other side's tag, once known.
    pub remote_tag: Option<String>,
    /// Our URI (From for the caller, To for the callee), without tag.
    pub local_uri: String,
    /// Their URI, without tag.
    pub remote_uri: String,
    /// Where in-dialog requests go (the other side's Contact), once known.
    pub remote_target: Option<String>,
    /// Route set of the dialog.
    pub route_set: Vec<String>,
    /// The server socket the call goes through.
    pub server: SocketAddr,
    /// The challenge the first INVITE got, if any.
    pub challenge: Option<Incoming>,
    /// The INVITE last sent (caller side): CANCEL and non-2xx ACK are built from it.
    invite: Option<SipMessage>,
    /// Our last CSeq number in this dialog.
    cseq: u32,
}

impl Call {
    /// The INVITE last sent (caller side), as sent: what an eavesdropper would have seen.
    pub fn last_invite(&self) -> Option<&SipMessage> {
        self.invite.as_ref()
    }

    /// CSeq number of the pending or answered INVITE (caller side).
    pub fn invite_cseq(&self) -> Option<u32> {
        self.invite.as_ref().and_then(|i| i.cseq().ok()).map(|c| c.seq)
    }
}

/// Loopback addresses handed to phones and sipp instances, 127.0.0.10–249, so that each
/// endpoint of a test has an address of its own, distinct from the cluster's 127.0.0.1–3.
/// The sequence starts at an offset taken from the process id, so test processes running in
/// parallel (nextest) mostly use different addresses too.
pub fn next_loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 240;
    Ipv4Addr::new(127, 0, 0, 10 + n as u8)
}

/// How a phone reaches the cluster.
enum Link {
    Udp(UdpSocket),
    Stream(Box<Streams>),
}

/// A SIP phone with one account.
pub struct Phone {
    user: String,
    password: String,
    link: Link,
    transport: Transport,
    /// The UDP socket's address, or the stream listener's: what the Contact names.
    local: SocketAddr,
    /// RFC 5626 `+sip.instance` and `reg-id` of the REGISTER Contact, if set.
    outbound: Option<(String, u32)>,
    pending: VecDeque<Incoming>,
    register_call_id: String,
    register_cseq: u32,
    /// Our To tag per Call-ID of INVITEs we answer, so 180 and 200 carry the same one.
    uas_tags: HashMap<String, String>,
    /// Extra headers of every INVITE this phone sends ([`Phone::set_invite_headers`]).
    invite_headers: Vec<(String, String)>,
    /// Extra headers of every 2xx this phone answers an INVITE with
    /// ([`Phone::set_answer_headers`]).
    answer_headers: Vec<(String, String)>,
}

impl Phone {
    /// A phone for `user`/`password` on a fresh loopback address (see [`next_loopback_ip`]),
    /// with an ephemeral port.
    pub fn new(user: &str, password: &str) -> Result<Self> {
        Self::bind(user, password, SocketAddr::from((next_loopback_ip(), 0)))
    }

    /// A phone on a fresh loopback address talking `transport`: over UDP as [`Phone::new`];
    /// over TCP/TLS it listens on an ephemeral port of its address (its Contact) and connects
    /// to the server when it first sends to it.
    pub fn with_transport(user: &str, password: &str, transport: Transport) -> Result<Self> {
        Self::bind_with(user, password, SocketAddr::from((next_loopback_ip(), 0)), transport)
    }

    /// A phone with the transport of `server`, on a fresh loopback address.
    pub fn for_server(user: &str, password: &str, server: &Server) -> Result<Self> {
        Self::with_transport(user, password, server.transport)
    }

    /// A UDP phone on a given local address.
    pub fn bind(user: &str, password: &str, addr: SocketAddr) -> Result<Self> {
        Self::bind_with(user, password, addr, Transport::Udp)
    }

    /// A phone on a given local address (for TCP/TLS: its listener's) talking `transport`.
    pub fn bind_with(
        user: &str,
        password: &str,
        addr: SocketAddr,
        transport: Transport,
    ) -> Result<Self> {
        let (link, local) = if transport.is_stream() {
            if addr.port() != 0 {
                bail!("a {transport} phone listens on an ephemeral port, not {addr}");
            }
            let streams = Streams::bind(transport, addr.ip())?;
            let local = streams.listen_addr();
            (Link::Stream(Box::new(streams)), local)
        } else {
            let socket =
                UdpSocket::bind(addr).with_context(|| format!("binding phone to {addr}"))?;
            let local = socket.local_addr()?;
            (Link::Udp(socket), local)
        };
        Ok(Phone {
            user: user.to_owned(),
            password: password.to_owned(),
            link,
            transport,
            local,
            outbound: None,
            pending: VecDeque::new(),
            register_call_id: format!("reg-{}@{}", token(), local.ip()),
            register_cseq: 0,
            uas_tags: HashMap::new(),
            invite_headers: Vec::new(),
            answer_headers: Vec::new(),
        })
    }

    /// The phone's address: its UDP socket (what the cluster should record as `received`), or
    /// over TCP/TLS its listener (its Contact; its connections have ports of their own).
    pub fn addr(&self) -> SocketAddr {
        self.local
    }

    /// The phone's transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The phone's user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The phone's Contact URI: `sip:user@ip:port`, with `;transport=tcp` or `;transport=tls`
    /// over streams.
    pub fn contact_uri(&self) -> String {
        match self.transport {
            Transport::Udp => format!("sip:{}@{}", self.user, self.local),
            t => format!("sip:{}@{};transport={t}", self.user, self.local),
        }
    }

    /// Makes the phone an RFC 5626 client: its REGISTER carries `Supported: outbound` and a
    /// Contact with `;reg-id=<reg_id>;+sip.instance="<instance>"`, which asks the registrar to
    /// reach it only over the connection it registered on (its flow).
    pub fn set_outbound(&mut self, instance: &str, reg_id: u32) {
        self.outbound = Some((instance.to_owned(), reg_id));
    }

    // ----- registration -------------------------------------------------------------------

    /// Registers the phone's Contact through `server` for `expires` seconds, answering one
    /// digest challenge. Returns the final response (200, or the second 401 for a wrong
    /// password, or whatever else the server said).
    pub fn register(&mut self, server: &Server, expires: u32) -> Result<Exchange> {
        self.check_transport(server)?;
        let uri = format!("sip:{}", server.domain);
        let from_tag = token();
        let build = |phone: &mut Phone, auth: Option<String>| {
            phone.register_cseq += 1;
            let mut m = SipMessage::request("REGISTER", uri.clone());
            m.push_header("Via", phone.via());
            m.push_header("Max-Forwards", "70");
            m.push_header("From", format!("<sip:{}@{}>;tag={from_tag}", phone.user, server.domain));
            m.push_header("To", format!("<sip:{}@{}>", phone.user, server.domain));
            m.push_header("Call-ID", phone.register_call_id.clone());
            m.push_header("CSeq", format!("{} REGISTER", phone.register_cseq));
            match &phone.outbound {
                Some((instance, reg_id)) => {
                    m.push_header("Supported", "outbound");
                    m.push_header(
                        "Contact",
                        format!(
                            "<{}>;reg-id={reg_id};+sip.instance=\"{instance}\"",
                            phone.contact_uri()
                        ),
                    );
                }
                None => m.push_header("Contact", format!("<{}>", phone.contact_uri())),
            }
            if let Some(auth) = auth {
                m.push_header("Authorization", auth);
            }
            m.push_header("Expires", expires.to_string());
            m.push_header("User-Agent", "sipalias-e2e-phone");
            m
        };
        let first = build(self, None);
        self.send(&first, server.addr)?;
        let response = self.final_response_to(&first, RESPONSE_TIMEOUT)?;
        let Some(header) = challenge_header(&response.msg) else {
            return Ok(Exchange { challenge: None, response });
        };
        let challenge = Challenge::pick_md5(response.msg.headers_named(header))?;
        let auth = challenge.answer(&self.user, &self.password, "REGISTER", &uri, &token());
        let second = build(self, Some(auth));
        self.send(&second, server.addr)?;
        let last = self.final_response_to(&second, RESPONSE_TIMEOUT)?;
        Ok(Exchange { challenge: Some(response), response: last })
    }

    // ----- calls: caller side -------------------------------------------------------------

    /// Headers added to every INVITE this phone sends from now on (e.g. `Call-Info`).
    pub fn set_invite_headers(&mut self, headers: &[(&str, &str)]) {
        self.invite_headers =
            headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
    }

    /// Headers added to every 2xx this phone answers an INVITE with (e.g. `Session-Expires`).
    pub fn set_answer_headers(&mut self, headers: &[(&str, &str)]) {
        self.answer_headers =
            headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
    }

    /// Calls `callee` (a user name in the server's domain) with `sdp` as offer.
    ///
    /// Waits for the first response above 100. A 401/407 is ACKed and the INVITE re-sent once
    /// with credentials; the returned call then waits for the answer to that second INVITE.
    /// Any other response is left for [`Phone::next_response`] to return.
    pub fn invite(&mut self, server: &Server, callee: &str, sdp: &str) -> Result<Call> {
        self.invite_with(server, callee, sdp, true)
    }

    /// Sends an INVITE and returns at once, without waiting for a challenge: for a caller the
    /// cluster trusts by its address (a trunk), whose INVITE goes straight to the callee, who
    /// must answer before any response above 100 comes back. Read the responses with
    /// [`Phone::next_response`] / [`Phone::final_response`].
    pub fn invite_unchallenged(
        &mut self,
        server: &Server,
        callee: &str,
        sdp: &str,
    ) -> Result<Call> {
        self.invite_with(server, callee, sdp, false)
    }

    fn invite_with(
        &mut self,
        server: &Server,
        callee: &str,
        sdp: &str,
        answer_challenge: bool,
    ) -> Result<Call> {
        self.check_transport(server)?;
        let request_uri = format!("sip:{callee}@{}", server.domain);
        let mut call = Call {
            role: Role::Caller,
            call_id: format!("{}@{}", token(), self.local.ip()),
            local_tag: token(),
            remote_tag: None,
            local_uri: format!("<sip:{}@{}>", self.user, server.domain),
            remote_uri: format!("<sip:{callee}@{}>", server.domain),
            remote_target: None,
            route_set: Vec::new(),
            server: server.addr,
            challenge: None,
            invite: None,
            cseq: 0,
        };
        let build = |phone: &Phone, call: &mut Call, auth: Option<(&str, String)>| {
            call.cseq += 1;
            let mut m = SipMessage::request("INVITE", request_uri.clone());
            m.push_header("Via", phone.via());
            m.push_header("Max-Forwards", "70");
            m.push_header("From", format!("{};tag={}", call.local_uri, call.local_tag));
            m.push_header("To", call.remote_uri.clone());
            m.push_header("Call-ID", call.call_id.clone());
            m.push_header("CSeq", format!("{} INVITE", call.cseq));
            m.push_header("Contact", format!("<{}>", phone.contact_uri()));
            if let Some((name, value)) = auth {
                m.push_header(name, value);
            }
            for (name, value) in &phone.invite_headers {
                m.push_header(name, value.clone());
            }
            m.push_header("User-Agent", "sipalias-e2e-phone");
            m.push_header("Content-Type", "application/sdp");
            m.body = sdp.as_bytes().to_vec().into();
            m
        };
        let first = build(self, &mut call, None);
        self.send(&first, server.addr)?;
        call.invite = Some(first.clone());
        if !answer_challenge {
            return Ok(call);
        }
        let response =
            self.recv_matching(RESPONSE_TIMEOUT, "a response above 100 to the INVITE", |m| {
                responds_to(m, &first) && m.status().is_some_and(|s| s > 100)
            })?;
        let Some(header) = challenge_header(&response.msg) else {
            // Not challenged: leave the response for next_response.
            self.pending.push_front(response);
            return Ok(call);
        };
        self.send(&non_2xx_ack(&first, &response.msg), server.addr)?;
        let challenge = Challenge::pick_md5(response.msg.headers_named(header))?;
        let auth_name =
            if header == "WWW-Authenticate" { "Authorization" } else { "Proxy-Authorization" };
        let value = challenge.answer(&self.user, &self.password, "INVITE", &request_uri, &token());
        let second = build(self, &mut call, Some((auth_name, value)));
        self.send(&second, server.addr)?;
        call.invite = Some(second);
        call.challenge = Some(response);
        Ok(call)
    }

    /// The next response above 100 to the call's INVITE. A non-2xx final response is ACKed
    /// (hop-by-hop, as the transaction layer must); a 2xx establishes the dialog (remote tag,
    /// target and route set) but is not ACKed — call [`Phone::ack`].
    pub fn next_response(&mut self, call: &mut Call, timeout: Duration) -> Result<Incoming> {
        let invite =
            call.invite.clone().context("next_response on a call this phone did not place")?;
        let got = self.recv_matching(timeout, "a response above 100 to the INVITE", |m| {
            responds_to(m, &invite) && m.status().is_some_and(|s| s > 100)
        })?;
        let resp = &got.msg;
        let status = resp.status().unwrap_or_default();
        if status >= 300 {
            self.send(&non_2xx_ack(&invite, resp), call.server)?;
        } else if status >= 200 {
            call.remote_tag = resp.to().ok().and_then(|t| t.tag().map(str::to_owned));
            call.remote_target = first_contact(resp);
            call.route_set =
                resp.header_list("record-route").into_iter().rev().map(str::to_owned).collect();
        }
        Ok(got)
    }

    /// The final response to the call's INVITE (provisional ones skipped), handled as
    /// [`Phone::next_response`] does.
    pub fn final_response(&mut self, call: &mut Call, timeout: Duration) -> Result<Incoming> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let resp = self.next_response(call, left)?;
            if resp.msg.status().is_some_and(|s| s >= 200) {
                return Ok(resp);
            }
        }
    }

    /// ACKs a 2xx: a new transaction to the remote target, through the route set.
    pub fn ack(&mut self, call: &Call) -> Result<SipMessage> {
        let seq = call.invite_cseq().context("ack on a call this phone did not place")?;
        let ack = self.in_dialog_request(call, "ACK", seq);
        self.send(&ack, in_dialog_destination(call))?;
        Ok(ack)
    }

    /// Cancels the pending INVITE. The 200 for the CANCEL and the 487 for the INVITE are left
    /// to the test: [`Phone::final_response_to`] and [`Phone::final_response`].
    pub fn cancel(&mut self, call: &Call) -> Result<SipMessage> {
        let invite = call.invite.as_ref().context("cancel on a call this phone did not place")?;
        let mut cancel = SipMessage::request("CANCEL", invite.request_uri().unwrap_or_default());
        // RFC 3261 §9.1: the INVITE's Request-URI, Via (same branch), Route, From, To and
        // Call-ID; CSeq number the same, method CANCEL.
        cancel.headers = invite
            .headers
            .iter()
            .filter(|h| {
                matches!(
                    h.key.as_str(),
                    "via" | "max-forwards" | "route" | "from" | "to" | "call-id"
                )
            })
            .cloned()
            .collect();
        let seq = call.invite_cseq().unwrap_or_default();
        cancel.set_header("CSeq", format!("{seq} CANCEL"));
        self.send(&cancel, call.server)?;
        Ok(cancel)
    }

    // ----- calls: either side -------------------------------------------------------------

    /// Hangs up an established call and waits for the final response to the BYE. Only when
    /// the other side answers on its own; through the cluster, use [`Phone::send_bye`], let
    /// the other phone answer the relayed BYE, then [`Phone::final_response_to`].
    pub fn bye(&mut self, call: &mut Call, timeout: Duration) -> Result<Incoming> {
        let bye = self.send_bye(call)?;
        self.final_response_to(&bye, timeout)
    }

    /// Sends a BYE in the call's dialog and returns it.
    pub fn send_bye(&mut self, call: &mut Call) -> Result<SipMessage> {
        call.cseq += 1;
        let bye = self.in_dialog_request(call, "BYE", call.cseq);
        self.send(&bye, in_dialog_destination(call))?;
        Ok(bye)
    }

    // ----- calls: callee side -------------------------------------------------------------

    /// Sends a response to a received request, back to the address it came from. Responses to
    /// an INVITE carry the same To tag throughout, and a Contact; `body` is sent as SDP.
    pub fn respond(
        &mut self,
        req: &Incoming,
        status: u16,
        reason: &str,
        body: Option<&str>,
    ) -> Result<SipMessage> {
        let is_invite = req.msg.method() == Some("INVITE");
        let tag = match req.msg.call_id() {
            Ok(id) if is_invite => {
                Some(self.uas_tags.entry(id.to_owned()).or_insert_with(token).clone())
            }
            _ => Some(token()),
        };
        let mut resp = SipMessage::response_to(&req.msg, status, reason, tag.as_deref());
        if is_invite && status < 300 {
            resp.push_header("Contact", format!("<{}>", self.contact_uri()));
            if (200..300).contains(&status) {
                for (name, value) in &self.answer_headers {
                    resp.push_header(name, value.clone());
                }
            }
        }
        if let Some(body) = body {
            resp.push_header("Content-Type", "application/sdp");
            resp.body = body.as_bytes().to_vec().into();
        }
        self.send_reply(&resp, req)?;
        Ok(resp)
    }

    /// Answers an INVITE with a 2xx carrying `sdp` and returns the callee's side of the dialog.
    pub fn answer(
        &mut self,
        invite: &Incoming,
        status: u16,
        reason: &str,
        sdp: &str,
    ) -> Result<Call> {
        if !(200..300).contains(&status) {
            bail!("answer() is for 2xx; use respond() for {status}");
        }
        let resp = self.respond(invite, status, reason, Some(sdp))?;
        let msg = &invite.msg;
        let from = msg.from()?;
        let to = resp.to()?;
        Ok(Call {
            role: Role::Callee,
            call_id: msg.call_id()?.to_owned(),
            local_tag: to.tag().context("our 2xx has no To tag")?.to_owned(),
            remote_tag: from.tag().map(str::to_owned),
            local_uri: without_tag(&to),
            remote_uri: without_tag(&from),
            remote_target: first_contact(msg),
            route_set: msg.header_list("record-route").into_iter().map(str::to_owned).collect(),
            server: invite.from,
            challenge: None,
            invite: None,
            // Our own CSeq space in this dialog; any start value is valid.
            cseq: 100,
        })
    }

    // ----- receiving ----------------------------------------------------------------------

    /// The next message, whatever it is.
    pub fn recv(&mut self, timeout: Duration) -> Result<Incoming> {
        self.recv_matching(timeout, "any message", |_| true)
    }

    /// The next request with this method (other messages are kept for later receives).
    pub fn recv_request(&mut self, method: &str, timeout: Duration) -> Result<Incoming> {
        self.recv_matching(timeout, &format!("a {method} request"), |m| m.method() == Some(method))
    }

    /// The final response (≥ 200) to a request this phone sent.
    pub fn final_response_to(&mut self, req: &SipMessage, timeout: Duration) -> Result<Incoming> {
        let what = format!("a final response to {}", summary(req));
        self.recv_matching(timeout, &what, |m| {
            responds_to(m, req) && m.status().is_some_and(|s| s >= 200)
        })
    }

    /// The next message satisfying `pred`, waiting up to `timeout`. Messages that do not
    /// match are kept, in order, for later receives.
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&SipMessage) -> bool,
    ) -> Result<Incoming> {
        if let Some(i) = self.pending.iter().position(|m| pred(&m.msg)) {
            return self.pending.remove(i).context("pending message vanished");
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_link(left)? {
                Some(m) if pred(&m.msg) => return Ok(m),
                Some(m) => self.pending.push_back(m),
                None => {
                    let seen: Vec<String> = self.pending.iter().map(Incoming::summary).collect();
                    bail!(
                        "phone {} ({}) got no {what} within {timeout:?}; unclaimed messages: {seen:?}",
                        self.user,
                        self.local
                    );
                }
            }
        }
    }

    /// Fails if a message satisfying `pred` is waiting unclaimed or arrives within `window`.
    /// For negative assertions only, e.g. "no 200 ever follows the second 401"; other
    /// messages arriving meanwhile are kept.
    pub fn expect_none(
        &mut self,
        window: Duration,
        pred: impl Fn(&SipMessage) -> bool,
    ) -> Result<()> {
        if let Some(m) = self.pending.iter().find(|m| pred(&m.msg)) {
            bail!("phone {} expected no such message, but has {}", self.user, m.summary());
        }
        let deadline = Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_link(left)? {
                None => return Ok(()),
                Some(m) if pred(&m.msg) => {
                    bail!("phone {} expected no such message, but got {}", self.user, m.summary())
                }
                Some(m) => self.pending.push_back(m),
            }
        }
    }

    /// Drops every message received but not yet claimed, e.g. retransmissions already asserted.
    pub fn discard_pending(&mut self) -> Vec<Incoming> {
        self.pending.drain(..).collect()
    }

    // ----- sending ------------------------------------------------------------------------

    /// Sends a message to `to`.
    pub fn send(&mut self, msg: &SipMessage, to: SocketAddr) -> Result<()> {
        let bytes = msg.to_bytes();
        eprintln!(
            "[phone {} {}] >> to {to}\n{}",
            self.user,
            self.local,
            String::from_utf8_lossy(&bytes).trim_end()
        );
        self.send_raw(&bytes, to)
    }

    /// Sends arbitrary bytes (garbage, truncated messages) to `to`. Over TCP/TLS they go on
    /// the first open connection to `to`, which is opened if there is none.
    pub fn send_raw(&mut self, bytes: &[u8], to: SocketAddr) -> Result<()> {
        match &mut self.link {
            Link::Udp(socket) => {
                socket.send_to(bytes, to).with_context(|| format!("sending to {to}"))?;
            }
            Link::Stream(streams) => {
                let conn = match streams.open_to(to) {
                    Some(c) => c,
                    None => streams.connect(to)?,
                };
                streams.write(conn.id, bytes)?;
            }
        }
        Ok(())
    }

    /// Sends a message on connection `id`.
    pub fn send_on(&mut self, msg: &SipMessage, id: u64) -> Result<()> {
        let bytes = msg.to_bytes();
        eprintln!(
            "[phone {} {}] >> on connection #{id}\n{}",
            self.user,
            self.local,
            String::from_utf8_lossy(&bytes).trim_end()
        );
        self.send_raw_on(id, &bytes)
    }

    /// Sends arbitrary bytes (a pong, garbage, a refused head) on connection `id`.
    pub fn send_raw_on(&mut self, id: u64, bytes: &[u8]) -> Result<()> {
        self.streams_mut()?.write(id, bytes)
    }

    /// Sends a response back the way `req` came: on its connection, or to its source address.
    fn send_reply(&mut self, resp: &SipMessage, req: &Incoming) -> Result<()> {
        match req.conn {
            Some(c) => self.send_on(resp, c.id),
            None => self.send(resp, req.from),
        }
    }

    /// A fresh top Via naming this phone's socket (over streams: its listener), with `rport`
    /// (RFC 3581).
    pub fn via(&self) -> String {
        format!(
            "SIP/2.0/{} {};branch=z9hG4bK{};rport",
            self.transport.via_token(),
            self.local,
            token()
        )
    }

    fn check_transport(&self, server: &Server) -> Result<()> {
        if server.transport != self.transport {
            bail!("phone {} talks {}, the server {server} does not", self.user, self.transport);
        }
        Ok(())
    }

    // ----- connections (TCP/TLS) ----------------------------------------------------------

    fn streams_mut(&mut self) -> Result<&mut Streams> {
        match &mut self.link {
            Link::Stream(s) => Ok(s),
            Link::Udp(_) => bail!("phone {} is a UDP phone: it has no connections", self.user),
        }
    }

    fn streams(&self) -> Result<&Streams> {
        match &self.link {
            Link::Stream(s) => Ok(s),
            Link::Udp(_) => bail!("phone {} is a UDP phone: it has no connections", self.user),
        }
    }

    /// Opens a new connection to `to` (TLS: with a handshake), whatever is open already.
    pub fn connect(&mut self, to: SocketAddr) -> Result<Connection> {
        let conn = self.streams_mut()?.connect(to)?;
        eprintln!("[phone {} {}] {conn} opened", self.user, self.local);
        Ok(conn)
    }

    /// The open connection the phone uses for `to`, if any.
    pub fn connection_to(&self, to: SocketAddr) -> Option<Connection> {
        self.streams().ok()?.open_to(to)
    }

    /// Every connection the phone has had, opened or accepted, in order; events that have
    /// arrived meanwhile are taken into account (messages are kept for later receives).
    pub fn connections(&mut self) -> Result<Vec<Connection>> {
        self.pump(Duration::ZERO)?;
        Ok(self.streams()?.all().to_vec())
    }

    /// The certificate the server presented on TLS connection `id` (DER).
    pub fn peer_certificate(&self, id: u64) -> Option<Vec<u8>> {
        self.streams().ok()?.peer_certificate(id).map(<[u8]>::to_vec)
    }

    /// Whether connection `id` is still open, as far as the phone has seen.
    pub fn is_open(&mut self, id: u64) -> Result<bool> {
        self.pump(Duration::ZERO)?;
        Ok(self.streams()?.is_open(id))
    }

    /// Closes connection `id` from the phone's side (TLS close_notify, then FIN) and waits
    /// until the cluster has closed its side too.
    pub fn close_connection(&mut self, id: u64, timeout: Duration) -> Result<()> {
        self.streams_mut()?.shutdown(id)?;
        self.wait_closed(id, timeout).map(|_| ())
    }

    /// Waits until connection `id` is closed (by the cluster, or after
    /// [`Phone::close_connection`]); returns how it closed.
    pub fn wait_closed(&mut self, id: u64, timeout: Duration) -> Result<String> {
        self.wait_stream(&format!("connection #{id} to close"), timeout, |s| {
            s.closed_reason(id).map(str::to_owned)
        })
    }

    /// The next connection the cluster opened to the phone's listener (not yet returned).
    pub fn wait_accepted(&mut self, timeout: Duration) -> Result<Connection> {
        self.wait_stream("a connection to the phone's listener", timeout, Streams::take_accepted)
    }

    /// Fails if the cluster opens a connection to the phone's listener within `window` (or
    /// has opened one not yet returned by [`Phone::wait_accepted`]). Negative assertions only.
    pub fn expect_no_connection(&mut self, window: Duration) -> Result<()> {
        self.pump(window)?;
        if let Some(c) = self.streams_mut()?.take_accepted() {
            bail!("phone {} expected no connection from the cluster, but got {c}", self.user);
        }
        Ok(())
    }

    /// The next CRLF keepalive the cluster sent (ping or pong), not yet returned.
    pub fn recv_keepalive(&mut self, timeout: Duration) -> Result<KeepAlive> {
        self.wait_stream("a CRLF keepalive", timeout, Streams::take_keepalive)
    }

    /// Handles stream events for `window` (zero: those already arrived), keeping messages.
    fn pump(&mut self, window: Duration) -> Result<()> {
        let deadline = Instant::now() + window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.poll_stream(left)? {
                Step::Message(m) => self.pending.push_back(*m),
                Step::Other => {}
                Step::Nothing => return Ok(()),
            }
        }
    }

    /// Handles stream events until `check` finds what it looks for, or `timeout` passes.
    /// Messages arriving meanwhile are kept for later receives.
    fn wait_stream<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut Streams) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check(self.streams_mut()?) {
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("phone {} ({}) saw no {what} within {timeout:?}", self.user, self.local);
            }
            if let Step::Message(m) = self.poll_stream(left)? {
                self.pending.push_back(*m);
            }
        }
    }

    /// Waits up to `timeout` for one stream event and handles it. A message that does not
    /// parse is reported and dropped: the cluster never should send one.
    fn poll_stream(&mut self, timeout: Duration) -> Result<Step> {
        let log = format!("{} {}", self.user, self.local);
        let (conn, bytes, at) = match self.streams_mut()?.poll(timeout, &log) {
            Polled::Message(conn, bytes, at) => (conn, bytes, at),
            Polled::Other => return Ok(Step::Other),
            Polled::Nothing => return Ok(Step::Nothing),
        };
        let text = String::from_utf8_lossy(&bytes);
        eprintln!("[phone {log}] << on {conn}\n{}", text.trim_end());
        match sipmsg::parse(&bytes) {
            Ok(msg) => {
                Ok(Step::Message(Box::new(Incoming { msg, from: conn.peer, at, conn: Some(conn) })))
            }
            Err(e) => {
                eprintln!("[phone {log}] unparseable message on {conn}: {e}");
                Ok(Step::Other)
            }
        }
    }

    fn in_dialog_request(&self, call: &Call, method: &str, seq: u32) -> SipMessage {
        let target = call.remote_target.clone().unwrap_or_else(|| {
            NameAddr::parse(&call.remote_uri).map(|n| n.uri.to_string()).unwrap_or_default()
        });
        let mut m = SipMessage::request(method, target);
        m.push_header("Via", self.via());
        m.push_header("Max-Forwards", "70");
        for r in &call.route_set {
            m.push_header("Route", r.clone());
        }
        m.push_header("From", format!("{};tag={}", call.local_uri, call.local_tag));
        let to = match &call.remote_tag {
            Some(tag) => format!("{};tag={tag}", call.remote_uri),
            None => call.remote_uri.clone(),
        };
        m.push_header("To", to);
        m.push_header("Call-ID", call.call_id.clone());
        m.push_header("CSeq", format!("{seq} {method}"));
        m
    }

    /// The next message from the socket or any connection, parsed; `None` on timeout.
    /// Unparseable messages are reported and skipped: the cluster never should send one.
    fn read_link(&mut self, timeout: Duration) -> Result<Option<Incoming>> {
        let deadline = Instant::now() + timeout;
        if self.transport.is_stream() {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.poll_stream(left)? {
                    Step::Message(m) => return Ok(Some(*m)),
                    Step::Other => {}
                    Step::Nothing => return Ok(None),
                }
            }
        }
        let Link::Udp(socket) = &self.link else { bail!("a UDP phone without its socket") };
        let mut buf = vec![0u8; 65_535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            socket.set_read_timeout(Some(left))?;
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) => return Err(e).context("receiving"),
            };
            let at = Instant::now();
            let text = String::from_utf8_lossy(&buf[..n]);
            eprintln!("[phone {} {}] << from {from}\n{}", self.user, self.local, text.trim_end());
            match sipmsg::parse(&buf[..n]) {
                Ok(msg) => return Ok(Some(Incoming { msg, from, at, conn: None })),
                Err(e) => eprintln!("[phone {}] unparseable datagram from {from}: {e}", self.user),
            }
        }
    }
}

/// How long a phone waits for the cluster to answer one of its requests.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A minimal SDP offer/answer; `name` makes each side's body recognisable.
pub fn sdp(name: &str, ip: IpAddr, port: u16) -> String {
    format!(
        "v=0\r\no={name} 2890844526 2890844526 IN IP4 {ip}\r\ns={name}\r\nc=IN IP4 {ip}\r\n\
         t=0 0\r\nm=audio {port} RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    )
}

/// `METHOD uri` or `status reason`.
pub fn summary(m: &SipMessage) -> String {
    match (m.method(), m.status()) {
        (Some(method), _) => {
            format!(
                "{method} {} (Call-ID {})",
                m.request_uri().unwrap_or_default(),
                m.call_id().unwrap_or("-")
            )
        }
        (None, Some(status)) => format!(
            "{status} {} ({}, Call-ID {})",
            m.reason().unwrap_or_default(),
            m.header("cseq").unwrap_or("-"),
            m.call_id().unwrap_or("-")
        ),
        (None, None) => "?".to_owned(),
    }
}

/// Whether `resp` is a response to `req`: same Call-ID, same CSeq number and method, and the
/// top Via branch of our request.
fn responds_to(resp: &SipMessage, req: &SipMessage) -> bool {
    if resp.is_request() {
        return false;
    }
    let same_call = matches!((resp.call_id(), req.call_id()), (Ok(a), Ok(b)) if a == b);
    let same_cseq = matches!((resp.cseq(), req.cseq()), (Ok(a), Ok(b)) if a == b);
    let branch = |m: &SipMessage| m.top_via().ok().and_then(|v| v.branch().map(str::to_owned));
    same_call && same_cseq && branch(resp) == branch(req)
}

/// The header carrying the challenge of a 401/407, if `resp` is one.
fn challenge_header(resp: &SipMessage) -> Option<&'static str> {
    match resp.status() {
        Some(401) => Some("WWW-Authenticate"),
        Some(407) => Some("Proxy-Authenticate"),
        _ => None,
    }
}

/// The ACK for a non-2xx final response: part of the INVITE transaction (RFC 3261 §17.1.1.3).
fn non_2xx_ack(invite: &SipMessage, resp: &SipMessage) -> SipMessage {
    let mut ack = SipMessage::request("ACK", invite.request_uri().unwrap_or_default());
    if let Some(via) = invite.header_list("via").first() {
        ack.push_header("Via", *via);
    }
    ack.push_header("Max-Forwards", "70");
    for r in invite.headers_named("route") {
        ack.push_header("Route", r);
    }
    for (name, source) in [("From", invite), ("To", resp), ("Call-ID", invite)] {
        if let Some(v) = source.header(name) {
            ack.push_header(name, v);
        }
    }
    let seq = invite.cseq().map(|c| c.seq).unwrap_or_default();
    ack.push_header("CSeq", format!("{seq} ACK"));
    ack
}

/// The URI of the first Contact.
fn first_contact(m: &SipMessage) -> Option<String> {
    m.contacts().ok()?.into_iter().next().map(|c| c.uri.to_string())
}

/// A name-addr rendered without its tag parameter.
fn without_tag(n: &NameAddr) -> String {
    let mut n = n.clone();
    n.params.retain(|(k, _)| !k.eq_ignore_ascii_case("tag"));
    n.to_string()
}

/// Where an in-dialog request goes (RFC 3261 §12.2.1.1 with §8.1.2): the first route, else the
/// remote target; the server socket when either names a host that is not an IP address.
fn in_dialog_destination(call: &Call) -> SocketAddr {
    let next_hop = call
        .route_set
        .first()
        .and_then(|r| NameAddr::parse(r).ok().map(|n| n.uri))
        .or_else(|| call.remote_target.as_deref().and_then(|t| Uri::parse(t).ok()));
    match next_hop {
        Some(uri) => match uri.host.parse::<IpAddr>() {
            Ok(ip) => {
                let tls = uri.scheme == "sips" || uri.param("transport") == Some("tls");
                SocketAddr::new(ip, uri.port.unwrap_or(if tls { 5061 } else { 5060 }))
            }
            Err(_) => call.server,
        },
        None => call.server,
    }
}

/// A random token for tags, branches, Call-IDs and cnonces.
fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    //! The phone against itself and against a scripted peer on loopback: no cluster needed.

    use std::thread::JoinHandle;

    use sipmsg::digest::{self, Algorithm, Credentials, ResponseInput};

    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// Checks digest credentials the way the cluster does: recompute from the password.
    fn verify(header: &str, method: &str, password: &str) -> Result<bool> {
        let c = Credentials::parse(header)?;
        let ha1 = digest::ha1(Algorithm::Md5, &c.username, &c.realm, password);
        let expected = digest::response(
            Algorithm::Md5,
            &ha1,
            &ResponseInput {
                method,
                uri: &c.uri,
                nonce: &c.nonce,
                qop: c.qop.as_deref(),
                nc: c.nc.as_deref().unwrap_or_default(),
                cnonce: c.cnonce.as_deref().unwrap_or_default(),
            },
        );
        Ok(digest::hex_eq(&c.response, &expected))
    }

    fn peer(
        script: impl FnOnce(&mut Phone) -> Result<()> + Send + 'static,
    ) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
        peer_with(Transport::Udp, script)
    }

    fn peer_with(
        transport: Transport,
        script: impl FnOnce(&mut Phone) -> Result<()> + Send + 'static,
    ) -> Result<(SocketAddr, JoinHandle<Result<()>>)> {
        let mut p = Phone::with_transport("alice", "s3cret", transport)?;
        let addr = p.addr();
        Ok((addr, std::thread::spawn(move || script(&mut p))))
    }

    fn join(h: JoinHandle<Result<()>>) -> Result<()> {
        h.join().map_err(|_| anyhow::anyhow!("peer thread panicked"))?
    }

    #[test]
    fn register_answers_the_md5_challenge_among_several() -> Result<()> {
        let (addr, registrar) = peer(|r| {
            let first = r.recv_request("REGISTER", T)?;
            assert!(first.msg.header("authorization").is_none());
            let mut c = SipMessage::response_to(&first.msg, 401, "Unauthorized", Some("t"));
            c.push_header(
                "WWW-Authenticate",
                "Digest realm=\"old\", nonce=\"n1\", qop=\"auth\", algorithm=SHA-256",
            );
            c.push_header(
                "WWW-Authenticate",
                "Digest realm=\"old\", nonce=\"n2\", qop=\"auth\", algorithm=MD5",
            );
            r.send(&c, first.from)?;
            let second = r.recv_request("REGISTER", T)?;
            let auth = second.msg.header("authorization").context("no Authorization")?;
            assert!(auth.contains("nonce=\"n2\""), "{auth}");
            assert!(verify(auth, "REGISTER", "s3cret")?, "{auth}");
            assert_eq!(second.msg.call_id()?, first.msg.call_id()?);
            assert_eq!(second.msg.cseq()?.seq, first.msg.cseq()?.seq + 1);
            let mut ok = SipMessage::response_to(&second.msg, 200, "OK", Some("t"));
            ok.push_header(
                "Contact",
                format!("{};expires=300", second.msg.header("contact").unwrap_or_default()),
            );
            r.send(&ok, second.from)?;
            Ok(())
        })?;
        let mut phone = Phone::new("alice", "s3cret")?;
        let server = Server { addr, domain: "127.0.0.2".into(), transport: Transport::Udp };
        let ex = phone.register(&server, 300)?;
        join(registrar)?;
        assert_eq!(ex.status(), 200);
        assert_eq!(ex.response.from, addr);
        assert_eq!(ex.md5_challenge().map(|c| c.nonce), Some("n2".into()));
        Ok(())
    }

    #[test]
    fn call_answered_acked_and_hung_up_between_two_phones() -> Result<()> {
        let (addr, callee) = peer(|a| {
            let inv = a.recv_request("INVITE", T)?;
            assert_eq!(inv.msg.body.as_ref(), sdp("bob", inv.from.ip(), 4000).as_bytes());
            a.respond(&inv, 180, "Ringing", None)?;
            let mut call = a.answer(&inv, 200, "OK", &sdp("alice", a.addr().ip(), 5000))?;
            let ack = a.recv_request("ACK", T)?;
            assert_eq!(ack.msg.call_id()?, call.call_id);
            assert_eq!(ack.msg.to()?.tag(), Some(call.local_tag.as_str()));
            // The callee hangs up: its BYE goes to the caller's Contact.
            let resp = a.bye(&mut call, T)?;
            assert_eq!(resp.msg.status(), Some(200));
            Ok(())
        })?;
        let mut b = Phone::new("bob", "pw")?;
        let server = Server { addr, domain: addr.ip().to_string(), transport: Transport::Udp };
        let mut call = b.invite(&server, "alice", &sdp("bob", b.addr().ip(), 4000))?;
        assert!(call.challenge.is_none());
        let ringing = b.next_response(&mut call, T)?;
        assert_eq!(ringing.msg.status(), Some(180));
        let ok = b.final_response(&mut call, T)?;
        assert_eq!(ok.msg.body.as_ref(), sdp("alice", addr.ip(), 5000).as_bytes());
        assert_eq!(call.remote_target.as_deref(), Some(format!("sip:alice@{addr}").as_str()));
        b.ack(&call)?;
        let bye = b.recv_request("BYE", T)?;
        assert_eq!(bye.msg.request_uri(), Some(b.contact_uri().as_str()));
        b.respond(&bye, 200, "OK", None)?;
        join(callee)
    }

    fn call_between_two_stream_phones(transport: Transport) -> Result<()> {
        let (addr, callee) = peer_with(transport, move |a| {
            let inv = a.recv_request("INVITE", T)?;
            let conn = inv.conn.context("INVITE came on no connection")?;
            assert!(conn.accepted && conn.local == a.addr(), "{conn}");
            assert_eq!(inv.msg.top_via()?.transport, transport.via_token());
            let mut call = a.answer(&inv, 200, "OK", &sdp("alice", a.addr().ip(), 5000))?;
            let ack = a.recv_request("ACK", T)?;
            assert_eq!(ack.conn, Some(conn), "the ACK reuses the caller's connection");
            // The callee's BYE goes to the caller's Contact: its listener, on a new connection.
            let resp = a.bye(&mut call, T)?;
            assert_eq!(resp.msg.status(), Some(200));
            let back = resp.conn.context("200 came on no connection")?;
            assert!(!back.accepted && back.peer != conn.peer, "{back}");
            assert_eq!(a.connections()?, vec![conn, back]);
            Ok(())
        })?;
        let mut b = Phone::with_transport("bob", "pw", transport)?;
        let server = Server { addr, domain: addr.ip().to_string(), transport };
        let mut call = b.invite(&server, "alice", &sdp("bob", b.addr().ip(), 4000))?;
        let ok = b.final_response(&mut call, T)?;
        let conn = ok.conn.context("200 came on no connection")?;
        assert_eq!((conn.peer, conn.accepted), (addr, false));
        assert_eq!(b.connection_to(addr), Some(conn));
        assert_eq!(
            call.remote_target.as_deref(),
            Some(format!("sip:alice@{addr};transport={transport}").as_str())
        );
        b.ack(&call)?;
        let bye = b.recv_request("BYE", T)?;
        assert!(bye.conn.is_some_and(|c| c.accepted), "{}", bye.summary());
        b.respond(&bye, 200, "OK", None)?;
        join(callee)
    }

    #[test]
    fn tcp_call_between_two_phones_answers_on_the_connection_requests_came_on() -> Result<()> {
        call_between_two_stream_phones(Transport::Tcp)
    }

    #[test]
    fn tls_call_between_two_phones_answers_on_the_connection_requests_came_on() -> Result<()> {
        call_between_two_stream_phones(Transport::Tls)
    }

    #[test]
    fn a_phone_refuses_a_server_of_another_transport() -> Result<()> {
        let mut p = Phone::with_transport("bob", "pw", Transport::Tcp)?;
        let udp = Server {
            addr: SocketAddr::from(([127, 0, 0, 1], 5060)),
            domain: "x".into(),
            transport: Transport::Udp,
        };
        assert!(p.register(&udp, 300).is_err());
        assert!(p.connections()?.is_empty(), "nothing was sent");
        Ok(())
    }

    #[test]
    fn invite_challenge_is_acked_and_answered_and_reason_phrase_kept() -> Result<()> {
        let (addr, proxy) = peer(|p| {
            let first = p.recv_request("INVITE", T)?;
            let mut c = SipMessage::response_to(
                &first.msg,
                407,
                "Proxy Authentication Required",
                Some("x"),
            );
            c.push_header(
                "Proxy-Authenticate",
                "Digest realm=\"sip.example.net\", nonce=\"n\", qop=\"auth\", algorithm=MD5",
            );
            p.send(&c, first.from)?;
            let ack = p.recv_request("ACK", T)?;
            assert_eq!(ack.msg.top_via()?.branch(), first.msg.top_via()?.branch());
            assert_eq!(ack.msg.cseq()?.seq, first.msg.cseq()?.seq);
            let second = p.recv_request("INVITE", T)?;
            let auth =
                second.msg.header("proxy-authorization").context("no Proxy-Authorization")?;
            assert!(verify(auth, "INVITE", "pw")?, "{auth}");
            p.respond(&second, 486, "Busy Here Now", None)?;
            let ack = p.recv_request("ACK", T)?;
            assert_eq!(ack.msg.cseq()?.seq, second.msg.cseq()?.seq);
            Ok(())
        })?;
        let mut b = Phone::new("bob", "pw")?;
        let server = Server { addr, domain: "sip.example.net".into(), transport: Transport::Udp };
        let mut call = b.invite(&server, "alice", &sdp("bob", b.addr().ip(), 4000))?;
        assert_eq!(call.challenge.as_ref().and_then(|c| c.msg.status()), Some(407));
        let busy = b.final_response(&mut call, T)?;
        assert_eq!(busy.msg.status(), Some(486));
        assert_eq!(busy.msg.reason(), Some("Busy Here Now"));
        join(proxy)
    }

    #[test]
    fn cancel_gets_200_and_the_invite_487() -> Result<()> {
        let (addr, callee) = peer(|a| {
            let inv = a.recv_request("INVITE", T)?;
            a.respond(&inv, 180, "Ringing", None)?;
            let cancel = a.recv_request("CANCEL", T)?;
            assert_eq!(cancel.msg.top_via()?.branch(), inv.msg.top_via()?.branch());
            assert_eq!(cancel.msg.request_uri(), inv.msg.request_uri());
            a.respond(&cancel, 200, "OK", None)?;
            a.respond(&inv, 487, "Request Terminated", None)?;
            a.recv_request("ACK", T)?;
            Ok(())
        })?;
        let mut b = Phone::new("bob", "pw")?;
        let server = Server { addr, domain: addr.ip().to_string(), transport: Transport::Udp };
        let mut call = b.invite(&server, "alice", &sdp("bob", b.addr().ip(), 4000))?;
        assert_eq!(b.next_response(&mut call, T)?.msg.status(), Some(180));
        let cancel = b.cancel(&call)?;
        assert_eq!(b.final_response_to(&cancel, T)?.msg.status(), Some(200));
        assert_eq!(b.final_response(&mut call, T)?.msg.status(), Some(487));
        join(callee)
    }

    #[test]
    fn messages_arriving_out_of_turn_are_kept_for_later() -> Result<()> {
        let mut a = Phone::new("alice", "pw")?;
        let mut b = Phone::new("bob", "pw")?;
        let mut opt = SipMessage::request("OPTIONS", a.contact_uri());
        opt.push_header("Via", b.via());
        opt.push_header("Call-ID", "c1");
        opt.push_header("CSeq", "1 OPTIONS");
        let mut info = opt.clone();
        info.start = sipmsg::StartLine::Request { method: "INFO".into(), uri: a.contact_uri() };
        b.send(&opt, a.addr())?;
        b.send(&info, a.addr())?;
        assert_eq!(a.recv_request("INFO", T)?.from, b.addr());
        assert_eq!(a.recv(T)?.msg.method(), Some("OPTIONS"));
        a.expect_none(Duration::from_millis(50), |_| true)?;
        Ok(())
    }
}
