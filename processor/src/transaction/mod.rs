//! The SIP transaction layer (RFC 3261 §17, with the RFC 6026 Accepted states), sans-IO.
//!
//! [`TransactionLayer`] knows no sockets and no clock: messages go in through
//! [`handle_request`](TransactionLayer::handle_request),
//! [`handle_response`](TransactionLayer::handle_response), [`respond`](TransactionLayer::respond)
//! and [`start_client`](TransactionLayer::start_client); time goes in through
//! [`handle_timeout`](TransactionLayer::handle_timeout) at the instant
//! [`poll_timeout`](TransactionLayer::poll_timeout) asks for. What comes out is drained with
//! [`poll_transmit`](TransactionLayer::poll_transmit) (bytes for the dispatcher) and
//! [`poll_event`](TransactionLayer::poll_event) (work for the transaction user, the TU).
//!
//! Retransmissions (Timers A, E, G and the 2xx retransmission of RFC 6026) only happen on
//! unreliable transports, and the "linger" timers that absorb retransmissions (D, I, J, K) are
//! zero on reliable ones, so a TCP or TLS transaction is removed as soon as it completes. Timers L
//! and M keep their 64*T1 on every transport: they also catch a 2xx's ACK and forked 2xx responses,
//! which reliability does not make disappear.
//!
//! Things the layer drops silently, by design:
//! - a response that matches no client transaction (RFC 3261 §17.1.3): a stray or late response
//!   never reaches the TU; a 2xx arriving after Timer M has the same fate;
//! - a message without a parseable top Via (it cannot be matched or answered);
//! - an ACK that matches an INVITE server transaction that has not sent a final response yet.

mod client;
mod server;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sipmsg::SipMessage;

use crate::transport::{Egress, Ingress, Transmit};

use client::ClientTx;
use server::{AckOutcome, ServerTx};

/// The RFC 3261 branch prefix; a branch without it comes from an RFC 2543 element.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// Timer D on an unreliable transport (RFC 3261 §17.1.1.2: "at least 32 seconds").
const TIMER_D: Duration = Duration::from_secs(32);

/// The base timer values of RFC 3261 §17 (Table 4); every other timer derives from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate: first retransmission interval.
    pub t1: Duration,
    /// Maximum retransmission interval for non-INVITE requests and INVITE responses.
    pub t2: Duration,
    /// Maximum time a message stays in the network.
    pub t4: Duration,
    /// Timer C (RFC 3261 §16.6 step 11): longest a callee may answer only provisionally,
    /// restarted by each provisional. The B2BUA applies it to its callee legs.
    pub timer_c: Duration,
    /// Longest a call may ring in all (`no_answer_timeout_secs`), if limited.
    pub no_answer: Option<Duration>,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            timer_c: Duration::from_secs(185),
            no_answer: None,
        }
    }
}

impl Timers {
    /// 64*T1: Timers B, F, H, J, L and M.
    fn t1x64(&self) -> Duration {
        self.t1.saturating_mul(64)
    }
}

/// Identifies a server transaction (RFC 3261 §17.2.3): the top Via's branch and sent-by, and the
/// method, with ACK counted as INVITE so that the ACK for a non-2xx response finds its INVITE.
///
/// For a request whose branch lacks the magic cookie (RFC 2543), the branch part is built from
/// the Request-URI, Call-ID, From tag, CSeq number and the top Via's branch value, which is what
/// RFC 3261 §17.2.3 falls back to (the To tag is left out so that an ACK still matches).
///
/// A key is held by the transaction map, its timer-queue entries, events and the TU's own maps
/// for as long as the transaction lingers, so its parts are one shared text: a clone is a count
/// increment, and a lookup compares against one allocation. Equality, hashing and ordering are
/// those of the (branch, sent-by, method) triple.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServerKey {
    /// Branch, sent-by and method, joined.
    text: Arc<str>,
    branch_len: usize,
    sent_by_len: usize,
}

impl ServerKey {
    /// The key of the transaction a request belongs to; `None` without a parseable top Via.
    pub fn from_request(request: &SipMessage) -> Option<Self> {
        let method = request.method()?;
        let method = if method == "ACK" { "INVITE" } else { method };
        let via = request.top_via().ok()?;
        let branch = match via.branch() {
            Some(b) if b.starts_with(MAGIC_COOKIE) => Cow::Borrowed(b),
            other => Cow::Owned(format!(
                "rfc2543|{}|{}|{}|{}|{}",
                request.request_uri().unwrap_or_default(),
                request.call_id().unwrap_or_default(),
                request.from().ok().and_then(|f| f.tag().map(str::to_owned)).unwrap_or_default(),
                request.cseq().map(|c| c.seq).unwrap_or_default(),
                other.unwrap_or_default(),
            )),
        };
        let sent_by = match via.port {
            Some(port) => format!("{}:{port}", via.host.to_ascii_lowercase()),
            None => via.host.to_ascii_lowercase(),
        };
        Some(ServerKey::new(&branch, &sent_by, method))
    }

    fn new(branch: &str, sent_by: &str, method: &str) -> Self {
        ServerKey {
            text: [branch, sent_by, method].concat().into(),
            branch_len: branch.len(),
            sent_by_len: sent_by.len(),
        }
    }

    /// The branch (for an RFC 2543 request, the synthetic equivalent).
    pub fn branch(&self) -> &str {
        &self.text[..self.branch_len]
    }

    fn sent_by(&self) -> &str {
        let start = self.branch_len;
        &self.text[start..start + self.sent_by_len]
    }

    /// The transaction's method (`INVITE` for an ACK).
    pub fn method(&self) -> &str {
        &self.text[self.branch_len + self.sent_by_len..]
    }

    fn parts(&self) -> (&str, &str, &str) {
        (self.branch(), self.sent_by(), self.method())
    }

    /// The same transaction identity under another method (CANCEL → its INVITE, RFC 3261 §9.2).
    fn with_method(&self, method: &str) -> Self {
        ServerKey::new(self.branch(), self.sent_by(), method)
    }
}

impl Ord for ServerKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl PartialOrd for ServerKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerKey")
            .field("branch", &self.branch())
            .field("sent_by", &self.sent_by())
            .field("method", &self.method())
            .finish()
    }
}

/// Identifies a client transaction (RFC 3261 §17.1.3): the top Via branch and the CSeq method.
///
/// Like [`ServerKey`], one shared text; equality, hashing and ordering are those of the
/// (branch, method) pair.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// Branch and method, joined.
    text: Arc<str>,
    branch_len: usize,
}

impl ClientKey {
    /// The key of the client transaction a response belongs to; `None` without a top Via branch
    /// or a CSeq.
    pub fn from_response(response: &SipMessage) -> Option<Self> {
        let via = response.top_via().ok()?;
        let branch = via.branch()?;
        let cseq = response.cseq().ok()?;
        Some(ClientKey::new(branch, &cseq.method))
    }

    /// The key a request we send will be matched by. A missing branch is read as empty.
    fn from_request(request: &SipMessage) -> Self {
        let via = request.top_via().ok();
        let branch = via.as_ref().and_then(|v| v.branch()).unwrap_or_default();
        ClientKey::new(branch, request.method().unwrap_or_default())
    }

    fn new(branch: &str, method: &str) -> Self {
        ClientKey { text: [branch, method].concat().into(), branch_len: branch.len() }
    }

    /// The branch of our top Via.
    pub fn branch(&self) -> &str {
        &self.text[..self.branch_len]
    }

    /// The request method.
    pub fn method(&self) -> &str {
        &self.text[self.branch_len..]
    }
}

impl Ord for ClientKey {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.branch(), self.method()).cmp(&(other.branch(), other.method()))
    }
}

impl PartialOrd for ClientKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("branch", &self.branch())
            .field("method", &self.method())
            .finish()
    }
}

/// What the transaction layer hands to the TU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxEvent {
    /// A new request for the TU (a new server transaction was created; not for retransmissions).
    Request {
        /// The new server transaction; answer with [`TransactionLayer::respond`].
        key: ServerKey,
        /// The request as received. The server transaction shares it (for
        /// [`TransactionLayer::server_request`]) until it sends a final response, which is why it
        /// is not copied for the TU: a TU that keeps it beyond the event shares it too, or takes
        /// its own copy with [`Arc::unwrap_or_clone`].
        request: Arc<SipMessage>,
        /// Where it came from.
        ingress: Ingress,
    },
    /// An ACK that matched no INVITE server transaction in Completed state (an ACK for a 2xx, a
    /// transaction of its own per RFC 3261 §17): the TU relays it end to end. Also emitted when
    /// the ACK matches an INVITE server transaction in the RFC 6026 Accepted state, after that
    /// transaction stopped retransmitting its 2xx.
    Ack {
        /// The ACK as received.
        request: SipMessage,
        /// Where it came from.
        ingress: Ingress,
    },
    /// A response on a client transaction: every provisional, the final, and in the INVITE
    /// client Accepted state (RFC 6026) every retransmitted or forked 2xx too, so the TU can
    /// ACK each one.
    Response {
        /// The client transaction.
        key: ClientKey,
        /// The response as received.
        response: SipMessage,
    },
    /// Timer B or F fired: the client transaction timed out; the TU acts as on a 408.
    Timeout {
        /// The client transaction, now gone.
        key: ClientKey,
    },
    /// An INVITE server transaction whose 2xx was not ACKed within 64*T1 (Timer L): the TU
    /// should end the call (RFC 3261 §13.3.1.4).
    AckTimeout {
        /// The server transaction, now gone.
        key: ServerKey,
    },
}

/// A TU call the transaction layer refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The server transaction does not exist (never did, or it terminated).
    #[error("no such server transaction")]
    NoSuchTransaction,
    /// The server transaction already sent a final response.
    #[error("the server transaction already sent a final response")]
    AlreadyFinal,
    /// The message given as a response is a request.
    #[error("not a response")]
    NotAResponse,
}

/// Whether a transaction lives on after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Live,
    Terminated,
}

/// The outputs transactions write into, drained by the `poll_*` methods.
#[derive(Debug, Default)]
struct Outbox {
    transmits: VecDeque<Transmit>,
    events: VecDeque<TxEvent>,
}

impl Outbox {
    fn send(&mut self, egress: &Egress, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit { egress: egress.clone(), bytes });
    }
}

/// What an ACK for a 2xx must repeat: Call-ID, CSeq number, From tag and the 2xx's To tag.
/// It is how an ACK with a fresh branch finds the Accepted INVITE server transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AckKey {
    call_id: String,
    seq: u32,
    from_tag: String,
    to_tag: String,
}

impl AckKey {
    /// From a 2xx response, or from the ACK that answers it.
    fn of(message: &SipMessage) -> Option<Self> {
        Some(AckKey {
            call_id: message.call_id().ok()?.to_owned(),
            seq: message.cseq().ok()?.seq,
            from_tag: message.from().ok()?.tag().unwrap_or_default().to_owned(),
            to_tag: message.to().ok()?.tag().unwrap_or_default().to_owned(),
        })
    }
}

/// A timer queue entry's owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum TxRef {
    Client(ClientKey),
    Server(ServerKey),
}

/// Every client and server transaction of one processor.
///
/// Timers sit in a min-heap of `(deadline, transaction)`. An entry is live while it equals its
/// transaction's earliest deadline; entries made stale by a cancelled or moved timer or a
/// terminated transaction are dropped when they reach the top, so
/// [`poll_timeout`](Self::poll_timeout) is always exact.
#[derive(Debug)]
pub struct TransactionLayer {
    timers: Timers,
    // Boxed: under load the maps hold tens of thousands of lingering transactions, and a
    // hash table grows (doubling, never shrinking) until it has room for about twice its peak
    // count. With 200-byte values each doubling cost tens of MB of RSS in the first minutes
    // of a run; with 8-byte boxes it costs a few.
    clients: HashMap<ClientKey, Box<ClientTx>>,
    servers: HashMap<ServerKey, Box<ServerTx>>,
    /// INVITE server transactions in Accepted state, by what their 2xx's ACK will carry.
    accepted: HashMap<AckKey, ServerKey>,
    queue: BinaryHeap<Reverse<(Instant, TxRef)>>,
    out: Outbox,
    /// INVITEs answered with a challenge, whose ACK is absorbed here.
    challenged: Challenged,
}

/// Most challenged INVITEs remembered for their ACK: beyond it the oldest are forgotten (a late
/// ACK of one then reaches the TU, which finds no call and drops it). A caller ACKs within a
/// round trip; 65,536 covers more than 10 s at the highest challenge rate measured.
const MAX_CHALLENGED: usize = 65_536;

/// The INVITEs answered `401`/`407`, by a hash of their transaction key, for 64×T1.
///
/// A challenge goes to a source nobody has verified; keeping a whole server transaction for it
/// until Timer H (the request, the response, timers: a few KB for 32 s) let a flood of
/// unauthenticated INVITEs from many addresses hold hundreds of MB. So the transaction ends
/// as soon as the challenge is sent, as Kamailio answers challenges statelessly, and only
/// a 64-bit hash (plus its expiry) stays to absorb its ACK. A retransmitted INVITE starts a new
/// transaction and is challenged again (RFC 3261 §8.2.6 allows a stateless answer).
#[derive(Debug, Default)]
struct Challenged {
    keys: HashSet<u64>,
    /// In expiry order (every entry lives 64×T1).
    order: VecDeque<(Instant, u64)>,
}

impl Challenged {
    fn hash(key: &ServerKey) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(until, hash)) = self.order.front() {
            if until > now && self.order.len() <= MAX_CHALLENGED {
                break;
            }
            self.order.pop_front();
            self.keys.remove(&hash);
        }
    }

    fn insert(&mut self, now: Instant, until: Instant, key: &ServerKey) {
        self.expire(now);
        let hash = Self::hash(key);
        if self.keys.insert(hash) {
            self.order.push_back((until, hash));
        }
    }

    /// Whether an ACK with this key answers a challenge (it is then absorbed).
    fn absorbs(&mut self, now: Instant, key: &ServerKey) -> bool {
        self.expire(now);
        self.keys.contains(&Self::hash(key))
    }
}

impl TransactionLayer {
    /// An empty layer.
    pub fn new(timers: Timers) -> Self {
        TransactionLayer {
            timers,
            clients: HashMap::new(),
            servers: HashMap::new(),
            accepted: HashMap::new(),
            queue: BinaryHeap::new(),
            out: Outbox::default(),
            challenged: Challenged::default(),
        }
    }

    /// A parsed inbound request (the caller has validated the mandatory headers).
    ///
    /// A new request creates a server transaction and emits [`TxEvent::Request`] (an INVITE
    /// gets `100 Trying` unless the TU responds within 200 ms); a retransmission is answered from the transaction's state; an
    /// ACK goes to its INVITE transaction or surfaces as [`TxEvent::Ack`].
    pub fn handle_request(&mut self, now: Instant, request: SipMessage, ingress: Ingress) {
        let Some(key) = ServerKey::from_request(&request) else { return };
        if request.method() == Some("ACK") {
            self.handle_ack(now, key, request, ingress);
        } else if let Some(tx) = self.servers.get_mut(&key) {
            let before = tx.next_deadline();
            tx.on_retransmission(&mut self.out);
            self.reschedule_server(&key, before);
        } else {
            // Shared, not deep-copied: the transaction needs the request until its final
            // response, and the TU needs it now.
            let request = Arc::new(request);
            let tx = ServerTx::new(now, Arc::clone(&request), &ingress);
            let deadline = tx.next_deadline();
            self.servers.insert(key.clone(), Box::new(tx));
            schedule(&mut self.queue, None, deadline, || TxRef::Server(key.clone()));
            self.out.events.push_back(TxEvent::Request { key, request, ingress });
        }
        self.prune();
    }

    /// Whether `request` belongs to a server transaction held now (it is a retransmission).
    pub fn holds_server(&self, request: &SipMessage) -> bool {
        ServerKey::from_request(request).is_some_and(|key| self.servers.contains_key(&key))
    }

    fn handle_ack(&mut self, now: Instant, key: ServerKey, ack: SipMessage, ingress: Ingress) {
        if !self.servers.contains_key(&key) && self.challenged.absorbs(now, &key) {
            return;
        }
        if let Some(tx) = self.servers.get_mut(&key) {
            let before = tx.next_deadline();
            match tx.on_ack(now, &self.timers) {
                AckOutcome::Absorbed => {}
                AckOutcome::Terminated => self.remove_server(&key),
                AckOutcome::PassUp => {
                    self.forget_ack_key(&key);
                    self.out.events.push_back(TxEvent::Ack { request: ack, ingress })
                }
            }
            self.reschedule_server(&key, before);
            return;
        }
        // An ACK for a 2xx has its own branch (RFC 3261 §17.1.1.3): find the Accepted INVITE by
        // dialog identifiers instead.
        if let Some(invite) = AckKey::of(&ack).and_then(|k| self.accepted.get(&k)).cloned()
            && let Some(tx) = self.servers.get_mut(&invite)
        {
            let before = tx.next_deadline();
            tx.on_2xx_ack();
            self.forget_ack_key(&invite);
            self.reschedule_server(&invite, before);
        }
        self.out.events.push_back(TxEvent::Ack { request: ack, ingress });
    }

    /// A parsed inbound response. One that matches no client transaction is dropped: the TU
    /// never sees it (RFC 3261 §17.1.3 leaves stray responses to the core; a proxy core would
    /// forward them statelessly, a B2BUA has nothing to do with them).
    pub fn handle_response(&mut self, now: Instant, response: SipMessage, ingress: Ingress) {
        let _ = ingress; // Matching is by Via branch and CSeq only; the source plays no part.
        let Some(key) = ClientKey::from_response(&response) else { return };
        let Some(tx) = self.clients.get_mut(&key) else { return };
        let before = tx.next_deadline();
        if tx.on_response(now, &self.timers, response, &key, &mut self.out) == Fate::Terminated {
            self.clients.remove(&key);
        }
        self.reschedule_client(&key, before);
        self.prune();
    }

    /// The TU's response on a server transaction; an error if the transaction is gone or has
    /// already sent a final response.
    pub fn respond(
        &mut self,
        now: Instant,
        key: &ServerKey,
        response: SipMessage,
    ) -> Result<(), TxError> {
        let tx = self.servers.get_mut(key).ok_or(TxError::NoSuchTransaction)?;
        let before = tx.next_deadline();
        let challenge = key.method() == "INVITE" && matches!(response.status(), Some(401 | 407));
        let fate = tx.respond(now, &self.timers, response, &mut self.out)?;
        if let Some(ack_key) = tx.ack_key() {
            self.accepted.insert(ack_key.clone(), key.clone());
        }
        if challenge {
            // Sent; see `Challenged` for why nothing more is kept.
            self.challenged.insert(now, now + self.timers.t1x64(), key);
            self.remove_server(key);
        } else if fate == Fate::Terminated {
            self.remove_server(key);
        }
        self.reschedule_server(key, before);
        self.prune();
        Ok(())
    }

    /// Starts a client transaction for a request whose top Via (with a unique branch) the TU
    /// set, and sends it to `egress`.
    ///
    /// An ACK starts no transaction (RFC 3261 §17.1.1.3: the ACK for a 2xx belongs to the TU):
    /// it is sent once and its key matches nothing. A request reusing the key of a live client
    /// transaction replaces that transaction.
    pub fn start_client(&mut self, now: Instant, request: SipMessage, egress: Egress) -> ClientKey {
        let key = ClientKey::from_request(&request);
        if request.method() == Some("ACK") {
            self.out.send(&egress, request.to_bytes());
            return key;
        }
        let tx = ClientTx::new(now, &self.timers, request, egress, &mut self.out);
        let deadline = tx.next_deadline();
        self.clients.insert(key.clone(), Box::new(tx));
        schedule(&mut self.queue, None, deadline, || TxRef::Client(key.clone()));
        self.prune();
        key
    }

    /// A CANCEL for the INVITE client transaction `key` (RFC 3261 §9.1: same Request-URI,
    /// Call-ID, From, To, CSeq number, the single top Via and the Route headers), or `None` if it
    /// has no provisional response yet (the TU must wait for one) or is already final. The TU
    /// passes it to [`start_client`](Self::start_client) with the returned egress.
    pub fn cancel_request(&self, key: &ClientKey) -> Option<(SipMessage, Egress)> {
        self.clients.get(key)?.cancel_request()
    }

    /// The TU sent a CANCEL for INVITE client transaction `key`: if no final response comes
    /// within 64*T1 the transaction ends with [`TxEvent::Timeout`] (RFC 3261 §9.1).
    pub fn cancel_sent(&mut self, now: Instant, key: &ClientKey) {
        let Some(tx) = self.clients.get_mut(key) else { return };
        let before = tx.next_deadline();
        tx.on_cancel_sent(now, &self.timers);
        self.reschedule_client(key, before);
    }

    /// The INVITE server transaction a CANCEL targets (RFC 3261 §9.2: the transaction matching
    /// rules with the method taken as INVITE), whether or not it already sent a final response;
    /// [`server_is_final`](Self::server_is_final) tells the TU whether the CANCEL has an effect.
    /// Matching uses the Via only, so `ingress` plays no part.
    pub fn cancel_target(&self, cancel: &SipMessage, ingress: &Ingress) -> Option<ServerKey> {
        let _ = ingress;
        if cancel.method() != Some("CANCEL") {
            return None;
        }
        let key = ServerKey::from_request(cancel)?.with_method("INVITE");
        self.servers.contains_key(&key).then_some(key)
    }

    /// The original request of a server transaction, until it sends a final response. (A final
    /// transaction only lingers to absorb retransmissions, and does not keep the request for
    /// that: a TU that needs it later keeps its own.)
    pub fn server_request(&self, key: &ServerKey) -> Option<&SipMessage> {
        self.servers.get(key).and_then(|tx| tx.request())
    }

    /// Whether a server transaction has sent a final response (false once it is gone).
    pub fn server_is_final(&self, key: &ServerKey) -> bool {
        self.servers.get(key).is_some_and(|tx| tx.is_final())
    }

    /// The request of a client transaction, as sent, until a final response arrives (a final
    /// transaction only lingers to absorb retransmitted responses, and does not keep it).
    pub fn client_request(&self, key: &ClientKey) -> Option<&SipMessage> {
        self.clients.get(key).and_then(|tx| tx.request())
    }

    /// Fires every timer due at `now`, in deadline order.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.queue.peek().is_some_and(|Reverse((deadline, _))| *deadline <= now) {
            let Some(Reverse((deadline, owner))) = self.queue.pop() else { break };
            if !self.is_live(deadline, &owner) {
                continue;
            }
            match owner {
                TxRef::Client(key) => {
                    let Some(tx) = self.clients.get_mut(&key) else { continue };
                    if tx.on_timeout(now, &self.timers, &key, &mut self.out) == Fate::Terminated {
                        self.clients.remove(&key);
                    }
                    self.reschedule_client(&key, Some(deadline));
                }
                TxRef::Server(key) => {
                    let Some(tx) = self.servers.get_mut(&key) else { continue };
                    if tx.on_timeout(now, &self.timers, &key, &mut self.out) == Fate::Terminated {
                        self.remove_server(&key);
                    }
                    self.reschedule_server(&key, Some(deadline));
                }
            }
        }
        self.prune();
    }

    /// Entries in the timer queue, live or stale (for tests that bound it).
    #[cfg(test)]
    pub(crate) fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((deadline, _))| *deadline)
    }

    /// The next message to send, in the order the layer produced them.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next event for the TU.
    pub fn poll_event(&mut self) -> Option<TxEvent> {
        self.out.events.pop_front()
    }

    /// Number of live (client, server) transactions.
    pub fn len(&self) -> (usize, usize) {
        (self.clients.len(), self.servers.len())
    }

    /// Whether no transaction is live.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.servers.is_empty()
    }

    /// Once the ACK for transaction `key`'s 2xx came, drops its entry in `accepted`: the entry
    /// only served to find the transaction for that ACK, and would otherwise stay for the rest of
    /// Timer L.
    fn forget_ack_key(&mut self, key: &ServerKey) {
        if let Some(ack_key) = self.servers.get_mut(key).and_then(|tx| tx.take_ack_key_if_acked())
            && self.accepted.get(&*ack_key) == Some(key)
        {
            self.accepted.remove(&*ack_key);
        }
    }

    fn remove_server(&mut self, key: &ServerKey) {
        if let Some(tx) = self.servers.remove(key)
            && let Some(ack_key) = tx.ack_key()
            && self.accepted.get(ack_key) == Some(key)
        {
            self.accepted.remove(ack_key);
        }
    }

    /// Queues the transaction's new earliest deadline if it changed. The entry holds the map's
    /// own key, not `key` (which may be a lookup key made from a message): a queue entry can
    /// outlive its deadline's relevance until it reaches the top, and should not keep a second
    /// copy of the key alive.
    fn reschedule_client(&mut self, key: &ClientKey, before: Option<Instant>) {
        let (stored, after) = match self.clients.get_key_value(key) {
            Some((stored, tx)) => (stored, tx.next_deadline()),
            None => (key, None),
        };
        schedule(&mut self.queue, before, after, || TxRef::Client(stored.clone()));
    }

    /// As [`reschedule_client`](Self::reschedule_client), for a server transaction.
    fn reschedule_server(&mut self, key: &ServerKey, before: Option<Instant>) {
        let (stored, after) = match self.servers.get_key_value(key) {
            Some((stored, tx)) => (stored, tx.next_deadline()),
            None => (key, None),
        };
        schedule(&mut self.queue, before, after, || TxRef::Server(stored.clone()));
    }

    /// Whether a queue entry is still its transaction's earliest deadline.
    fn is_live(&self, deadline: Instant, owner: &TxRef) -> bool {
        let current = match owner {
            TxRef::Client(key) => self.clients.get(key).and_then(|tx| tx.next_deadline()),
            TxRef::Server(key) => self.servers.get(key).and_then(|tx| tx.next_deadline()),
        };
        current == Some(deadline)
    }

    /// Drops stale entries from the top of the queue so that `poll_timeout` is exact.
    fn prune(&mut self) {
        while let Some(Reverse((deadline, owner))) = self.queue.peek() {
            if self.is_live(*deadline, owner) {
                break;
            }
            self.queue.pop();
        }
    }
}

/// Queues a transaction's new earliest deadline if it changed. `owner` is only called then:
/// most messages leave the deadline alone.
fn schedule(
    queue: &mut BinaryHeap<Reverse<(Instant, TxRef)>>,
    before: Option<Instant>,
    after: Option<Instant>,
    owner: impl FnOnce() -> TxRef,
) {
    if after != before
        && let Some(deadline) = after
    {
        queue.push(Reverse((deadline, owner())));
    }
}

/// What a transaction holds beyond its state, keys and timers, for the tests that check it lets
/// go of everything a lingering transaction no longer needs.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// The parsed request.
    request: bool,
    /// Bytes to re-send: a server's last response, a client's ACK for a non-2xx final.
    resend: bool,
    /// A server's ACK key (Accepted, until the ACK).
    ack_key: bool,
}

/// The earliest of a transaction's timers.
fn earliest(timers: &[Option<Instant>]) -> Option<Instant> {
    timers.iter().flatten().min().copied()
}
