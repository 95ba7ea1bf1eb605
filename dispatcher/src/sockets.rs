//! The live socket table: every SIP socket the dispatcher serves on, changed without a
//! restart when a SIGHUP re-reads the configuration and the main IP, the aliases or their
//! ports differ.
//!
//! Readers — the links' sends, `Welcome`, `Status`, new connections — see one consistent
//! [`Table`] through an `ArcSwap`; only the [`Manager`] task writes it. A reload is all or
//! nothing: the new configuration is validated, its certificates read and every new socket
//! bound before anything changes, so an alias whose address is not on the host (or whose
//! certificate is bad) leaves the dispatcher exactly as it was, with a log line naming the
//! key.
//!
//! A socket that is no longer configured *drains* rather than closing at once, so calls under
//! way through an alias being retired can end normally: a UDP socket keeps receiving and
//! sending for `socket_drain_secs`; a TCP or TLS socket stops accepting at once and closes
//! when its last connection has closed, or `socket_drain_secs` has passed (its connections
//! are then closed). Draining sockets stay in the announced table until they close, then
//! every linked processor gets the smaller table in a new `Welcome`. Configuring a draining
//! socket again makes it active again, with its connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::{DispatcherMessage, LocalSocket, Transport, Welcome};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Context;
use crate::config::{DispatcherConfig, SocketEntry, key_error};
use crate::error::Error;
use crate::wire::transport_name;

/// How often draining sockets are checked, and a missed announcement retried.
const TICK: Duration = Duration::from_secs(1);

/// A socket's identity: UDP and TCP have separate port spaces, TCP and TLS share one.
pub(crate) type Key = (SocketAddr, Transport);

/// What every reader sees: the sockets in service now.
#[derive(Debug, Default)]
pub(crate) struct Table {
    udp: HashMap<SocketAddr, Arc<UdpSocket>>,
    streams: HashMap<SocketAddr, Transport>,
    /// Per TCP/TLS socket: turns true when the socket closes, which ends its connections.
    closing: HashMap<SocketAddr, watch::Receiver<bool>>,
    /// What `Welcome` announces, each with whether it drains: configured sockets in
    /// configuration order, then draining ones.
    announced: Vec<(LocalSocket, bool)>,
}

/// The table, swapped whole on every change.
#[derive(Debug, Default)]
pub(crate) struct Live(ArcSwap<Table>);

impl Live {
    /// The UDP socket bound to exactly `addr`, while it is in service.
    pub(crate) fn udp(&self, addr: SocketAddr) -> Option<Arc<UdpSocket>> {
        self.0.load().udp.get(&addr).cloned()
    }

    /// Whether `addr` is a TCP or TLS socket (per `transport`) in service.
    pub(crate) fn owns_stream(&self, addr: SocketAddr, transport: Transport) -> bool {
        self.0.load().streams.get(&addr) == Some(&transport)
    }

    /// What a connection of stream socket `addr` watches to learn that the socket closed;
    /// `None` once it has.
    pub(crate) fn closing(&self, addr: SocketAddr) -> Option<watch::Receiver<bool>> {
        self.0.load().closing.get(&addr).cloned()
    }

    /// The socket table a `Welcome` carries.
    pub(crate) fn announced(&self) -> Vec<LocalSocket> {
        self.0.load().announced.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Every socket with whether it is draining, for `Status`.
    pub(crate) fn states(&self) -> Vec<(LocalSocket, bool)> {
        self.0.load().announced.clone()
    }

    /// (configured, draining) socket counts.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let table = self.0.load();
        let draining = table.announced.iter().filter(|(_, d)| *d).count();
        (table.announced.len() - draining, draining)
    }
}

/// A socket's receive or accept loop.
type SocketLoop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A socket bound and not yet serving.
#[derive(Debug)]
pub(crate) enum Bound {
    Udp(Arc<UdpSocket>),
    Stream(TcpListener),
}

/// Binds `entry`'s socket; the error names its configuration key.
pub(crate) async fn bind(entry: &SocketEntry) -> Result<Bound, Error> {
    let name = transport_name(entry.transport);
    let why = |e: std::io::Error| {
        key_error(&entry.key, format!("cannot bind {}/{name}: {e}", entry.addr))
    };
    Ok(match entry.transport {
        Transport::Udp => Bound::Udp(Arc::new(UdpSocket::bind(entry.addr).await.map_err(why)?)),
        _ => Bound::Stream(TcpListener::bind(entry.addr).await.map_err(why)?),
    })
}

/// One socket the manager runs.
#[derive(Debug)]
struct Slot {
    entry: SocketEntry,
    /// UDP: the socket, kept for the table while it serves.
    udp: Option<Arc<UdpSocket>>,
    /// Ends the socket's loop: the receive loop of a UDP socket when it closes, the accept
    /// loop of a TCP/TLS socket as soon as it drains.
    stop_loop: watch::Sender<bool>,
    /// TCP/TLS: ends its connections when it closes.
    close: watch::Sender<bool>,
    /// Since when it drains; `None` while configured.
    draining_since: Option<Instant>,
}

/// What a reload changes, decided from the keys alone ([`plan`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Configured now and not served: to bind (draining TCP/TLS sockets need a new listener).
    pub(crate) bind: Vec<Key>,
    /// Draining UDP sockets configured again: serving already, they only stop draining.
    pub(crate) reactivate: Vec<Key>,
    /// Served and no longer configured: to drain.
    pub(crate) drain: Vec<Key>,
}

/// Compares what is served (`current`: each key with whether it drains) with `wanted`.
pub(crate) fn plan(current: &[(Key, bool)], wanted: &[Key]) -> Plan {
    let mut out = Plan::default();
    for key in wanted {
        match current.iter().find(|(k, _)| k == key) {
            Some((_, false)) => {}
            Some((_, true)) if key.1 == Transport::Udp => out.reactivate.push(*key),
            _ => out.bind.push(*key),
        }
    }
    for (key, draining) in current {
        if !draining && !wanted.contains(key) {
            out.drain.push(*key);
        }
    }
    out
}

/// Whether a draining socket is done: a UDP socket once `drain_for` has passed, a TCP/TLS
/// socket also as soon as it has no connection left.
pub(crate) fn drained(
    transport: Transport,
    drained_for: Duration,
    drain_for: Duration,
    connections: usize,
) -> bool {
    drained_for >= drain_for || (transport != Transport::Udp && connections == 0)
}

/// The task that owns the sockets: starts their loops, applies reloads, closes drained ones.
pub(crate) struct Manager {
    ctx: Arc<Context>,
    config: DispatcherConfig,
    /// Configured sockets in configuration order, then draining ones.
    slots: Vec<Slot>,
    loops: JoinSet<()>,
    /// A `Welcome` some processor could not queue; retried on the next tick.
    announce_pending: bool,
}

impl Manager {
    /// A manager serving `bound` (one per socket entry of `config`, in its order).
    pub(crate) fn new(
        ctx: Arc<Context>,
        config: DispatcherConfig,
        bound: Vec<(SocketEntry, Bound)>,
    ) -> Self {
        let mut manager =
            Self { ctx, config, slots: Vec::new(), loops: JoinSet::new(), announce_pending: false };
        let loops: Vec<_> = bound.into_iter().map(|(e, socket)| manager.add(e, socket)).collect();
        manager.publish();
        manager.spawn(loops);
        manager
    }

    /// Serves until `stop`, applying each configuration from `reloads`.
    pub(crate) async fn run(
        mut self,
        mut reloads: mpsc::Receiver<DispatcherConfig>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reloading = true;
        loop {
            tokio::select! {
                () = crate::stopped(&mut stop) => break,
                config = reloads.recv(), if reloading => match config {
                    Some(config) => self.reload(config).await,
                    // Nobody can ask for a reload any more; keep serving.
                    None => reloading = false,
                },
                _ = tick.tick() => self.on_tick(),
                Some(_) = self.loops.join_next() => {}
            }
        }
        for slot in &self.slots {
            let _ = slot.stop_loop.send(true);
            let _ = slot.close.send(true);
        }
        while self.loops.join_next().await.is_some() {}
    }

    /// Takes `entry` on `socket` into service — a new slot, or a draining TCP/TLS slot that
    /// listens again — and returns its loop, to be spawned once the table is published (a
    /// connection accepted before that would find no socket).
    fn add(&mut self, entry: SocketEntry, socket: Bound) -> SocketLoop {
        let key = (entry.addr, entry.transport);
        let (stop_loop, loop_stopped) = watch::channel(false);
        let ctx = Arc::clone(&self.ctx);
        let addr = entry.addr;
        match socket {
            Bound::Udp(socket) => {
                let udp = Arc::clone(&socket);
                let (close, _) = watch::channel(false);
                self.slots.push(Slot {
                    entry,
                    udp: Some(socket),
                    stop_loop,
                    close,
                    draining_since: None,
                });
                Box::pin(crate::udp::serve(ctx, udp, addr, loop_stopped))
            }
            Bound::Stream(listener) => {
                let transport = entry.transport;
                if let Some(slot) =
                    self.slots.iter_mut().find(|s| (s.entry.addr, s.entry.transport) == key)
                {
                    // Configured again while draining: its connections carry on.
                    slot.stop_loop = stop_loop;
                    slot.draining_since = None;
                    slot.entry = entry;
                } else {
                    let (close, _) = watch::channel(false);
                    self.slots.push(Slot {
                        entry,
                        udp: None,
                        stop_loop,
                        close,
                        draining_since: None,
                    });
                }
                Box::pin(crate::stream::serve(ctx, listener, addr, transport, loop_stopped))
            }
        }
    }

    fn spawn(&mut self, loops: Vec<SocketLoop>) {
        for socket_loop in loops {
            self.loops.spawn(socket_loop);
        }
    }

    /// Applies a re-read configuration: all of its sockets or none.
    async fn reload(&mut self, config: DispatcherConfig) {
        if let Err(e) = config.validate() {
            warn!("SIGHUP: sockets unchanged: {e}");
            return;
        }
        let restart = restart_keys(&self.config, &config);
        if !restart.is_empty() {
            warn!(
                "SIGHUP: {} changed: takes effect only after a restart (main, aliases, \
                 socket_drain_secs and log_level apply now)",
                restart.join(", ")
            );
        }
        let certificates = match self.ctx.streams.tls.prepare(&config) {
            Ok(c) => c,
            Err(e) => {
                warn!("SIGHUP: sockets unchanged: {e}");
                return;
            }
        };
        let wanted = config.socket_entries();
        let current: Vec<(Key, bool)> = self
            .slots
            .iter()
            .map(|s| ((s.entry.addr, s.entry.transport), s.draining_since.is_some()))
            .collect();
        let keys: Vec<Key> = wanted.iter().map(|e| (e.addr, e.transport)).collect();
        let plan = plan(&current, &keys);
        let mut fresh = Vec::new();
        for entry in wanted.iter().filter(|e| plan.bind.contains(&(e.addr, e.transport))) {
            match bind(entry).await {
                Ok(socket) => fresh.push((entry.clone(), socket)),
                Err(e) => {
                    // What was bound so far is dropped, closing it: nothing changed.
                    warn!("SIGHUP: sockets unchanged: {e}");
                    return;
                }
            }
        }

        self.ctx.streams.tls.install(certificates);
        let now = Instant::now();
        for slot in &mut self.slots {
            let key = (slot.entry.addr, slot.entry.transport);
            if plan.drain.contains(&key) {
                slot.draining_since = Some(now);
                if slot.entry.transport != Transport::Udp {
                    let _ = slot.stop_loop.send(true);
                }
                info!(
                    "SIGHUP: sip {} socket {} draining: closes within {} s",
                    transport_name(key.1),
                    key.0,
                    config.socket_drain.as_secs()
                );
            } else if plan.reactivate.contains(&key) {
                slot.draining_since = None;
                info!("SIGHUP: sip udp socket {} configured again", key.0);
            }
            // Domain, realm, algorithms and the alias flag may have changed.
            if let Some(entry) = wanted.iter().find(|e| (e.addr, e.transport) == key) {
                slot.entry = entry.clone();
            }
        }
        let added: Vec<String> = fresh
            .iter()
            .map(|(e, _)| format!("{}/{}", e.addr, transport_name(e.transport)))
            .collect();
        let loops: Vec<_> = fresh.into_iter().map(|(e, socket)| self.add(e, socket)).collect();
        // Configuration order, draining sockets last.
        let order = |slot: &Slot| {
            keys.iter()
                .position(|k| *k == (slot.entry.addr, slot.entry.transport))
                .unwrap_or(usize::MAX)
        };
        self.slots.sort_by_key(order);
        self.ctx.destinations.add_own(wanted.iter().map(|e| e.addr));
        self.config = config;
        self.publish();
        self.spawn(loops);
        self.announce();
        info!(
            "SIGHUP: sockets reloaded: {} added{}, {} draining, {} in service",
            added.len(),
            if added.is_empty() { String::new() } else { format!(" ({})", added.join(", ")) },
            plan.drain.len(),
            self.slots.len()
        );
    }

    /// Closes the draining sockets that are done, and retries a missed announcement.
    fn on_tick(&mut self) {
        let now = Instant::now();
        let drain_for = self.config.socket_drain;
        let mut closed = Vec::new();
        let streams = &self.ctx.streams;
        self.slots.retain(|slot| {
            let Some(since) = slot.draining_since else { return true };
            let (addr, transport) = (slot.entry.addr, slot.entry.transport);
            let connections = if transport == Transport::Udp {
                0
            } else {
                streams.connections_on(addr, transport)
            };
            if !drained(transport, now.duration_since(since), drain_for, connections) {
                return true;
            }
            let _ = slot.stop_loop.send(true);
            let _ = slot.close.send(true);
            closed.push(format!(
                "{addr}/{}{}",
                transport_name(transport),
                if connections > 0 {
                    format!(" ({connections} connections closed)")
                } else {
                    String::new()
                }
            ));
            false
        });
        if !closed.is_empty() {
            info!("drained sockets closed: {}", closed.join(", "));
            self.publish();
            self.announce();
        } else if self.announce_pending {
            self.announce();
        }
    }

    /// Makes the slots what every reader sees.
    fn publish(&self) {
        let mut table = Table::default();
        for slot in &self.slots {
            let e = &slot.entry;
            if let Some(udp) = &slot.udp {
                table.udp.insert(e.addr, Arc::clone(udp));
            } else {
                table.streams.insert(e.addr, e.transport);
                table.closing.insert(e.addr, slot.close.subscribe());
            }
            table.announced.push((e.local_socket(), slot.draining_since.is_some()));
        }
        self.ctx.sockets.0.store(Arc::new(table));
    }

    /// Sends every linked processor the current table.
    fn announce(&mut self) {
        let welcome = DispatcherMessage {
            kind: Some(DKind::Welcome(Welcome {
                dispatcher_id: self.ctx.router.dispatcher_id.clone(),
                sockets: self.ctx.sockets.announced(),
            })),
        };
        let missed = self.ctx.router.members.broadcast(&welcome);
        if missed > 0 {
            warn!("socket table not queued for {missed} busy processor(s); retrying");
        }
        self.announce_pending = missed > 0;
    }
}

/// The keys that differ between `old` and `new` and that only a restart applies.
pub(crate) fn restart_keys(old: &DispatcherConfig, new: &DispatcherConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |key: &'static str, same: bool| {
        if !same {
            out.push(key);
        }
    };
    check("id", old.id == new.id);
    check("grpc_listen", old.grpc_listen == new.grpc_listen);
    check("retry_after_secs", old.retry_after_secs == new.retry_after_secs);
    check("queue_depth", old.queue_depth == new.queue_depth);
    check("heartbeat_timeout_secs", old.heartbeat_timeout == new.heartbeat_timeout);
    check("worker_threads", old.worker_threads == new.worker_threads);
    check("link_secret", old.link_secret == new.link_secret);
    check("metrics_listen", old.metrics_listen == new.metrics_listen);
    check("log_format", old.log_format == new.log_format);
    check(
        "destination_deny_networks",
        old.destination_deny_networks == new.destination_deny_networks,
    );
    check("the guard keys (source_rate_limit …)", old.guard == new.guard);
    check("the stream keys (max_message_size, tcp_* …)", old.streams == new.streams);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, t: Transport) -> Key {
        (s.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))), t)
    }

    #[test]
    fn a_reload_binds_the_new_drains_the_removed_and_revives_the_draining() {
        let (udp, tcp) = (Transport::Udp, Transport::Tcp);
        let current = [
            (key("127.0.0.1:5060", udp), false),
            (key("127.0.0.2:5060", udp), false),
            (key("127.0.0.2:5060", tcp), false),
            (key("127.0.0.3:5060", udp), true),
            (key("127.0.0.3:5060", tcp), true),
            (key("127.0.0.4:5060", udp), true),
        ];
        let wanted = [
            key("127.0.0.1:5060", udp),
            key("127.0.0.3:5060", udp),
            key("127.0.0.3:5060", tcp),
            key("127.0.0.5:5060", udp),
            key("127.0.0.5:5060", tcp),
        ];
        let p = plan(&current, &wanted);
        assert_eq!(
            p.bind,
            vec![
                key("127.0.0.3:5060", tcp),
                key("127.0.0.5:5060", udp),
                key("127.0.0.5:5060", tcp)
            ],
            "new sockets, and a draining listener that was closed"
        );
        assert_eq!(p.reactivate, vec![key("127.0.0.3:5060", udp)]);
        assert_eq!(p.drain, vec![key("127.0.0.2:5060", udp), key("127.0.0.2:5060", tcp)]);
        // 127.0.0.4 keeps draining: it is neither wanted nor drained twice.
        assert_eq!(plan(&current[..1], &wanted[..1]), Plan::default(), "nothing to do");
        assert_eq!(
            plan(&[], &wanted[..1]).bind,
            wanted[..1].to_vec(),
            "the first configuration binds everything"
        );
    }

    #[test]
    fn udp_drains_for_the_whole_time_streams_until_their_last_connection() {
        let limit = Duration::from_secs(300);
        let early = Duration::from_secs(10);
        assert!(!drained(Transport::Udp, early, limit, 0), "udp has no connections to wait for");
        assert!(drained(Transport::Udp, limit, limit, 0));
        assert!(!drained(Transport::Tcp, early, limit, 3));
        assert!(drained(Transport::Tcp, early, limit, 0), "last connection gone");
        assert!(drained(Transport::Tls, limit, limit, 3), "time is up: connections closed");
        assert!(drained(Transport::Tls, Duration::MAX, limit, usize::MAX));
    }

    #[test]
    fn only_socket_keys_apply_without_a_restart() -> Result<(), Error> {
        let base =
            "[dispatcher]\nid = \"d1\"\n[dispatcher.main]\nip = \"127.0.0.1\"\ndomain = \"d\"\n";
        let old = DispatcherConfig::from_toml_str(base)?;
        let aliases = format!("{base}[[dispatcher.aliases]]\nip = \"127.0.0.2\"\ndomain = \"d\"\n")
            .replace(
                "[dispatcher]\n",
                "[dispatcher]\nsocket_drain_secs = 5\nlog_level = \"debug\"\n",
            );
        assert!(restart_keys(&old, &DispatcherConfig::from_toml_str(&aliases)?).is_empty());
        let other =
            base.replace("id = \"d1\"", "id = \"d2\"\nqueue_depth = 7\nmax_connections = 3");
        assert_eq!(
            restart_keys(&old, &DispatcherConfig::from_toml_str(&other)?),
            vec!["id", "queue_depth", "the stream keys (max_message_size, tcp_* …)"]
        );
        Ok(())
    }
}
