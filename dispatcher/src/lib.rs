//! The sipalias dispatcher: the stateless SIP edge of the cluster.
//!
//! It owns every SIP socket — the main IP and each alias IP, UDP, TCP and TLS, on their
//! standard and extra ports — every TCP/TLS connection, and the gRPC edge link processors dial
//! in to. Each datagram, or message framed on a connection, is scanned for its routing keys and
//! queued to one processor ([`route`]); each `Send` a processor asks for is put on the wire from
//! exactly the local socket it names, over the connection it names when that is open
//! ([`link`]). When no processor can take a request the dispatcher answers `503` itself. It
//! keeps no per-call state; connections are the only state, and processors see their ids.
//! (While a processor drains, the Call-IDs of INVITEs diverted away from it are remembered so
//! that their CANCELs follow them; see [`route`].) Processors that stop heartbeating are
//! dropped; `Edge.Status` and the [`status`] table give operators the cluster view.
//!
//! Start it with [`run`] (binds what the configuration says), or bind first and call
//! [`run_with`] — tests bind port 0 that way and learn the real addresses before start-up.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sipalias_proto::edge::Transport;
use sipalias_proto::edge::edge_server::EdgeServer;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

mod clock;
pub mod config;
mod connection;
mod destination;
mod egress;
pub mod error;
pub mod guard;
mod ingress;
mod link;
pub mod membership;
pub mod route;
mod sockets;
pub mod status;
mod stream;
mod telemetry;
mod tls;

pub use tls::AnyCertificate;
mod udp;
mod wire;

pub use config::{DispatcherConfig, IpConfig, StreamLimits};
pub use error::Error;
pub use membership::{Membership, ProcessorStatus};

/// How often the gRPC server pings an idle processor link, and how long it waits for the
/// answer: a processor whose host vanished without closing TCP leaves routing within ~10 s.
const LINK_KEEPALIVE: Duration = Duration::from_secs(5);
/// How long shutdown waits for links and loops to finish before abandoning them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Sockets bound before start-up: one UDP socket or TCP listener per socket-table entry (any
/// order within each list) and the gRPC edge listener.
#[derive(Debug)]
pub struct Listeners {
    /// One per UDP entry of [`DispatcherConfig::sockets`], bound to exactly that address.
    pub udp: Vec<UdpSocket>,
    /// One per TCP entry ([`DispatcherConfig::tcp_addrs`]).
    pub tcp: Vec<TcpListener>,
    /// One per TLS entry ([`DispatcherConfig::tls_addrs`]): plain TCP listeners, the
    /// dispatcher does the TLS handshake.
    pub tls: Vec<TcpListener>,
    /// Where processors dial in; its address need not be `grpc_listen` (tests bind port 0).
    pub grpc: TcpListener,
}

impl Listeners {
    /// Binds every socket the configuration names: each UDP socket of the socket table and
    /// `grpc_listen`. The configuration should be validated first (as [`run`] does).
    pub async fn bind(config: &DispatcherConfig) -> Result<Self, Error> {
        let mut udp = Vec::new();
        for addr in config.udp_addrs() {
            let socket = UdpSocket::bind(addr).await.map_err(|source| Error::Bind {
                what: "sip udp",
                addr,
                source,
            })?;
            udp.push(socket);
        }
        let mut stream = [Vec::new(), Vec::new()];
        for (i, (what, addrs)) in [("sip tcp", config.tcp_addrs()), ("sip tls", config.tls_addrs())]
            .into_iter()
            .enumerate()
        {
            for addr in addrs {
                let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind {
                    what,
                    addr,
                    source,
                })?;
                stream[i].push(listener);
            }
        }
        let [tcp, tls] = stream;
        let grpc = TcpListener::bind(config.grpc_listen).await.map_err(|source| Error::Bind {
            what: "edge grpc",
            addr: config.grpc_listen,
            source,
        })?;
        Ok(Self { udp, tcp, tls, grpc })
    }
}

/// Validates `config`, reads its certificates, binds its sockets and serves until `shutdown`
/// completes.
///
/// Returns `Ok(())` after a clean shutdown, or the error that stopped start-up or a listener.
/// A bad configuration or certificate is an [`Error::Config`], found before anything is bound.
pub async fn run(
    config: DispatcherConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_reloading(config, mpsc::channel(1).1, shutdown).await
}

/// As [`run`], and applies every configuration received on `reloads` (what the binary does
/// on SIGHUP): the main IP, the aliases and their ports change without a restart — new
/// sockets bound, removed ones drained then closed, processors told. A configuration that
/// cannot be applied (invalid, a socket that cannot be bound, a bad certificate) changes
/// nothing and is logged.
pub async fn run_reloading(
    config: DispatcherConfig,
    reloads: mpsc::Receiver<DispatcherConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let tls = Tls::load(&config)?;
    let listeners = Listeners::bind(&config).await?;
    serve(config, tls, listeners, reloads, shutdown).await
}

/// Checks a configuration as start-up would, binding nothing: every value, and the
/// certificates and keys it names (`--check-config`).
pub fn check(config: &DispatcherConfig) -> Result<(), Error> {
    config.validate()?;
    Tls::load(config).map(|_| ())
}

/// Serves on already-bound `listeners` until `shutdown` completes.
///
/// The UDP sockets and TCP/TLS listeners must match the configuration's socket table one to
/// one (by local address and transport); the gRPC listener may be bound anywhere
/// (`grpc_listen` is then only what [`run`] would have bound). Once a processor has received
/// its `Welcome` it is routable.
pub async fn run_with(
    config: DispatcherConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let tls = Tls::load(&config)?;
    serve(config, tls, listeners, mpsc::channel(1).1, shutdown).await
}

/// Both sides of TLS, read from the configuration before anything is bound.
struct Tls {
    servers: tls::Servers,
    client: Arc<rustls::ClientConfig>,
}

impl Tls {
    fn load(config: &DispatcherConfig) -> Result<Self, Error> {
        Ok(Self {
            servers: tls::Servers::load(config)?,
            client: tls::client_config(&config.streams)?,
        })
    }
}

async fn serve(
    config: DispatcherConfig,
    tls: Tls,
    listeners: Listeners,
    reloads: mpsc::Receiver<DispatcherConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let entries = config.socket_entries();
    let mut udp: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    for socket in listeners.udp {
        let addr = socket
            .local_addr()
            .map_err(|e| Error::Listeners(format!("cannot read a udp socket's address: {e}")))?;
        if udp.insert(addr, socket).is_some() {
            return Err(Error::Listeners(format!("two udp sockets bound to {addr}")));
        }
    }
    let mut streams: HashMap<SocketAddr, (TcpListener, Transport)> = HashMap::new();
    for (transport, list) in [(Transport::Tcp, listeners.tcp), (Transport::Tls, listeners.tls)] {
        for listener in list {
            let addr = listener.local_addr().map_err(|e| {
                Error::Listeners(format!("cannot read a tcp listener's address: {e}"))
            })?;
            if streams.insert(addr, (listener, transport)).is_some() {
                return Err(Error::Listeners(format!("two tcp listeners bound to {addr}")));
            }
        }
    }
    let given = udp.len() + streams.len();
    // Each entry takes its own socket, so none is left over when the counts match.
    let mut bound = Vec::with_capacity(entries.len());
    for entry in &entries {
        let name = wire::transport_name(entry.transport);
        let socket = if entry.transport == Transport::Udp {
            udp.remove(&entry.addr).map(|s| sockets::Bound::Udp(Arc::new(s)))
        } else {
            match streams.remove(&entry.addr) {
                Some((listener, t)) if t == entry.transport => {
                    Some(sockets::Bound::Stream(listener))
                }
                _ => None,
            }
        };
        let Some(socket) = socket else {
            return Err(Error::Listeners(format!(
                "no {name} socket bound to {} (dispatcher.{})",
                entry.addr, entry.key
            )));
        };
        bound.push((entry.clone(), socket));
    }
    if given != entries.len() {
        return Err(Error::Listeners(format!(
            "{given} sockets given for {} socket-table entries",
            entries.len()
        )));
    }
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .map_err(|e| Error::Listeners(format!("cannot read the grpc listener's address: {e}")))?;

    let (stop_tx, stop) = watch::channel(false);
    let ctx = Arc::new(Context {
        router: ingress::Router {
            dispatcher_id: config.id.clone(),
            retry_after_secs: config.retry_after_secs,
            members: Membership::default(),
            guard: guard::Guard::new(config.guard.clone(), Instant::now()),
        },
        queue_depth: config.queue_depth,
        heartbeat_timeout: config.heartbeat_timeout,
        started: Instant::now(),
        sockets: sockets::Live::default(),
        streams: stream::Streams::new(&config.id, config.streams.clone(), tls.servers, tls.client),
        destinations: destination::Destinations::new(
            config.destination_deny_networks.clone(),
            entries.iter().map(|e| e.addr).chain([config.grpc_listen, grpc_addr]),
        ),
        stop: stop.clone(),
    });

    let mut tasks: JoinSet<Result<(), Error>> = JoinSet::new();
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            Error::Listeners(format!("dispatcher.metrics_listen: cannot bind {addr}: {e}"))
        })?;
        let ready_ctx = Arc::clone(&ctx);
        // Ready once SIP can be routed: the sockets are bound (above) and a processor that is
        // not draining is linked.
        let ready = sipalias_ops::probe(move || {
            let linked = ready_ctx.router.members.status().iter().any(|p| !p.draining);
            async move { if linked { Ok(()) } else { Err("no processor linked".into()) } }
        });
        let metrics = sipalias_ops::install_metrics();
        let (state_ctx, mut state_stop) = (Arc::clone(&ctx), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(telemetry::STATE_INTERVAL);
            loop {
                tokio::select! {
                    _ = tick.tick() => telemetry::record_state(&state_ctx, Instant::now()),
                    () = stopped(&mut state_stop) => return Ok(()),
                }
            }
        });
        let mut stop = stop.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            sipalias_ops::serve(listener, metrics, ready, stopped)
                .await
                .map_err(|e| Error::Task(format!("ops listener: {e}")))
        });
    }
    {
        let manager = sockets::Manager::new(Arc::clone(&ctx), config.clone(), bound);
        let stop = stop.clone();
        tasks.spawn(async move {
            manager.run(reloads, stop).await;
            Ok(())
        });
    }
    {
        let (ctx, stop, every) = (Arc::clone(&ctx), stop.clone(), config.streams.tls_reload);
        tasks.spawn(async move {
            ctx.streams.tls.reload_loop(every, stop).await;
            Ok(())
        });
    }
    // Validated above, so this cannot fail; an error here would still stop start-up cleanly.
    let require = sipalias_proto::link_auth::Require::new(&config.link_secret)
        .map_err(|why| config::key_error("link_secret", why))?;
    if config.link_secret.is_empty() {
        warn!("no link_secret: any local process can link as a processor (loopback only)");
    }
    tasks.spawn(serve_grpc(Arc::clone(&ctx), listeners.grpc, grpc_addr, require, stop.clone()));

    let early = tokio::select! {
        () = shutdown => None,
        ended = tasks.join_next() => ended,
    };
    // Every loop and link watches this; the gRPC server then finishes gracefully.
    let _ = stop_tx.send(true);
    let mut result = match early {
        None => Ok(()),
        Some(Ok(Err(e))) => Err(e),
        Some(Ok(Ok(()))) => Err(Error::Task("a listener stopped before shutdown".into())),
        Some(Err(join)) => Err(Error::Task(join.to_string())),
    };
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(ended) = tasks.join_next().await {
            let failure = match ended {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(join) => Error::Task(join.to_string()),
            };
            if result.is_ok() {
                result = Err(failure);
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!("shutdown: listeners still busy after {DRAIN_TIMEOUT:?}; abandoning them");
        tasks.shutdown().await;
    }
    info!("dispatcher {} stopped", config.id);
    result
}

async fn serve_grpc(
    ctx: Arc<Context>,
    listener: TcpListener,
    addr: SocketAddr,
    require: sipalias_proto::link_auth::Require,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    info!("edge grpc listening on {addr}");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    // The standard gRPC health protocol (grpc.health.v1), open without the link secret so that
    // probes need none: the edge serves from here until the stop, then says NOT_SERVING while
    // the links finish.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EdgeServer<link::EdgeService>>().await;
    let mut watch_stop = stop.clone();
    tokio::spawn(async move {
        stopped(&mut watch_stop).await;
        health.set_not_serving::<EdgeServer<link::EdgeService>>().await;
    });
    Server::builder()
        .http2_keepalive_interval(Some(LINK_KEEPALIVE))
        .http2_keepalive_timeout(Some(LINK_KEEPALIVE))
        .add_service(health_service)
        .add_service(EdgeServer::with_interceptor(link::EdgeService::new(ctx), require))
        .serve_with_incoming_shutdown(incoming, async move { stopped(&mut stop).await })
        .await?;
    Ok(())
}

/// Completes once the stop signal is raised (or its sender is gone, which also means stop).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What the receive loops and the links share.
#[derive(Debug)]
pub(crate) struct Context {
    /// What routing a received message needs (the id, the membership table, the guard).
    router: ingress::Router,
    queue_depth: usize,
    /// Silence after which a processor's link is ended.
    heartbeat_timeout: Duration,
    /// When serving began (the `Status` RPC reports uptime).
    started: Instant,
    /// The SIP sockets in service (changed by a SIGHUP); `Welcome` carries them.
    sockets: sockets::Live,
    /// TCP and TLS: listeners' sockets, open connections, certificates.
    streams: stream::Streams,
    /// Where sends may go.
    destinations: destination::Destinations,
    /// Turns true once at shutdown.
    stop: watch::Receiver<bool>,
}
