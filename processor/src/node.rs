//! The async shell around [`Core`]: feeds it inbound messages and timer ticks, sends what it
//! emits through the edge links, and runs the work that needs Redis or billing (REGISTER and
//! call setup) in tasks, posting their results back into the core.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sipalias_proto::billing::AccountingStopRequest;
use sipalias_proto::edge::LocalSocket;
use sipmsg::SipMessage;
use sipmsg::digest::{Algorithm, Credentials};
use tokio::sync::Notify;

use crate::accounting::{Accounting, Event};
use crate::answer::{Answer, FORBIDDEN, UNKNOWN_SOCKET};
use crate::audit;
use crate::auth::{
    ChallengeKind, Expected, NonceKey, Refusal, Verified, challenge, check_presented,
    credentials_for, verified,
};
use crate::b2bua::{CallPlan, Target, Work};
use crate::bans::{Bans, is_scanner, source_key};
use crate::billing::{Billing, CallRequest};
use crate::call_setup::{self, Authorization};
use crate::clock::{Now, wall_ms};
use crate::config::ProcessorConfig;
use crate::config::{BillingOutage, DigestUriCheck, KeepaliveMethod};
use crate::core::{Core, Done, Keepalive};
use crate::destination::DestinationPolicy;
use crate::dialogs::{DialogStore, Op as DialogOp};
use crate::error::Error;
use crate::ids::Ids;
use crate::keepalive::{Due, Schedule};
use crate::links::Links;
use crate::location::{Location, RegisterMeta};
use crate::registrar::{self, Limits};
use crate::replay::{Claim, NonceCounts};
use crate::sockets::SocketTable;
use crate::telemetry;
use crate::transaction::ServerKey;
use crate::transport::Ingress;
use crate::transport::Transport;
use sipalias_startup::Stopping;

/// The reason dispatchers list for bans of sources over `auth_failures_per_minute`.
const AUTH_BAN_REASON: &str = "auth-failures";

/// Dialog writes queued for Redis before new ones are dropped: minutes of answered calls at
/// the rates this machine reaches, while Redis is slow.
const DIALOG_QUEUE: usize = 65_536;

/// One running processor.
pub struct Node {
    config: ProcessorConfig,
    core: Mutex<Core>,
    timer: Notify,
    links: Links,
    sockets: SocketTable,
    location: Location,
    billing: Billing,
    accounting: Accounting,
    schedule: Schedule,
    dialogs: DialogStore,
    /// The cluster's public numbers.
    dids: crate::dids::Dids,
    /// Dialog writes, in order, to the [`DialogWriter`].
    dialog_ops: tokio::sync::mpsc::Sender<DialogOp>,
    /// Room for lookups besides call setups (stored calls, keepalive outcomes).
    lookups: Arc<tokio::sync::Semaphore>,
    /// REGISTER and call-setup tasks running (Redis/billing round trips in flight).
    in_flight: std::sync::atomic::AtomicUsize,
    nonces: NonceKey,
    nonce_counts: NonceCounts,
    /// Failed authentications and bans per source.
    bans: Bans,
    /// `scanner_user_agents`, lower-cased.
    scanners: Vec<String>,
    /// The identifiers the core mints too (call refs are minted outside it).
    ids: Arc<Ids>,
    /// Where a Contact may not point.
    destinations: DestinationPolicy,
    /// `digest_algorithms` of the config, for IPs that name none of their own.
    algorithms: Vec<Algorithm>,
}

/// What a request presents, before billing checks the digest response.
enum Presented {
    /// Credentials for the realm, bound to this request, with a fresh nonce-count of our nonce.
    Credentials(Credentials, Algorithm),
    /// Nothing usable: send this answer (a challenge, or `400` for credentials that cannot be
    /// for this request).
    Answer(SipMessage),
}

/// Outcome of checking a request's credentials.
enum Auth {
    /// Authenticated as this user.
    Ok(String),
    /// Send this challenge.
    Challenge(SipMessage),
    /// Refuse with this answer.
    Refuse(Answer),
}

/// How requests arriving on one local IP are authenticated, and whose users they are.
struct Site {
    /// Canonical domain of its users.
    domain: String,
    /// Realm its phones expect.
    realm: String,
    /// Digest algorithms challenged and accepted there, most preferred first.
    algorithms: Vec<Algorithm>,
}

impl Node {
    /// A processor using these stores.
    /// With it, the task that writes its dialogs to Redis, in order: the caller runs it
    /// (`run_writer`) beside the node's other tasks.
    pub fn new(
        config: ProcessorConfig,
        location: Location,
        billing: Billing,
    ) -> (Arc<Self>, DialogWriter) {
        let dialogs = DialogStore::new(location.redis(), &config.key_prefix);
        let (dialog_ops, ops) = tokio::sync::mpsc::channel(DIALOG_QUEUE);
        let writer = DialogWriter { store: dialogs.clone(), ops };
        let ids = Arc::new(Ids::new(&config.id));
        let nonces = NonceKey::new(config.auth_secret.as_bytes(), config.nonce_ttl_secs * 1000);
        let nonce_counts = NonceCounts::new(location.redis(), &config.key_prefix);
        let node = Arc::new(Node {
            nonce_counts,
            bans: Bans::new(
                location.redis(),
                &config.key_prefix,
                config.auth_failures_per_minute,
                config.ban_secs,
            ),
            destinations: DestinationPolicy::new(
                &config.contact_deny_networks,
                config.service_urls(),
            ),
            scanners: config.scanner_user_agents.iter().map(|s| s.to_ascii_lowercase()).collect(),
            algorithms: config.algorithms(),
            core: Mutex::new({
                let mut core = Core::new(config.timers(), ids.clone());
                core.set_limits(config.limits());
                core
            }),
            ids,
            timer: Notify::new(),
            links: Links::default(),
            sockets: SocketTable::default(),
            accounting: Accounting::new(billing.clone(), location.redis(), &config.key_prefix),
            schedule: Schedule::new(location.redis(), &config.key_prefix),
            dids: crate::dids::Dids::new(location.redis(), &config.key_prefix),
            dialogs,
            dialog_ops,
            lookups: Arc::new(tokio::sync::Semaphore::new(config.max_setup_in_flight)),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            location,
            billing,
            nonces,
            config,
        });
        (node, writer)
    }

    /// Accounting delivery (and its outage queue).
    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// This processor's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The cluster's link secret, presented to dispatchers and billing.
    pub fn link_secret(&self) -> &str {
        &self.config.link_secret
    }

    /// The dispatcher links.
    pub fn links(&self) -> &Links {
        &self.links
    }

    /// What the dispatchers announced about their IPs.
    pub fn sockets(&self) -> &SocketTable {
        &self.sockets
    }

    /// Takes the socket table `dispatcher` announced (on linking, and again after a SIGHUP
    /// changed its sockets) and records it in Redis (`<prefix>sockets`, one field per
    /// dispatcher), where the operator's `registrations` finds bindings through sockets no
    /// dispatcher serves any more.
    pub fn learn_sockets(&self, dispatcher: &str, sockets: &[LocalSocket]) {
        if self.sockets.learn(dispatcher, sockets) {
            tracing::info!(%dispatcher, sockets = sockets.len(), "socket table learned");
        }
        let key = crate::registrations::sockets_key(&self.config.key_prefix);
        let listed = serde_json::to_string(&self.sockets.served_by(dispatcher)).unwrap_or_default();
        let (dispatcher, mut conn) = (dispatcher.to_owned(), self.location.redis());
        tokio::spawn(async move {
            let set = redis::cmd("HSET").arg(&key).arg(&dispatcher).arg(listed).clone();
            if let Err(e) = set.query_async::<()>(&mut conn).await {
                tracing::warn!(%dispatcher, "cannot record the socket table in Redis: {e}");
            }
        });
    }

    /// Whether this processor can take work now: linked to a dispatcher, with Redis and billing
    /// answering; else what it waits for.
    pub async fn readiness(&self) -> Result<(), String> {
        if self.links.is_empty() {
            return Err("not linked to any dispatcher".into());
        }
        self.location.ping().await.map_err(|e| format!("redis: {e}"))?;
        self.billing.health().await.map_err(|e| e.to_string())
    }

    /// (client transactions, server transactions, calls).
    pub fn load(&self) -> (usize, usize, usize) {
        self.lock().load()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the core, then sends what it produced and starts the work it asked for.
    fn with_core(self: &Arc<Self>, f: impl FnOnce(&mut Core, Now)) {
        let (transmits, work) = {
            let mut core = self.lock();
            core.set_setup_in_flight(self.in_flight.load(std::sync::atomic::Ordering::SeqCst));
            f(&mut core, Now::read());
            let mut t = Vec::new();
            while let Some(x) = core.poll_transmit() {
                t.push(x);
            }
            let mut w = Vec::new();
            while let Some(x) = core.poll_work() {
                w.push(x);
            }
            (t, w)
        };
        for t in transmits {
            self.links.send(t);
        }
        for w in work {
            self.start_work(w);
        }
        self.timer.notify_one();
    }

    /// Hands finished async work back to the core.
    fn done(self: &Arc<Self>, done: Done) {
        self.with_core(|core, now| core.handle_done(now, done));
    }

    /// Starts one piece of work the core asked for. Dialog writes are queued in the order the
    /// core made them (a save never overtakes the delete after it); the rest run as tasks, at
    /// most `max_setup_in_flight` lookups besides the setups the core counts. Accounting is
    /// never refused: it is bounded by the calls held, and a lost stop would be a lost charge.
    fn start_work(self: &Arc<Self>, w: Work) {
        let op = match w {
            Work::SaveDialog(r) => DialogOp::Save(r),
            Work::DeleteDialog(r) => DialogOp::Delete(r),
            w => return self.spawn_work(w),
        };
        if let Err(e) = self.dialog_ops.try_send(op) {
            // The record's TTL still ends it in Redis; only a takeover of this call by
            // another processor is lost.
            tracing::warn!(error = %e, "dialog store behind: write dropped");
        }
    }

    /// Runs `w` as a task (see [`Node::start_work`]).
    fn spawn_work(self: &Arc<Self>, w: Work) {
        let setup = matches!(w, Work::Register { .. } | Work::Invite { .. });
        let permit = if setup || matches!(w, Work::AccountingStop(_)) {
            None
        } else {
            match Arc::clone(&self.lookups).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => return self.refuse_work(w),
            }
        };
        let node = Arc::clone(self);
        if setup {
            node.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        tokio::spawn(async move {
            node.clone().run_work(w).await;
            if setup {
                node.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            drop(permit);
        });
    }

    /// Work turned away because `max_setup_in_flight` lookups are already running: a request
    /// waiting on it gets `503` with `Retry-After`; an ACK or a keepalive outcome is dropped
    /// (the phone retransmits, the next keepalive counts again).
    fn refuse_work(self: &Arc<Self>, w: Work) {
        match w {
            Work::LoadDialog { key, request } => {
                let resp = self.overloaded_response(&request);
                self.done(Done::Answer { key, response: resp });
            }
            Work::LoadDialogForAck { request } => {
                tracing::warn!(
                    call_id = request.call_id().unwrap_or("-"),
                    "processor busy: ACK dropped"
                )
            }
            Work::KeepaliveResult { aor, .. } => {
                tracing::warn!(%aor, "processor busy: keepalive outcome dropped")
            }
            _ => {}
        }
    }

    /// `503` with `Retry-After`, for a request the processor has no room for now.
    fn overloaded_response(&self, req: &SipMessage) -> SipMessage {
        let mut resp = self.answer(req, &Answer::plain(503, "Service Unavailable"));
        resp.push_header("Retry-After", self.config.retry_after_secs.to_string());
        resp
    }

    /// A message the dispatcher routed to us.
    pub fn handle_inbound(self: &Arc<Self>, bytes: &[u8], ingress: Ingress) {
        // Parse outside the core's lock; only a message that fails goes through the slower
        // path that still answers a request whose head is readable (400, 505, …).
        match sipmsg::parse(bytes) {
            Ok(msg) if msg.is_request() && is_scanner(msg.header("user-agent"), &self.scanners) => {
                // Scanners get no answer at all: nothing to confirm a SIP server is here.
                tracing::debug!(source = %ingress.remote, user_agent = msg.header("user-agent").unwrap_or(""), "scanner dropped");
            }
            Ok(msg) => self.with_core(|core, now| core.handle_message(now, msg, ingress)),
            Err(_) => self.with_core(|core, now| core.handle_datagram(now, bytes, ingress)),
        }
    }

    /// An operator lifted the ban on `source` at a dispatcher: forget it and delete it from
    /// Redis.
    pub fn lift_ban(self: &Arc<Self>, source: String) {
        let node = Arc::clone(self);
        tokio::spawn(async move {
            match node.bans.lift(&source).await {
                Ok(()) => tracing::info!(%source, "ban lifted"),
                Err(e) => tracing::warn!(%source, error = %e, "ban lifted here, not in Redis"),
            }
        });
    }

    /// The cluster's own service addresses (announced to dispatchers, which never send there).
    pub fn service_addrs(&self) -> Vec<String> {
        self.destinations.services().iter().map(ToString::to_string).collect()
    }

    /// The dispatcher reported that a flow-only send found its connection closed.
    pub fn handle_flow_failed(self: &Arc<Self>, connection_id: u64) {
        self.done(Done::FlowFailed { connection_id });
    }

    /// Sends the keepalives that fall to this processor, until stopped.
    pub async fn run_keepalives(self: Arc<Self>, mut stopping: Stopping) {
        stopping.run_until(self.keepalive_loop()).await;
    }

    async fn keepalive_loop(self: Arc<Self>) {
        let interval_ms = u64::from(self.config.keepalive_interval_secs) * 1000;
        if interval_ms == 0 {
            return;
        }
        // Claim often enough that a ping is never late by more than a tenth of the interval.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(
            (interval_ms / 10).clamp(50, 1000),
        ));
        loop {
            tick.tick().await;
            let now = wall_ms();
            let due = match self.schedule.claim(now, now + interval_ms, 500).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "keepalive schedule unavailable");
                    continue;
                }
            };
            for d in due {
                self.ping(d, now).await;
            }
        }
    }

    async fn ping(self: &Arc<Self>, due: Due, now: u64) {
        let binding = match self.location.get(&due.aor, &due.field, now).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                let _ = self.schedule.remove(&due.aor, &due.field).await;
                return;
            }
            Err(e) => {
                tracing::debug!(aor = %due.aor, error = %e, "binding not read for keepalive");
                return;
            }
        };
        let Some(mut egress) = binding.egress() else { return };
        let stream = egress.local.transport != Transport::Udp;
        // A ping must never open a connection: it keeps the phone's own one alive.
        egress.flow_only |= stream;
        let host = self
            .sockets
            .uri_host(egress.local.addr.ip())
            .unwrap_or_else(|| due.aor.split('@').nth(1).unwrap_or_default().to_owned());
        let ka = Keepalive {
            aor: due.aor,
            field: due.field,
            contact: binding.contact,
            egress,
            host,
            options: !stream && self.config.keepalive_method == KeepaliveMethod::Options,
        };
        self.done(Done::Keepalive(ka));
    }

    /// Until stopped, keeps `sipalias_bindings{ip}` (live registrations per IP they came
    /// through: how many phones still use each old provider's address) current: every
    /// `binding_stats_secs`, the one processor that takes the cluster-wide lock counts them
    /// with a scan and stores the counts in Redis; every processor reports what is stored.
    pub async fn run_binding_stats(self: Arc<Self>, mut stopping: Stopping) {
        let secs = u64::from(self.config.binding_stats_secs);
        if secs == 0 || self.config.metrics_listen.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(secs));
        loop {
            if stopping.run_until(tick.tick()).await.is_none() {
                return;
            }
            if let Err(e) = self.binding_stats(secs * 1000).await {
                tracing::debug!(error = %e, "registration counts not updated");
            }
        }
    }

    /// Until stopped, with `metrics_listen`, records what the processor holds every few seconds
    /// (off the per-message path).
    pub async fn run_load_gauges(self: Arc<Self>, mut stopping: Stopping) {
        if self.config.metrics_listen.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(telemetry::LOAD_INTERVAL);
        while stopping.run_until(tick.tick()).await.is_some() {
            let (client, server, calls) = self.load();
            let setups = self.in_flight.load(std::sync::atomic::Ordering::Relaxed);
            telemetry::load(client, server, calls, setups);
            let up = self.lock().calls_up_per_ip();
            // Every IP this processor knows, so an alias whose last call ended shows 0.
            let ips = self.sockets.ips().into_iter().chain(up.keys().copied());
            for ip in ips.collect::<std::collections::BTreeSet<_>>() {
                telemetry::calls_up(ip, up.get(&ip).copied().unwrap_or(0));
            }
        }
    }

    async fn binding_stats(&self, every_ms: u64) -> Result<(), Error> {
        let mut conn = self.location.redis();
        let (lock, counts) = (
            format!("{}stats:lock", self.config.key_prefix),
            format!("{}stats:bindings", self.config.key_prefix),
        );
        // Held for most of the interval: one count per interval across the cluster.
        let won: Option<String> = redis::cmd("SET")
            .arg(&lock)
            .arg(&self.config.id)
            .arg("NX")
            .arg("PX")
            .arg(every_ms.saturating_sub(every_ms / 10).max(1))
            .query_async(&mut conn)
            .await?;
        if won.is_some() {
            let now = wall_ms();
            let bindings = self.location.scan(now).await?;
            let per_ip = crate::registrations::per_ip(bindings.iter().map(|(_, b)| b));
            let mut pipe = redis::pipe();
            pipe.atomic().del(&counts).ignore();
            pipe.hset(&counts, "updated_ms", now).ignore();
            for (ip, n) in &per_ip {
                pipe.hset(&counts, ip.to_string(), n).ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        let stored: std::collections::HashMap<String, u64> =
            redis::cmd("HGETALL").arg(&counts).query_async(&mut conn).await?;
        // Every IP served, and every IP phones are still registered through: an alias
        // removed by a SIGHUP keeps its gauge while phones use it.
        let mut ips: std::collections::BTreeSet<IpAddr> = self.sockets.ips().into_iter().collect();
        ips.extend(stored.keys().filter_map(|k| k.parse::<IpAddr>().ok()));
        for ip in ips {
            let n = stored.get(&ip.to_string()).copied().unwrap_or(0);
            telemetry::bindings(ip, n);
        }
        Ok(())
    }

    /// Until stopped, takes operator orders from the cluster's admin channel in Redis
    /// (`<prefix>admin`, [`crate::admin`]): `hangup <call_ref> <reply channel>` ends the call
    /// if this processor holds it and says so on the reply channel. Reconnects after Redis
    /// trouble.
    pub async fn run_admin(self: Arc<Self>, mut stopping: Stopping) {
        let channel = crate::admin::channel(&self.config.key_prefix);
        loop {
            let listened = stopping.run_until(self.listen_admin(&channel)).await;
            match listened {
                None => return,
                Some(Err(e)) => tracing::debug!(error = %e, "admin channel lost; reconnecting"),
                Some(Ok(())) => {}
            }
            // Backoff between reconnection attempts, not synchronisation.
            if stopping
                .run_until(tokio::time::sleep(std::time::Duration::from_secs(1)))
                .await
                .is_none()
            {
                return;
            }
        }
    }

    async fn listen_admin(self: &Arc<Self>, channel: &str) -> Result<(), Error> {
        use futures::StreamExt as _;
        let client = redis::Client::open(self.config.redis_url.as_str())?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let Ok(text) = msg.get_payload::<String>() else { continue };
            let Some((call_ref, reply)) = crate::admin::parse_hangup(&text) else {
                tracing::debug!(order = %text.escape_debug(), "unknown admin order ignored");
                continue;
            };
            let mut ended = false;
            self.with_core(|core, now| ended = core.hang_up(now, call_ref));
            if ended {
                let mut conn = self.location.redis();
                let _: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(reply)
                    .arg(&self.config.id)
                    .query_async(&mut conn)
                    .await;
            }
        }
        Ok(())
    }

    /// Whether nothing is being set up: no REGISTER or call setup in flight and no call ringing.
    /// Answered calls do not count: they live on in Redis for whoever gets their next request.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.lock().calls_in_setup() == 0
    }

    /// Drives the transaction timers until stopped.
    pub async fn run_timers(self: Arc<Self>, mut stopping: Stopping) {
        stopping.run_until(self.timer_loop()).await;
    }

    async fn timer_loop(self: Arc<Self>) {
        loop {
            let next = self.lock().poll_timeout();
            match next {
                Some(at) if at <= Instant::now() => {
                    self.with_core(|core, now| core.handle_timeout(now));
                }
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                        _ = self.timer.notified() => {}
                    }
                }
                None => self.timer.notified().await,
            }
        }
    }

    async fn run_work(self: Arc<Self>, work: Work) {
        match work {
            Work::Register { key, request, ingress } => {
                let response = match self.register(&request, &ingress).await {
                    Ok(r) => r,
                    Err(e) => self.error_response(&request, &e, "REGISTER failed"),
                };
                self.done(Done::Answer { key, response });
            }
            Work::Invite { key, request, ingress } => {
                let (started, local) = (Instant::now(), ingress.local);
                let done = match self.setup_call(&request, &ingress).await {
                    Ok(Ok(plan)) => Done::Call { key, plan: Box::new(plan), ingress },
                    Ok(Err(response)) => Done::Answer { key, response },
                    Err(e) => {
                        let response = self.error_response(&request, &e, "call setup failed");
                        Done::Answer { key, response }
                    }
                };
                telemetry::call_setup(&local, started.elapsed());
                self.done(done);
            }
            // Queued in order by `start_work`, never run as tasks.
            Work::SaveDialog(r) | Work::DeleteDialog(r) => {
                tracing::error!(call_ref = %r.call_ref, "dialog write run as a task: dropped")
            }
            Work::LoadDialogForAck { request } => {
                let call_id = request.call_id().unwrap_or_default().to_owned();
                match telemetry::redis("dialog-load", self.dialogs.load(&call_id)).await {
                    Ok(Some(record)) => {
                        self.done(Done::DialogForAck { record: Box::new(record), ack: request })
                    }
                    Ok(None) => tracing::debug!(%call_id, "ACK for no known call dropped"),
                    Err(e) => {
                        tracing::warn!(%call_id, error = %e, "ACK dropped: dialog lookup failed")
                    }
                }
            }
            Work::LoadDialog { key, request } => {
                let call_id = request.call_id().unwrap_or_default().to_owned();
                match telemetry::redis("dialog-load", self.dialogs.load(&call_id)).await {
                    Ok(record) => self.done(Done::Dialog { key, record: record.map(Box::new) }),
                    Err(e) => {
                        let response = self.error_response(&request, &e, "dialog lookup failed");
                        self.done(Done::Answer { key, response });
                    }
                }
            }
            Work::KeepaliveResult { aor, field, ok } => {
                let max = u64::from(self.config.keepalive_max_failures);
                match self.schedule.record(&aor, &field, ok).await {
                    Ok(n) if max > 0 && n >= max => {
                        tracing::info!(%aor, contact = %field, failures = n, "binding stopped answering keepalives: removed");
                        let removed = self.location.remove(&aor, &field).await;
                        let unscheduled = self.schedule.remove(&aor, &field).await;
                        if let Err(e) = removed.and(unscheduled) {
                            tracing::warn!(%aor, error = %e, "could not remove a dead binding");
                        }
                    }
                    Ok(n) if n > 0 => {
                        tracing::debug!(%aor, contact = %field, failures = n, "keepalive unanswered")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(%aor, error = %e, "keepalive outcome not recorded"),
                }
            }
            Work::AccountingStop(req) => self.accounting.deliver(Event::Stop(req)).await,
        }
    }

    fn error_response(&self, req: &SipMessage, e: &Error, what: &str) -> SipMessage {
        let (status, reason) = e.sip_status();
        tracing::warn!(call_id = req.call_id().unwrap_or("-"), error = %e, status, "{what}");
        let mut resp = self.answer(req, &Answer::plain(status, reason));
        if status == 503 {
            resp.push_header("Retry-After", self.config.retry_after_secs.to_string());
        }
        resp
    }

    /// `answer` to `req`, To-tagged by this processor.
    fn answer(&self, req: &SipMessage, answer: &Answer) -> SipMessage {
        answer.to_response(req, &self.lock().tag())
    }

    /// How requests arriving on `ingress`'s local IP are authenticated; `None` for an IP no
    /// dispatcher announced.
    fn site(&self, ingress: &Ingress) -> Option<Site> {
        let info = self.sockets.get(ingress.local.addr.ip())?;
        let algorithms =
            if info.algorithms.is_empty() { self.algorithms.clone() } else { info.algorithms };
        Some(Site { domain: info.domain, realm: info.realm, algorithms })
    }

    /// A fresh challenge for `req` on `site` (`stale`: RFC 3261 §22.4, the nonce expired).
    fn challenge(&self, req: &SipMessage, site: &Site, stale: bool) -> SipMessage {
        let kind = ChallengeKind::for_method(req.method().unwrap_or_default());
        let nonce = self.nonces.mint(&site.realm, wall_ms());
        challenge(req, kind, &site.realm, &nonce, stale, &site.algorithms, &self.lock().tag())
    }

    /// The local half of a digest check: credentials for the site's realm, bound to this
    /// request ([`check_presented`]), whose nonce-count nobody used before anywhere in the
    /// cluster. Anything else is answered here; only the response itself needs the account's
    /// HA1 (billing).
    async fn presented(
        &self,
        req: &SipMessage,
        ingress: &Ingress,
        site: &Site,
    ) -> Result<Presented, Error> {
        let kind = ChallengeKind::for_method(req.method().unwrap_or_default());
        let now = wall_ms();
        let source = source_key(ingress.remote.ip());
        // A source this processor knows is banned gets no challenge at all; the dispatcher that
        // let it through is told again (it may have restarted since the ban).
        if let Some(remaining_ms) = self.bans.known_banned(&source, now) {
            self.links.ban(&source, remaining_ms, AUTH_BAN_REASON);
            return Ok(Presented::Answer(self.answer(req, &FORBIDDEN)));
        }
        let Some(creds) = credentials_for(req, kind, &site.realm) else {
            return Ok(Presented::Answer(self.challenge(req, site, false)));
        };
        let lenient = self.config.digest_uri_check == DigestUriCheck::RequestUriOrSocket;
        let expected = Expected {
            realm: &site.realm,
            algorithms: &site.algorithms,
            socket: lenient.then_some(ingress.local.addr),
        };
        let alg = match check_presented(req, &creds, &expected, &self.nonces, now) {
            Ok(alg) => alg,
            Err(Refusal::Challenge { stale }) => {
                return Ok(Presented::Answer(self.challenge(req, site, stale)));
            }
            Err(Refusal::BadRequest(reason)) => {
                let aor = format!("{}@{}", creds.username, site.domain);
                audit::auth_failure(ingress.remote, &ingress.local, &aor, reason);
                return Ok(Presented::Answer(self.answer(req, &Answer::plain(400, reason))));
            }
        };
        let nc = creds.nc.as_deref().unwrap_or_default();
        let ttl_ms = self.nonces.remaining_ms(&creds.nonce, now);
        let ban_key = self.bans.ban_key(&source);
        match telemetry::redis(
            "nonce-claim",
            self.nonce_counts.claim(&ban_key, &creds.nonce, nc, ttl_ms),
        )
        .await?
        {
            Claim::Fresh => Ok(Presented::Credentials(creds, alg)),
            Claim::Replayed => {
                let aor = format!("{}@{}", creds.username, site.domain);
                audit::auth_failure(ingress.remote, &ingress.local, &aor, "nonce-count replayed");
                Ok(Presented::Answer(self.challenge(req, site, true)))
            }
            Claim::Banned { remaining_ms } => {
                self.bans.learn(&source, now, remaining_ms);
                self.links.ban(&source, remaining_ms, AUTH_BAN_REASON);
                Ok(Presented::Answer(self.answer(req, &FORBIDDEN)))
            }
        }
    }

    /// Counts a failed authentication against its source: the answer is a new challenge, or
    /// `403` when this failure got the source banned. Redis trouble here only loses the count.
    async fn after_failure(&self, req: &SipMessage, ingress: &Ingress, site: &Site) -> SipMessage {
        let source = source_key(ingress.remote.ip());
        match self.bans.record_failure(&source, wall_ms()).await {
            Ok(Some(_)) => {
                audit::banned(&source, self.bans.ban_ms() / 1000, AUTH_BAN_REASON);
                // From now on the dispatchers drop the source's traffic before any processor.
                self.links.ban(&source, self.bans.ban_ms(), AUTH_BAN_REASON);
                self.answer(req, &FORBIDDEN)
            }
            Ok(None) => self.challenge(req, site, false),
            Err(e) => {
                tracing::warn!(%source, error = %e, "failed authentication not counted");
                self.challenge(req, site, false)
            }
        }
    }

    /// Checks digest credentials (RFC 3261 §22) for a request arriving on `site`.
    async fn authenticate(
        &self,
        req: &SipMessage,
        ingress: &Ingress,
        site: &Site,
    ) -> Result<Auth, Error> {
        match self.presented(req, ingress, site).await? {
            Presented::Answer(c) => Ok(Auth::Challenge(c)),
            Presented::Credentials(creds, alg) => {
                self.verify_presented(req, ingress, site, creds, alg).await
            }
        }
    }

    /// The billing half of [`authenticate`](Self::authenticate).
    async fn verify_presented(
        &self,
        req: &SipMessage,
        ingress: &Ingress,
        site: &Site,
        creds: Credentials,
        alg: Algorithm,
    ) -> Result<Auth, Error> {
        let method = req.method().unwrap_or_default();
        let aor = format!("{}@{}", creds.username, site.domain);
        let verdict = match self.billing.verify(&aor, method, &creds, alg).await {
            Ok(v) => v,
            Err(e) if method == "INVITE" && self.config.billing_outage == BillingOutage::Allow => {
                self.recognise_caller(&aor, ingress, e).await?;
                return Ok(Auth::Ok(creds.username));
            }
            Err(e) => return Err(e),
        };
        match verified(verdict.valid, verdict.blocked) {
            Verified::User => Ok(Auth::Ok(creds.username)),
            Verified::Failed => {
                audit::auth_failure(ingress.remote, &ingress.local, &aor, &verdict.reason);
                Ok(Auth::Challenge(self.after_failure(req, ingress, site).await))
            }
            Verified::Refused(answer) => {
                tracing::info!(%aor, "blocked account refused");
                Ok(Auth::Refuse(answer))
            }
        }
    }

    /// Billing is down (`error`) under the `allow` outage policy: a caller calling from the
    /// very address and socket of a live registration of `aor` is taken as that account (it
    /// authenticated to register there); anyone else gets `error` (503).
    async fn recognise_caller(
        &self,
        aor: &str,
        ingress: &Ingress,
        error: Error,
    ) -> Result<(), Error> {
        let bindings = telemetry::redis("lookup", self.location.lookup(aor, wall_ms())).await?;
        let known = bindings
            .iter()
            .any(|b| b.received == ingress.remote && b.ingress.local() == ingress.local);
        if !known {
            return Err(error);
        }
        tracing::warn!(%aor, error = %error, "billing down: caller recognised from its registration");
        Ok(())
    }

    /// Handles a REGISTER (RFC 3261 §10.3).
    async fn register(&self, req: &SipMessage, ingress: &Ingress) -> Result<SipMessage, Error> {
        let Some(site) = self.site(ingress) else {
            return Ok(self.answer(req, &UNKNOWN_SOCKET));
        };
        let to = req.to()?;
        let user = match registrar::registering_user(to.uri.user_name()) {
            Ok(user) => user.to_owned(),
            Err(answer) => return Ok(self.answer(req, &answer)),
        };
        let authed = match self.authenticate(req, ingress, &site).await? {
            Auth::Ok(u) => u,
            Auth::Challenge(c) => return Ok(c),
            Auth::Refuse(a) => return Ok(self.answer(req, &a)),
        };
        if let Err(answer) = registrar::check_owner(&user, &authed) {
            tracing::warn!(%user, %authed, "REGISTER for another user's AOR refused");
            return Ok(self.answer(req, &answer));
        }
        let limits = Limits {
            min: self.config.min_expires,
            max: self.config.max_expires,
            default: self.config.default_expires,
        };
        let update = match registrar::plan(req, limits) {
            Ok(registrar::Update::Contacts(mut contacts)) => {
                for c in &mut contacts {
                    c.nat = registrar::behind_nat(
                        self.config.nat_mode,
                        req,
                        &c.contact,
                        ingress.remote,
                    );
                }
                registrar::Update::Contacts(contacts)
            }
            Ok(u) => u,
            Err(reject) => return Ok(registrar::reject_response(req, &reject, &self.lock().tag())),
        };
        let local = |addr| self.sockets.is_local_socket(addr);
        let allowed = |addr| self.destinations.check(addr, local);
        if let Err((c, why)) = registrar::check_contacts(&update, allowed) {
            tracing::warn!(%user, source = %ingress.remote, contact = %c.contact, "REGISTER refused: contact is {}", why.describe());
            return Ok(self.answer(req, &registrar::CONTACT_NOT_ALLOWED));
        }
        let aor = format!("{user}@{}", site.domain);
        let meta = RegisterMeta {
            call_id: req.call_id()?,
            cseq: req.cseq()?.seq,
            ingress,
            user_agent: req.header("user-agent").unwrap_or(""),
            max_contacts: self.config.max_contacts,
        };
        let now = wall_ms();
        let bindings =
            telemetry::redis("register", self.location.apply(&aor, &update, &meta, now)).await?;
        if self.config.keepalive_interval_secs > 0 {
            let fields: Vec<String> = bindings.iter().map(|b| b.contact.clone()).collect();
            let first = now + u64::from(self.config.keepalive_interval_secs) * 1000;
            if let Err(e) = self.schedule.add(&aor, &fields, first).await {
                tracing::warn!(%aor, error = %e, "keepalive not scheduled");
            }
        }
        tracing::info!(%aor, via = %ingress.local, bindings = bindings.len(), "registered");
        Ok(registrar::ok_response(req, &bindings, now, &self.lock().tag()))
    }

    /// Authenticates, authorizes and locates a new call. `Ok(Err(resp))` is a final answer.
    ///
    /// The common case costs one billing round trip: the callee is located first (Redis), then
    /// billing checks the caller's digest and authorizes the call together. A call that cannot
    /// ring (unknown domain or user, no binding) is refused only after the caller's credentials
    /// were verified on their own, so a stranger learns nothing about who exists.
    async fn setup_call(
        &self,
        req: &SipMessage,
        ingress: &Ingress,
    ) -> Result<Result<CallPlan, SipMessage>, Error> {
        let Some(site) = self.site(ingress) else {
            return Ok(Err(self.answer(req, &UNKNOWN_SOCKET)));
        };
        // A trunk's address is its credential: no digest from it, and from nobody else
        // without one.
        if let Some(trunk) =
            crate::routing::trusted_trunk(&self.config.gateways, ingress.remote.ip())
        {
            return self.setup_inbound(req, ingress, &trunk.name).await;
        }
        let (creds, alg) = match self.presented(req, ingress, &site).await? {
            Presented::Credentials(c, a) => (c, a),
            Presented::Answer(c) => return Ok(Err(c)),
        };
        let caller_aor = format!("{}@{}", creds.username, site.domain);
        // Refusals before billing saw the credentials: verify them first.
        let refuse = async |creds: Credentials, callee: &str, answer: Answer| match self
            .verify_presented(req, ingress, &site, creds, alg)
            .await?
        {
            Auth::Ok(_) => {
                self.record_refusal(&caller_aor, callee, ingress, &answer);
                Ok(Err(self.answer(req, &answer)))
            }
            Auth::Challenge(c) => Ok(Err(c)),
            Auth::Refuse(a) => Ok(Err(self.answer(req, &a))),
        };
        let callee = call_setup::callee(req.request_uri(), &site.domain, |host| {
            self.sockets.domain_of_host(host)
        });
        let mut callee_aor = match callee.aor() {
            Ok(aor) => aor,
            Err(answer) => {
                return refuse(creds, req.request_uri().unwrap_or_default(), answer).await;
            }
        };
        // Locate before authorizing, so a call that cannot ring reserves nothing.
        let mut bindings =
            telemetry::redis("lookup", self.location.lookup(&callee_aor, wall_ms())).await?;
        let mut targets = self.reachable(&bindings);
        let outage_allowed = self.config.billing_outage == BillingOutage::Allow;
        let mut hunt = Vec::new();
        let mut asserted = None;
        let mut account = None;
        if targets.is_empty() {
            let mut known = self.billing.account(&callee_aor).await.map(|a| a.is_some());
            // A number that is no subscriber: one of the cluster's DIDs rings its account
            // here; any other goes out through the trunks.
            if let (Ok(false), call_setup::Callee::User { user, domain }) = (&known, &callee) {
                let plan = self.config.dialing_plan(ingress.local.addr.ip());
                let e164 = crate::routing::normalize(user, plan);
                let did = match &e164 {
                    Some(n) => telemetry::redis("did", self.dids.get(n)).await?,
                    None => None,
                };
                if let Some(aor) = did {
                    callee_aor = aor;
                    bindings =
                        telemetry::redis("lookup", self.location.lookup(&callee_aor, wall_ms()))
                            .await?;
                    targets = self.reachable(&bindings);
                    known = Ok(true);
                } else if let Some((e164, trunks)) = self.trunk_route(user, ingress) {
                    callee_aor = format!("{e164}@{domain}");
                    hunt = trunks;
                    let did = telemetry::redis("did", self.dids.number_of(&caller_aor)).await?;
                    let who =
                        did.map_or_else(|| caller_aor.clone(), |n| format!("{n}@{}", site.domain));
                    asserted = Some(format!("sip:{who}"));
                }
            }
            account = Some(known);
        }
        let account = account.filter(|_| targets.is_empty());
        if let Some(account) = account.filter(|_| hunt.is_empty()) {
            let answer = call_setup::unreachable(account, outage_allowed)?;
            tracing::info!(
                %caller_aor,
                %callee_aor,
                status = answer.status,
                bindings = bindings.len(),
                "callee has no binding reachable through a served socket"
            );
            return refuse(creds, &callee_aor, answer).await;
        }
        let call_id = req.call_id()?;
        // Minted here, never taken from the caller: each authorized attempt is its own
        // reservation and its own charge, whatever Call-ID and From tag it reuses.
        let call_ref = self.ids.call_ref();
        let call = CallRequest {
            caller: &caller_aor,
            callee: &callee_aor,
            call_id,
            ingress_ip: ingress.local.addr.ip(),
            call_ref: &call_ref,
        };
        let (authorization, why) =
            match self.billing.authorize(&call, Some(("INVITE", &creds, alg))).await {
                Ok(auth) => (call_setup::authorization(&auth), auth.reason),
                Err(e) if outage_allowed => {
                    self.recognise_caller(&caller_aor, ingress, e).await?;
                    tracing::warn!(%caller_aor, "billing down: call allowed with the outage limit");
                    let max_duration_secs = self.config.billing_outage_max_duration_secs;
                    (Authorization::Allowed { max_duration_secs }, String::new())
                }
                Err(e) => return Err(e),
            };
        let max_duration_secs = match authorization {
            Authorization::Allowed { max_duration_secs } => max_duration_secs,
            Authorization::BadCredentials => {
                audit::auth_failure(ingress.remote, &ingress.local, &caller_aor, &why);
                return Ok(Err(self.after_failure(req, ingress, &site).await));
            }
            Authorization::Refused(answer) => {
                tracing::info!(%caller_aor, %callee_aor, reason = %why, status = answer.status, "billing denied the call");
                self.record_refusal(&caller_aor, &callee_aor, ingress, &answer);
                return Ok(Err(self.answer(req, &answer)));
            }
        };
        tracing::info!(%caller_aor, %callee_aor, call_id, %call_ref, branches = targets.len(), max_duration_secs, "call authorized");
        let auto_answer = self.config.trusts_auto_answer(&caller_aor, ingress.remote.ip());
        Ok(Ok(CallPlan {
            caller_aor,
            callee_aor,
            targets,
            hunt,
            asserted,
            max_duration_secs,
            call_ref,
            auto_answer,
        }))
    }

    /// The targets of `bindings` a call can ring: those made through a socket a dispatcher
    /// still serves (a phone registered through an alias since removed cannot be reached from
    /// where it expects us).
    fn reachable(&self, bindings: &[crate::registrar::Binding]) -> Vec<Target> {
        call_setup::targets(bindings, |local| {
            self.sockets.is_local_socket(local).then(|| self.sockets.uri_host(local.ip())).flatten()
        })
    }

    /// A call from trusted trunk `trunk`, without digest: to one of the cluster's DIDs
    /// (dialled as the trunk sends it, made E.164 with the dialing plan of the IP it came
    /// in on), ringing the account's phones from the socket each registered through. Not
    /// authorized by billing (nobody of ours pays); its CDR is written at its end. A number
    /// that is no DID gets `404`, an account with no phone `480`.
    async fn setup_inbound(
        &self,
        req: &SipMessage,
        ingress: &Ingress,
        trunk: &str,
    ) -> Result<Result<CallPlan, SipMessage>, Error> {
        let plan = self.config.dialing_plan(ingress.local.addr.ip());
        let dialed = call_setup::dialed(req.request_uri());
        let e164 = dialed.as_deref().and_then(|d| crate::routing::normalize(d, plan));
        let did = match &e164 {
            Some(n) => telemetry::redis("did", self.dids.get(n)).await?,
            None => None,
        };
        let Some(callee_aor) = did else {
            tracing::info!(%trunk, dialed = ?dialed, "inbound call to a number that is no DID");
            return Ok(Err(self.answer(req, &crate::answer::NOT_FOUND)));
        };
        let bindings =
            telemetry::redis("lookup", self.location.lookup(&callee_aor, wall_ms())).await?;
        let targets = self.reachable(&bindings);
        if targets.is_empty() {
            tracing::info!(%trunk, %callee_aor, "inbound call: the account has no phone registered");
            return Ok(Err(self.answer(req, &crate::answer::UNAVAILABLE)));
        }
        let caller = call_setup::caller_number(req);
        let call_ref = self.ids.call_ref();
        tracing::info!(%trunk, %caller, %callee_aor, %call_ref, branches = targets.len(), "inbound call from a trunk");
        Ok(Ok(CallPlan {
            caller_aor: format!("{caller}@{trunk}"),
            callee_aor,
            targets,
            hunt: Vec::new(),
            asserted: None,
            max_duration_secs: 0,
            call_ref,
            auto_answer: false,
        }))
    }

    /// The E.164 form of `dialed` (under the dialing plan of the IP the call came in on) and
    /// the trunks that carry it, in the order they are tried; `None` when it is no number or
    /// no route takes it.
    fn trunk_route(&self, dialed: &str, ingress: &Ingress) -> Option<(String, Vec<Target>)> {
        if self.config.routes.is_empty() {
            return None;
        }
        let plan = self.config.dialing_plan(ingress.local.addr.ip());
        let e164 = crate::routing::normalize(dialed, plan)?;
        let trunks = call_setup::trunk_targets(
            &e164,
            &self.config.gateways,
            &self.config.routes,
            rand::random(),
            |ip, transport| self.sockets.socket_for(ip, transport),
            |ip| self.sockets.uri_host(ip),
        );
        if trunks.is_empty() {
            tracing::info!(dialed, %e164, "no route for the number");
            return None;
        }
        Some((e164, trunks))
    }

    /// Has billing keep a CDR of a failed attempt it authorized nothing for — an
    /// authenticated caller's call to a callee that does not exist or cannot be reached, or
    /// one billing refused — with the answer the caller got. Sent through the durable
    /// accounting queue, off the caller's path; an unauthenticated request never gets here,
    /// so strangers cannot fill the CDRs.
    fn record_refusal(&self, caller: &str, callee: &str, ingress: &Ingress, answer: &Answer) {
        let call_ref = self.ids.call_ref();
        let stop = AccountingStopRequest {
            idempotency_key: format!("{call_ref};stop"),
            call_ref,
            ended_at_ms: wall_ms(),
            cause: "refused".to_owned(),
            answered: false,
            start: None,
            status: u32::from(answer.status),
            reason: answer.reason_text.clone().unwrap_or_else(|| answer.reason.to_owned()),
            caller: caller.to_owned(),
            callee: callee.to_owned(),
            caller_ingress_ip: ingress.local.addr.ip().to_string(),
        };
        let accounting = self.accounting.clone();
        tokio::spawn(async move { accounting.deliver(Event::Stop(stop)).await });
    }

    /// Whether server transaction `key` is still waiting for an answer.
    pub fn is_pending(&self, key: &ServerKey) -> bool {
        !self.lock().is_final(key)
    }
}

/// The writer of a node's dialogs to Redis ([`DialogStore::run_writer`]), to be run as one
/// of its tasks.
pub struct DialogWriter {
    store: DialogStore,
    ops: tokio::sync::mpsc::Receiver<DialogOp>,
}

impl DialogWriter {
    /// Writes until stopped, then writes what was queued before the stop.
    pub async fn run(self, stopping: Stopping) {
        self.store.run_writer(self.ops, stopping).await;
    }
}
