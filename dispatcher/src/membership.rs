//! The membership table: the processors currently linked to this dispatcher, as routing
//! targets. Links ([`crate::link`]) write it when a processor joins, drains or leaves; the
//! receive loops read it for every message ([`Membership::deliver`]), and `Status` reports it.
//! No I/O here: a member is its queue's sender and a few counters.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use sipalias_proto::edge::{DispatcherMessage, Heartbeat};
use sipmsg::scan::Scan;
use tokio::sync::{mpsc, oneshot};

use crate::clock::unix_ms;
use crate::route;

/// At most this many Call-IDs are remembered per draining processor (see
/// [`route::Pick::diverted_from`]); beyond it, the CANCEL of a further diverted INVITE may
/// reach the draining processor, which answers it `481`. At a few hundred new calls per second
/// per processor this covers minutes of draining.
const MAX_DIVERTED: usize = 100_000;

/// The processors currently linked to this dispatcher, by node id.
///
/// The receive loops read it for every message (a read lock, never held across an `.await`);
/// links write it when a processor joins, drains or leaves. What changes with every message —
/// last seen, load, messages routed — is kept in atomics beside it (`LinkStats`).
#[derive(Debug)]
pub struct Membership {
    inner: RwLock<Members>,
    /// Origin of [`LinkStats::last_seen_ms`].
    epoch: Instant,
}

impl Default for Membership {
    fn default() -> Self {
        Self { inner: RwLock::default(), epoch: Instant::now() }
    }
}

#[derive(Debug, Default)]
struct Members {
    by_id: HashMap<Arc<str>, Member>,
    /// The keys of `by_id` with their draining flags, as a slice for [`route::pick_draining`].
    live: Vec<Live>,
    /// Source of session numbers, so a stale link never removes its replacement.
    next_session: u64,
}

/// One routing candidate.
#[derive(Debug, Clone)]
struct Live {
    id: Arc<str>,
    draining: bool,
}

impl AsRef<str> for Live {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

#[derive(Debug)]
struct Member {
    session: u64,
    tx: mpsc::Sender<DispatcherMessage>,
    capacity: u32,
    peer: Option<SocketAddr>,
    /// When the link was accepted, milliseconds since the Unix epoch.
    connected_at_ms: u64,
    draining: bool,
    /// Call-IDs of INVITEs diverted away from this processor since it began draining.
    diverted: Mutex<HashSet<Box<str>>>,
    stats: Arc<LinkStats>,
    /// Dropped when this entry is replaced or removed, which ends the link that owns it.
    _kick: oneshot::Sender<()>,
}

/// What a link updates on every message, without taking the membership's lock.
#[derive(Debug, Default)]
pub(crate) struct LinkStats {
    /// When anything last arrived from the processor, in milliseconds since
    /// [`Membership::epoch`].
    last_seen_ms: AtomicU64,
    /// Load at the last heartbeat.
    transactions: AtomicU32,
    dialogs: AtomicU32,
    /// Messages routed to the processor (queued on its link).
    routed: AtomicU64,
}

/// What one processor last told us about itself, and what we did for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorStatus {
    /// Node id from its `Hello`.
    pub id: String,
    /// Where its link comes from, when known.
    pub peer: Option<SocketAddr>,
    /// Capacity from its `Hello` (informational).
    pub capacity: u32,
    /// When its link was accepted, milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
    /// How long ago anything (heartbeat or send) last arrived from it.
    pub last_seen_ago: Duration,
    /// Transactions it held at its last heartbeat.
    pub transactions: u32,
    /// Dialogs it held at its last heartbeat.
    pub dialogs: u32,
    /// Whether it sent `Drain`.
    pub draining: bool,
    /// Messages routed to it since it linked.
    pub routed: u64,
    /// Messages waiting in its link's queue now (of the dispatcher's `queue_depth`).
    pub queued: usize,
}

/// Result of handing a message to the processor chosen by [`route::pick_draining`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for this processor.
    Queued(Arc<str>),
    /// This processor owns the message but cannot take it now (queue full, or its link is
    /// closing).
    Busy(Arc<str>),
    /// No processor is linked, or the message is new work and every linked one is draining.
    NoProcessor,
}

/// Everything [`Membership::join`] records about a new link.
#[derive(Debug)]
pub(crate) struct NewLink {
    pub(crate) capacity: u32,
    pub(crate) peer: Option<SocketAddr>,
    pub(crate) tx: mpsc::Sender<DispatcherMessage>,
    pub(crate) stats: Arc<LinkStats>,
    /// Dropped when the entry is replaced or removed, which ends the link.
    pub(crate) kick: oneshot::Sender<()>,
}

/// What became of a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Join {
    /// Linked as session `session`; `replaced`: a silent link with that id was closed.
    Joined { session: u64, replaced: bool },
    /// A live link already holds the id (from `peer`): refused.
    Taken { peer: Option<SocketAddr> },
    /// The new link's stream is already gone.
    Gone,
}

/// How many processors are left after one leaves or drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remaining {
    pub(crate) linked: usize,
    /// Linked and not draining: those that get new requests.
    pub(crate) accepting: usize,
}

impl Membership {
    /// A snapshot of every linked processor, sorted by id.
    pub fn status(&self) -> Vec<ProcessorStatus> {
        let now = self.now_ms();
        let members = self.read();
        let mut out: Vec<ProcessorStatus> = members
            .by_id
            .iter()
            .map(|(id, m)| ProcessorStatus {
                id: id.to_string(),
                peer: m.peer,
                capacity: m.capacity,
                connected_at_ms: m.connected_at_ms,
                last_seen_ago: Duration::from_millis(
                    now.saturating_sub(m.stats.last_seen_ms.load(Ordering::Relaxed)),
                ),
                transactions: m.stats.transactions.load(Ordering::Relaxed),
                dialogs: m.stats.dialogs.load(Ordering::Relaxed),
                draining: m.draining,
                routed: m.stats.routed.load(Ordering::Relaxed),
                queued: m.tx.max_capacity() - m.tx.capacity(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Routes by the message's scan and queues `msg` for the chosen processor, without waiting.
    /// `new_work` (a new INVITE or REGISTER) is only queued while the processor's queue is
    /// less than half full: past that it is at capacity, and the rest of the queue is kept for
    /// what finishes work it holds (requests within calls, ACK, CANCEL, responses).
    pub(crate) fn deliver(
        &self,
        scan: &Scan<'_>,
        msg: DispatcherMessage,
        new_work: bool,
    ) -> Delivery {
        let members = self.read();
        let by_id = &members.by_id;
        let was_diverted = |n: &Live, call_id: &str| {
            by_id.get(&n.id).is_some_and(|m| lock(&m.diverted).contains(call_id))
        };
        let Some(pick) = route::pick_draining(scan, &members.live, |n| n.draining, was_diverted)
        else {
            return Delivery::NoProcessor;
        };
        if let Some(from) = pick.diverted_from
            && let Some(member) = by_id.get(&from.id)
        {
            let mut diverted = lock(&member.diverted);
            if diverted.len() < MAX_DIVERTED {
                diverted.insert(Box::from(scan.call_id.unwrap_or_default()));
            }
        }
        let node = Arc::clone(&pick.node.id);
        // `live` and `by_id` change together under the write lock, so the lookup succeeds.
        let Some(member) = by_id.get(&node) else {
            return Delivery::NoProcessor;
        };
        if new_work && member.tx.capacity() * 2 <= member.tx.max_capacity() {
            return Delivery::Busy(node);
        }
        // Counted before queuing, so that whoever sees the message also sees the count.
        member.stats.routed.fetch_add(1, Ordering::Relaxed);
        match member.tx.try_send(msg) {
            Ok(()) => Delivery::Queued(node),
            Err(_) => {
                member.stats.routed.fetch_sub(1, Ordering::Relaxed);
                Delivery::Busy(node)
            }
        }
    }

    /// Queues `msg` for every linked processor, without waiting. Returns how many could not
    /// take it (queue full or link closing).
    pub(crate) fn broadcast(&self, msg: &DispatcherMessage) -> usize {
        let members = self.read();
        members.by_id.values().filter(|m| m.tx.try_send(msg.clone()).is_err()).count()
    }

    /// Registers `id` on a new link and queues `welcome` on it while still holding the lock,
    /// so the welcome is the first message on the stream and the processor is routable as soon
    /// as it has it. A previous link with that id is replaced only when nothing has arrived on
    /// it for `stale_after` (its processor restarted, or its host vanished): a live processor's
    /// traffic, digests included, never moves to whoever says `Hello` with its id.
    pub(crate) fn join(
        &self,
        id: &str,
        link: NewLink,
        welcome: DispatcherMessage,
        stale_after: Duration,
    ) -> Join {
        let mut members = self.write();
        let now = self.now_ms();
        if let Some(old) = members.by_id.get(id) {
            let silent = now.saturating_sub(old.stats.last_seen_ms.load(Ordering::Relaxed));
            if u128::from(silent) < stale_after.as_millis() {
                return Join::Taken { peer: old.peer };
            }
        }
        if link.tx.try_send(welcome).is_err() {
            return Join::Gone;
        }
        members.next_session += 1;
        let session = members.next_session;
        link.stats.last_seen_ms.store(now, Ordering::Relaxed);
        let member = Member {
            session,
            tx: link.tx,
            capacity: link.capacity,
            peer: link.peer,
            connected_at_ms: unix_ms(),
            draining: false,
            diverted: Mutex::default(),
            stats: link.stats,
            _kick: link.kick,
        };
        let id: Arc<str> = Arc::from(id);
        let replaced = members.by_id.insert(Arc::clone(&id), member).is_some();
        // A replacement starts afresh: not draining.
        members.live.retain(|l| l.id != id);
        members.live.push(Live { id, draining: false });
        Join::Joined { session, replaced }
    }

    /// Marks `id` as draining if it is still the link `session` and was not draining yet.
    /// Returns how many processors remain accepting new work, or `None` if nothing changed.
    pub(crate) fn drain(&self, id: &str, session: u64) -> Option<Remaining> {
        let mut members = self.write();
        let member = members.by_id.get_mut(id).filter(|m| m.session == session && !m.draining)?;
        member.draining = true;
        for live in members.live.iter_mut().filter(|l| l.id.as_ref() == id) {
            live.draining = true;
        }
        Some(members.remaining())
    }

    /// Removes `id` if it is still the link `session`. Returns whether it was removed and
    /// how many processors remain.
    pub(crate) fn leave(&self, id: &str, session: u64) -> (bool, Remaining) {
        let mut members = self.write();
        let removed = members.by_id.get(id).is_some_and(|m| m.session == session);
        if removed {
            members.by_id.remove(id);
            members.live.retain(|l| l.id.as_ref() != id);
        }
        (removed, members.remaining())
    }

    /// Records that something arrived on a link now.
    pub(crate) fn seen(&self, stats: &LinkStats) {
        stats.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn heartbeat(&self, stats: &LinkStats, hb: &Heartbeat) {
        stats.transactions.store(hb.transactions, Ordering::Relaxed);
        stats.dialogs.store(hb.dialogs, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    // A panic while holding the lock cannot leave the table half-updated (every update is a
    // few assignments), so a poisoned lock is still usable.
    fn read(&self) -> RwLockReadGuard<'_, Members> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Members> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Members {
    fn remaining(&self) -> Remaining {
        Remaining {
            linked: self.live.len(),
            accepting: self.live.iter().filter(|l| !l.draining).count(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a link's silence means at `now`, given when its processor was last heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Heard from within the timeout; nothing to decide before `check_at`.
    Alive {
        /// When the processor has been silent for the whole timeout, unless something arrives.
        check_at: Instant,
    },
    /// Nothing has arrived for the timeout or longer: the processor is gone.
    Silent {
        /// How long nothing has arrived.
        silent_for: Duration,
    },
}

/// Decides whether a processor last heard from at `last_seen` is still alive at `now`, given
/// the heartbeat timeout. The link only arms a timer for `check_at` and does not re-arm it on
/// every message: when the timer fires early (something arrived meanwhile), this answers with
/// the next instant to look.
pub(crate) fn liveness(last_seen: Instant, now: Instant, timeout: Duration) -> Liveness {
    let silent_for = now.saturating_duration_since(last_seen);
    if silent_for >= timeout {
        Liveness::Silent { silent_for }
    } else {
        Liveness::Alive { check_at: last_seen + timeout }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipmsg::scan::{make_branch, make_contact_user, scan};

    fn inbound() -> DispatcherMessage {
        DispatcherMessage { kind: None }
    }

    struct Linked {
        session: u64,
        rx: mpsc::Receiver<DispatcherMessage>,
        stats: Arc<LinkStats>,
        _kicked: oneshot::Receiver<()>,
    }

    fn join(m: &Membership, id: &str, capacity: u32, depth: usize) -> (Linked, bool) {
        let (tx, rx) = mpsc::channel(depth);
        let (kick, kicked) = oneshot::channel();
        let stats = Arc::new(LinkStats::default());
        let link = NewLink { capacity, peer: None, tx, stats: Arc::clone(&stats), kick };
        // Stale at once: these tests replace links freely (refusal has its own test).
        let Join::Joined { session, replaced } = m.join(id, link, inbound(), Duration::ZERO) else {
            panic!("join")
        };
        (Linked { session, rx, stats, _kicked: kicked }, replaced)
    }

    fn keys(msg: &str) -> Scan<'_> {
        match scan(msg.as_bytes()) {
            Ok(s) => s,
            Err(e) => panic!("scan: {e:?}"),
        }
    }

    fn request(method: &str, uri: &str, call_id: &str) -> String {
        format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKph\r\nCall-ID: {call_id}\r\n\r\n"
        )
    }

    #[test]
    fn membership_join_replace_leave() {
        let m = Membership::default();
        let msg = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch={}\r\nCall-ID: c\r\n\r\n",
            make_branch("p1", "x")
        );
        let s = keys(&msg);
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::NoProcessor);

        let (tx1, mut rx1) = mpsc::channel(2);
        let (kick1, mut kicked1) = oneshot::channel();
        let stats1 = Arc::new(LinkStats::default());
        let link =
            NewLink { capacity: 10, peer: None, tx: tx1, stats: Arc::clone(&stats1), kick: kick1 };
        let Join::Joined { session: s1, replaced: false } =
            m.join("p1", link, inbound(), Duration::ZERO)
        else {
            panic!("join")
        };
        assert!(rx1.try_recv().is_ok(), "welcome queued first");
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::Queued(Arc::from("p1")));
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::Queued(Arc::from("p1")));
        assert_eq!(
            m.deliver(&s, inbound(), false),
            Delivery::Busy(Arc::from("p1")),
            "queue of 2 full"
        );
        assert_eq!(m.status()[0].routed, 2, "only queued messages count");

        // Same id again: the first link is kicked and its late leave() changes nothing.
        let (p1b, replaced) = join(&m, "p1", 20, 2);
        assert!(replaced);
        assert_eq!(
            kicked1.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "old link told to end"
        );
        assert_eq!(m.leave("p1", s1), (false, Remaining { linked: 1, accepting: 1 }));
        assert_eq!(m.status().len(), 1);
        assert_eq!((m.status()[0].capacity, m.status()[0].routed), (20, 0), "a fresh link");

        m.heartbeat(&p1b.stats, &Heartbeat { transactions: 3, dialogs: 1 });
        assert_eq!((m.status()[0].transactions, m.status()[0].dialogs), (3, 1));

        assert_eq!(m.leave("p1", p1b.session), (true, Remaining { linked: 0, accepting: 0 }));
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::NoProcessor);
    }

    /// p1 drains: new INVITEs go to p2, p1 keeps its responses, in-dialog requests and the
    /// CANCELs of INVITEs it had; the CANCEL of an INVITE diverted to p2 follows it there.
    #[test]
    fn a_draining_member_keeps_what_names_it_and_gets_no_new_work() {
        let m = Membership::default();
        let (mut p1, _) = join(&m, "p1", 0, 64);
        let (mut p2, _) = join(&m, "p2", 0, 64);
        let _ = (p1.rx.try_recv(), p2.rx.try_recv()); // the welcomes
        let both = ["p1", "p2"];
        let p1_call = |tag: &str| {
            (0..)
                .map(|i| format!("{tag}-{i}"))
                .find(|c| route::rendezvous(c, &both) == Some(&"p1"))
                .unwrap_or_default()
        };
        let before = p1_call("before");
        let invite_before = request("INVITE", "sip:b@x", &before);
        assert_eq!(
            m.deliver(&keys(&invite_before), inbound(), false),
            Delivery::Queued("p1".into())
        );

        assert_eq!(m.drain("p1", p1.session), Some(Remaining { linked: 2, accepting: 1 }));
        assert_eq!(m.drain("p1", p1.session), None, "a second drain changes nothing");
        assert!(m.status()[0].draining);

        let after = p1_call("after");
        let p2_gets = [
            request("INVITE", "sip:b@x", &after),
            request("CANCEL", "sip:b@x", &after),
            request("ACK", "sip:b@x", &after),
            request("REGISTER", "sip:x", &before),
            // A takeover (token of a processor that is gone) is new work too.
            request("ACK", &format!("sip:{}@x", make_contact_user("p9", "c")), &before),
        ];
        for msg in &p2_gets {
            assert_eq!(
                m.deliver(&keys(msg), inbound(), false),
                Delivery::Queued("p2".into()),
                "{msg}"
            );
        }
        let resp = format!(
            "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch={}\r\nCall-ID: {after}\r\n\r\n",
            make_branch("p1", "b")
        );
        let p1_gets = [
            request("CANCEL", "sip:b@x", &before),
            request("ACK", "sip:b@x", &before),
            request("BYE", &format!("sip:{}@x", make_contact_user("p1", "c")), &after),
            resp,
        ];
        for msg in &p1_gets {
            assert_eq!(
                m.deliver(&keys(msg), inbound(), false),
                Delivery::Queued("p1".into()),
                "{msg}"
            );
        }

        // Once p2 is gone too, new work gets 503 but p1's own traffic still reaches it.
        assert_eq!(m.leave("p2", p2.session), (true, Remaining { linked: 1, accepting: 0 }));
        assert_eq!(
            m.deliver(&keys(&request("INVITE", "sip:b@x", &after)), inbound(), false),
            Delivery::NoProcessor
        );
        assert_eq!(m.deliver(&keys(&p1_gets[2]), inbound(), false), Delivery::Queued("p1".into()));
    }

    /// New INVITEs and REGISTERs are queued only while a processor's queue is less than half
    /// full; what finishes held work may fill it.
    #[test]
    fn new_work_stops_at_half_a_queue_and_held_work_fills_the_rest() {
        let m = Membership::default();
        let (mut p1, _) = join(&m, "p1", 0, 4);
        let _ = p1.rx.try_recv(); // welcome
        let invite = request("INVITE", "sip:b@x", "c1");
        let s = keys(&invite);
        assert_eq!(m.deliver(&s, inbound(), true), Delivery::Queued("p1".into()));
        assert_eq!(m.deliver(&s, inbound(), true), Delivery::Queued("p1".into()));
        assert_eq!(m.deliver(&s, inbound(), true), Delivery::Busy("p1".into()), "half full");
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::Queued("p1".into()));
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::Queued("p1".into()));
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::Busy("p1".into()), "full");
        let _ = (p1.rx.try_recv(), p1.rx.try_recv(), p1.rx.try_recv());
        assert_eq!(m.deliver(&s, inbound(), true), Delivery::Queued("p1".into()), "drained");
    }

    /// A `Hello` with the id of a processor heard from within the heartbeat timeout is refused
    /// and the live link keeps its traffic; once that link is silent that long, it is replaced.
    #[test]
    fn a_live_processor_id_cannot_be_taken_over() {
        let m = Membership::default();
        let (mut p1, _) = join(&m, "p1", 0, 4);
        let _ = p1.rx.try_recv(); // welcome
        let new_link = || {
            let (tx, rx) = mpsc::channel(4);
            let (kick, _) = oneshot::channel();
            let link = NewLink { capacity: 0, peer: None, tx, stats: Arc::default(), kick };
            (link, rx)
        };
        let (rogue, mut rogue_rx) = new_link();
        let timeout = Duration::from_secs(3600);
        assert_eq!(m.join("p1", rogue, inbound(), timeout), Join::Taken { peer: None });
        assert!(rogue_rx.try_recv().is_err(), "no welcome for the refused link");
        let options = request("OPTIONS", "sip:x", "c1");
        let s = keys(&options);
        assert_eq!(m.deliver(&s, inbound(), false), Delivery::Queued("p1".into()));
        assert!(p1.rx.try_recv().is_ok(), "the live processor keeps its traffic");
        assert_eq!(m.status().len(), 1);

        // Silent for the whole timeout (here: zero): the newcomer replaces it.
        let (late, mut late_rx) = new_link();
        assert!(matches!(
            m.join("p1", late, inbound(), Duration::ZERO),
            Join::Joined { replaced: true, .. }
        ));
        assert!(late_rx.try_recv().is_ok(), "welcome");
    }

    #[test]
    fn a_new_link_with_the_same_id_is_not_draining() {
        let m = Membership::default();
        let (p1, _) = join(&m, "p1", 0, 4);
        assert!(m.drain("p1", p1.session).is_some());
        let (_p1b, replaced) = join(&m, "p1", 0, 4);
        assert!(replaced);
        assert!(!m.status()[0].draining);
        assert_eq!(m.drain("p1", p1.session), None, "the old session cannot drain the new one");
    }

    /// The heartbeat bookkeeping on a virtual clock: `t(s)` is `s` seconds after the start.
    #[test]
    fn liveness_expires_after_the_timeout_of_silence_only() {
        let base = Instant::now();
        let t = |secs: f64| base + Duration::from_secs_f64(secs);
        let timeout = Duration::from_secs(6);

        // Linked at 0: nothing to decide before 6.
        assert_eq!(liveness(t(0.0), t(0.0), timeout), Liveness::Alive { check_at: t(6.0) });
        assert_eq!(liveness(t(0.0), t(5.9), timeout), Liveness::Alive { check_at: t(6.0) });
        // Silent the whole timeout: gone (at exactly the timeout, and later).
        assert_eq!(
            liveness(t(0.0), t(6.0), timeout),
            Liveness::Silent { silent_for: Duration::from_secs(6) }
        );
        assert!(matches!(liveness(t(0.0), t(60.0), timeout), Liveness::Silent { .. }));

        // Heartbeats every 2 s: whenever the timer fires it is pushed back, never expires.
        let mut last_seen = t(0.0);
        let mut check_at = t(6.0);
        for beat in 1..=30 {
            let now = t(f64::from(beat) * 2.0);
            while check_at <= now {
                match liveness(last_seen, check_at, timeout) {
                    Liveness::Alive { check_at: next } => {
                        assert!(next > check_at, "the timer moves forward");
                        check_at = next;
                    }
                    Liveness::Silent { .. } => panic!("expired at beat {beat}"),
                }
            }
            last_seen = now;
        }
        // Then the heartbeats stop at 60 s: the timer, armed for 62 s, re-arms for 66 s, when
        // the processor has been silent for the whole timeout.
        assert_eq!(check_at, t(62.0));
        assert_eq!(liveness(last_seen, t(62.0), timeout), Liveness::Alive { check_at: t(66.0) });
        assert_eq!(
            liveness(last_seen, t(66.0), timeout),
            Liveness::Silent { silent_for: Duration::from_secs(6) }
        );
        // A send (any message) at 65 s would have saved it.
        assert_eq!(liveness(t(65.0), t(66.0), timeout), Liveness::Alive { check_at: t(71.0) });
    }

    #[test]
    fn status_reports_last_seen_and_load() {
        let m = Membership::default();
        let (p1, _) = join(&m, "p1", 7, 4);
        let (_p0, _) = join(&m, "p0", 7, 4);
        m.heartbeat(&p1.stats, &Heartbeat { transactions: 12, dialogs: 4 });
        m.seen(&p1.stats);
        let status = m.status();
        assert_eq!(status.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["p0", "p1"]);
        let p1s = &status[1];
        assert_eq!((p1s.capacity, p1s.transactions, p1s.dialogs), (7, 12, 4));
        assert!(p1s.last_seen_ago < Duration::from_secs(5));
        assert!(p1s.connected_at_ms > 1_600_000_000_000, "unix ms");
        assert!(!p1s.draining);
    }
}
