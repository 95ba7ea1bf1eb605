//! The cluster's own links (docs/security.md, "forged cluster members"): whoever reaches the
//! dispatcher's edge port or billing's port without the cluster's `link_secret` is refused,
//! and a live processor's id cannot be taken over, even with the secret.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail, ensure};
use sipalias_proto::billing::billing_client::BillingClient;
use sipalias_proto::billing::{AccountingStopRequest, AuthorizeRequest, GetAccountRequest};
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::edge_client::EdgeClient;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{Hello, ProcessorMessage};
use sipalias_proto::link_auth::Present;
use sipalias_tests::cluster::{DOMAIN, LINK_SECRET};
use sipalias_tests::phone::Phone;
use sipalias_tests::status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::{WAIT, cluster, registered};

/// What a processor saying `Hello` as `id` with `secret` is told.
#[derive(Debug)]
enum LinkAnswer {
    /// The call itself was refused with this code.
    Refused(Code),
    /// An edge error naming why, then the end of the stream.
    EdgeError(String),
    /// A `Welcome`: linked.
    Welcome,
}

async fn hello(edge: SocketAddr, id: &str, secret: &str) -> Result<LinkAnswer> {
    let present = Present::new(secret).map_err(anyhow::Error::msg)?;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{edge}"))?.connect().await?;
    let mut client = EdgeClient::with_interceptor(channel, present);
    let (tx, rx) = mpsc::channel(4);
    let hello = Hello { node_id: id.to_owned(), capacity: 1, ..Default::default() };
    tx.send(ProcessorMessage { kind: Some(PKind::Hello(hello)) }).await?;
    let mut stream = match client.link(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(LinkAnswer::Refused(status.code())),
    };
    let first = tokio::time::timeout(WAIT, stream.message()).await.context("no answer")?;
    let answer = match first {
        Err(status) => LinkAnswer::Refused(status.code()),
        Ok(Some(m)) => match m.kind {
            Some(DKind::Welcome(_)) => LinkAnswer::Welcome,
            Some(DKind::Error(e)) => {
                let end = tokio::time::timeout(WAIT, stream.message()).await;
                ensure!(matches!(end, Ok(Ok(None) | Err(_))), "refused link not ended: {end:?}");
                LinkAnswer::EdgeError(e.reason)
            }
            other => bail!("unexpected first message {other:?}"),
        },
        Ok(None) => bail!("link ended without an answer"),
    };
    Ok(answer)
}

/// The code billing answers each of its calls with, presenting `secret`.
async fn billing_codes(billing: SocketAddr, secret: &str) -> Result<Vec<Code>> {
    let present = Present::new(secret).map_err(anyhow::Error::msg)?;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{billing}"))?.connect().await?;
    let mut client = BillingClient::with_interceptor(channel, present);
    let code = |r: std::result::Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let aor = format!("alice@{DOMAIN}");
    let get = client.get_account(GetAccountRequest { aor: aor.clone() }).await.map(drop);
    let authorize = client
        .authorize(AuthorizeRequest {
            caller: aor,
            callee: format!("bob@{DOMAIN}"),
            call_id: "rogue-call".into(),
            ingress_ip: "127.0.0.1".into(),
            call_ref: "rogue-ref".into(),
            credentials: None,
        })
        .await
        .map(drop);
    let stop = client
        .accounting_stop(AccountingStopRequest {
            call_ref: "rogue-ref".into(),
            idempotency_key: "rogue-stop".into(),
            ..Default::default()
        })
        .await
        .map(drop);
    Ok(vec![code(get), code(authorize), code(stop)])
}

/// A rogue process that reaches the edge port cannot link as a processor without the secret
/// (and so never sees a phone's digest), and with the secret cannot take over `p1` while it
/// is alive; billing refuses every call without the secret. The real processors keep their
/// links and their calls go through.
#[test]
fn rogue_processors_and_billing_clients_are_refused_and_the_real_processor_keeps_its_traffic()
-> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let before = status::parse(&cluster.status()?)?;
    let p1_peer = before.processor("p1").context("p1 not linked")?.peer.clone();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let edge = cluster.edge_addr();
    let wrong = "not-the-cluster-secret-0123";
    for (secret, what) in [("", "no secret"), (wrong, "a wrong secret")] {
        match rt.block_on(hello(edge, "p1", secret))? {
            LinkAnswer::Refused(Code::Unauthenticated) => {}
            other => bail!("a Hello as p1 with {what} got {other:?}"),
        }
        match rt.block_on(hello(edge, "rogue", secret))? {
            LinkAnswer::Refused(Code::Unauthenticated) => {}
            other => bail!("a Hello as a new processor with {what} got {other:?}"),
        }
    }
    match rt.block_on(hello(edge, "p1", LINK_SECRET))? {
        LinkAnswer::EdgeError(reason) => {
            ensure!(reason.contains("is linked and alive"), "refused for {reason:?}")
        }
        other => bail!("a takeover of the live p1 got {other:?}"),
    }
    // The secret alone links a new id (the check above is not refusing everyone).
    match rt.block_on(hello(edge, "p-extra", LINK_SECRET))? {
        LinkAnswer::Welcome => {}
        other => bail!("a new id with the secret got {other:?}"),
    }

    let billing = cluster.billing_addr();
    for secret in ["", wrong] {
        let codes = rt.block_on(billing_codes(billing, secret))?;
        ensure!(codes == [Code::Unauthenticated; 3], "billing with {secret:?}: {codes:?}");
    }
    let with_secret = rt.block_on(billing_codes(billing, LINK_SECRET))?;
    ensure!(with_secret[0] == Code::Ok, "GetAccount with the secret: {with_secret:?}");

    let after = status::parse(&cluster.status()?)?;
    let p1 = after.processor("p1").context("p1 lost its link")?;
    ensure!(p1.peer == p1_peer, "p1's link moved from {p1_peer} to {}", p1.peer);
    ensure!(after.processor("p2").is_some(), "p2 lost its link");

    // And calls still work through the real processors.
    let main = cluster.main();
    let mut alice = registered(&cluster.alias2(), "alice", "pw-a")?;
    let mut bob = Phone::new("bob", "pw-b")?;
    super::hostile::answered(&mut bob, &main, &mut alice)?;
    Ok(())
}
