//! SIP over TLS: the certificate of the IP a phone connected to, reloading it without a
//! restart, handshake garbage, and sends over the phone's own TLS connection or a new one.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sipalias_proto::edge::Transport;
use tokio::net::TcpListener;
use tokio::time::timeout;

use crate::harness::*;

/// How long a replaced certificate may take to be served (`tls_reload_secs = 1`).
const RELOAD: Duration = Duration::from_secs(10);

#[tokio::test]
async fn each_ip_presents_its_own_certificate() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    assert_ne!(d.main_cert.der, d.alias3_cert.der);
    let (_, on_main) = tls_connect(d.main_tls).await?;
    assert!(on_main == d.main_cert.der, "127.0.0.1 presents its own certificate");
    for port in [d.alias3_tls, d.alias3_tls_extra] {
        let (_, on_alias) = tls_connect(port).await?;
        assert!(on_alias == d.alias3_cert.der, "{port} presents 127.0.0.3's certificate");
    }
    d.shutdown().await
}

/// Connects until a new connection to `to` is shown `der`, or `RELOAD` passes. Each attempt
/// is an event (a handshake); the pause between attempts only keeps the loop from spinning.
async fn wait_for_certificate(to: SocketAddr, der: &[u8]) -> Result<()> {
    timeout(RELOAD, async {
        loop {
            let (_, got) = tls_connect(to).await?;
            if got == der {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .with_context(|| format!("{to} still presents the old certificate"))?
}

#[tokio::test]
async fn replaced_certificate_files_are_served_to_new_connections_without_a_restart() -> Result<()>
{
    let mut d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let (mut old_conn, old) = tls_connect(d.alias3_tls).await?;
    assert!(old == d.alias3_cert.der);

    d.alias3_cert.renew("127.0.0.3")?;
    assert_ne!(d.alias3_cert.der, old);
    wait_for_certificate(d.alias3_tls, &d.alias3_cert.der).await?;
    let (_, main_now) = tls_connect(d.main_tls).await?;
    assert!(main_now == d.main_cert.der, "the other IP's certificate is untouched");

    // The connection made before the change is still served.
    let options = request("OPTIONS", "sip:127.0.0.3", "before-reload");
    old_conn.send(options.as_bytes()).await?;
    // (The probes' connections were reported closed before it.)
    let inbound = loop {
        match fp.next().await? {
            sipalias_proto::edge::dispatcher_message::Kind::Closed(_) => continue,
            sipalias_proto::edge::dispatcher_message::Kind::Inbound(i) => break i,
            other => bail!("expected inbound, got {other:?}"),
        }
    };
    assert_eq!(inbound.message, options.as_bytes());

    // A broken replacement is not used. Break 127.0.0.3's certificate, then renew the main
    // IP's: once the main IP serves its new one, a reload pass has seen the broken file too.
    let current = d.alias3_cert.der.clone();
    write_atomic(&d.alias3_cert.cert, b"-----BEGIN CERTIFICATE-----\nbroken\n")?;
    d.main_cert.renew("127.0.0.1")?;
    wait_for_certificate(d.main_tls, &d.main_cert.der).await?;
    let (_, still) = tls_connect(d.alias3_tls).await?;
    assert!(still == current, "the previous certificate stays after a bad replacement");
    d.shutdown().await
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_closed_and_tls_still_works() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut junk = tcp_connect([127, 0, 0, 1], d.alias3_tls).await?;
    junk.send(request("OPTIONS", "sip:127.0.0.3", "plain-on-tls").as_bytes()).await?;
    junk.closed().await?;

    let (mut phone, _) = tls_connect(d.alias3_tls).await?;
    let register = request("REGISTER", "sip:127.0.0.3", "after-junk");
    phone.send(register.as_bytes()).await?;
    let inbound = fp.next_inbound().await?;
    assert_eq!(inbound.message, register.as_bytes(), "the junk never reached a processor");
    stream_ingress(&inbound, d.alias3_tls, Transport::Tls)?;
    d.shutdown().await
}

#[tokio::test]
async fn a_send_naming_the_inbound_tls_connection_goes_over_it() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let (mut phone, _) = tls_connect(d.alias3_tls_extra).await?;
    phone.send(request("REGISTER", "sip:127.0.0.3", "reg-tls").as_bytes()).await?;
    let ingress = stream_ingress(&fp.next_inbound().await?, d.alias3_tls_extra, Transport::Tls)?;
    assert_eq!(remote_of(&ingress)?, phone.io.get_ref().0.local_addr()?);

    let invite = request("INVITE", "sip:alice@127.0.0.1", "call-tls");
    let egress = stream_egress(
        d.alias3_tls_extra,
        Transport::Tls,
        remote_of(&ingress)?,
        ingress.connection_id,
    );
    fp.send_full(1, egress, &invite, true).await?;
    // Read on the same TLS session: same local port, no new handshake.
    assert_eq!(phone.recv().await?, invite);
    assert_eq!(phone.io.get_ref().0.peer_addr()?, d.alias3_tls_extra);
    d.shutdown().await
}

#[tokio::test]
async fn a_tls_send_without_a_connection_opens_one_from_the_alias_ip() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    // A TLS phone listening on 127.0.0.6 with a self-signed certificate of its own.
    let dir = tempfile::tempdir()?;
    let phone_cert = CertFiles::create(dir.path(), "phone", "127.0.0.6")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(phone_cert.server_config()?);
    let listener = TcpListener::bind("127.0.0.6:0").await?;

    let invite = request("INVITE", "sip:alice@127.0.0.6", "tls-out");
    fp.send_full(
        2,
        stream_egress(d.alias3_tls, Transport::Tls, listener.local_addr()?, 0),
        &invite,
        false,
    )
    .await?;
    let (tcp, peer) = timeout(EVENT, listener.accept()).await.context("no connection")??;
    assert_eq!(peer.ip().to_string(), "127.0.0.3", "source IP is the alias");
    let tls = timeout(EVENT, acceptor.accept(tcp)).await.context("handshake")??;
    let mut phone = Conn::new(tls);
    assert_eq!(phone.recv().await?, invite);

    let ringing = response(&sipmsg::scan::make_branch("fp1", "t1"), "tls-out");
    phone.send(ringing.as_bytes()).await?;
    let ingress = stream_ingress(&fp.next_inbound().await?, d.alias3_tls, Transport::Tls)?;
    assert_eq!(remote_of(&ingress)?, listener.local_addr()?);

    // Closing it is reported like any other connection.
    drop(phone);
    match fp.next().await? {
        sipalias_proto::edge::dispatcher_message::Kind::Closed(c) => {
            assert_eq!(c.connection_id, ingress.connection_id);
        }
        other => bail!("expected a closed notice, got {other:?}"),
    }
    d.shutdown().await
}
