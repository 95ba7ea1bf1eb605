//! Membership: processors that stop heartbeating, processors that drain, and the `Status`
//! cluster view (the RPC and the `status` command).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use sipalias_dispatcher::route;
use std::sync::atomic::Ordering;

use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{Heartbeat, ProcessorMessage};
use sipmsg::scan::make_branch;
use tokio::time::{Instant, timeout};

use crate::harness::*;

/// A Call-ID that the rendezvous hash gives to `owner` among `live`.
fn call_id_for(owner: &str, live: &[&str], tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}@127.0.0.1"))
        .find(|c| route::rendezvous(c, live) == Some(&owner))
        .unwrap_or_default()
}

fn invite(call_id: &str) -> String {
    request("INVITE", "sip:bob@127.0.0.1", call_id)
}

fn call_id_of(message: &[u8]) -> String {
    header(&String::from_utf8_lossy(message), "Call-ID").unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_processor_that_stops_heartbeating_is_dropped_and_its_calls_move() -> Result<()> {
    let d = Dispatcher::start_with("heartbeat_timeout_secs = 2").await?;
    // Taken before the link exists, so the time measured is at least the processor's silence.
    let linked_at = Instant::now();
    let mut silent = FakeProcessor::connect_silent(d.grpc, "fp1").await?;
    let mut alive = FakeProcessor::connect(d.grpc, "fp2").await?;

    // The silent one is told why and its link ends, after the timeout and not long after.
    let ended = timeout(Duration::from_secs(2 * EVENT.as_secs()), async {
        loop {
            match silent.rx.message().await {
                Ok(Some(m)) => match m.kind {
                    Some(DKind::Error(e)) if e.send_id == 0 => {
                        ensure!(e.reason.contains("missed heartbeats"), "{}", e.reason);
                    }
                    other => bail!("unexpected {other:?}"),
                },
                Ok(None) | Err(_) => return Ok(linked_at.elapsed()),
            }
        }
    })
    .await
    .context("the silent processor's link was not ended")??;
    assert!(ended >= Duration::from_secs(2), "ended after {ended:?}, before the timeout");

    // Its Call-IDs now go to the one that heartbeats, which is still linked.
    let phone = Phone::new().await?;
    let call_id = call_id_for("fp1", &["fp1", "fp2"], "moved");
    phone.send(d.main, invite(&call_id).as_bytes()).await?;
    assert_eq!(call_id_of(&alive.next_inbound().await?.message), call_id);
    let status = d.status().await?;
    let ids: Vec<_> = status.processors.iter().map(|p| p.node_id.as_str()).collect();
    assert_eq!(ids, ["fp2"]);
    d.shutdown().await
}

#[tokio::test]
async fn after_drain_new_invites_go_elsewhere_and_its_own_traffic_still_reaches_it() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut fp1 = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut fp2 = FakeProcessor::connect(d.grpc, "fp2").await?;
    let both = ["fp1", "fp2"];
    let phone = Phone::new().await?;
    let barrier_phone = Phone::new().await?;

    // A call in setup on fp1 before the drain.
    let ringing = call_id_for("fp1", &both, "before");
    phone.send(d.main, invite(&ringing).as_bytes()).await?;
    assert_eq!(call_id_of(&fp1.next_inbound().await?.message), ringing);

    fp1.drain().await?;
    fp1.barrier(d.main, &barrier_phone).await?;

    // New INVITEs, half of which fp1 would have won, all go to fp2.
    let call_ids: Vec<String> = (0..20).map(|i| format!("after-{i}@127.0.0.1")).collect();
    ensure!(call_ids.iter().any(|c| route::rendezvous(c, &both) == Some(&"fp1")));
    for call_id in &call_ids {
        phone.send(d.main, invite(call_id).as_bytes()).await?;
    }
    for call_id in &call_ids {
        assert_eq!(&call_id_of(&fp2.next_inbound().await?.message), call_id);
    }

    // fp1 still gets a response to its own request (branch token), even on a Call-ID it
    // would not own, and the CANCEL of the INVITE it had before draining; the CANCEL of an
    // INVITE diverted to fp2 follows it there. Sent in this order from one socket, so fp1's
    // next messages show that none of the INVITEs above reached it.
    let resp = response(&make_branch("fp1", "b1"), &call_ids[0]);
    phone.send(d.alias, resp.as_bytes()).await?;
    assert_eq!(fp1.next_inbound().await?.message, resp.as_bytes());
    let cancel = request("CANCEL", "sip:bob@127.0.0.1", &ringing);
    phone.send(d.main, cancel.as_bytes()).await?;
    assert_eq!(fp1.next_inbound().await?.message, cancel.as_bytes());
    let diverted = call_ids
        .iter()
        .find(|c| route::rendezvous(c, &both) == Some(&"fp1"))
        .context("no diverted call")?;
    let cancel = request("CANCEL", "sip:bob@127.0.0.1", diverted);
    phone.send(d.main, cancel.as_bytes()).await?;
    assert_eq!(fp2.next_inbound().await?.message, cancel.as_bytes());

    // When the other one leaves, new requests get 503 though fp1 is still linked.
    drop(fp2);
    let mut answered = None;
    for i in 0..50 {
        // Leaving is noticed asynchronously: each probe waits for its own answer.
        phone.send(d.main, invite(&format!("late-{i}")).as_bytes()).await?;
        tokio::select! {
            r = phone.recv() => { answered = Some(r?.0); break; }
            m = fp1.next_inbound() => bail!("a new request reached the draining fp1: {m:?}"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let answer = answered.context("no 503 once only a draining processor was left")?;
    assert!(answer.starts_with("SIP/2.0 503 "), "{answer}");
    let status = d.status().await?;
    assert_eq!(status.processors.len(), 1);
    assert!(status.processors[0].draining);
    d.shutdown().await
}

#[tokio::test]
async fn status_shows_each_processor_with_its_load_drain_and_routed_messages() -> Result<()> {
    let before_ms = unix_ms();
    let d = Dispatcher::start().await?;
    let mut fp1 = FakeProcessor::connect(d.grpc, "fp1").await?;
    let fp2 = FakeProcessor::connect(d.grpc, "fp2").await?;
    let phone = Phone::new().await?;
    let barrier_phone = Phone::new().await?;

    let call_ids: Vec<String> =
        (0..3).map(|i| call_id_for("fp1", &["fp1", "fp2"], &format!("s{i}"))).collect();
    for call_id in &call_ids {
        phone.send(d.main, invite(call_id).as_bytes()).await?;
        fp1.next_inbound().await?;
    }
    // The periodic heartbeats report this from now on; one sent now, then a barrier, proves
    // the dispatcher has it.
    fp1.load.transactions.store(12, Ordering::Relaxed);
    fp1.load.dialogs.store(4, Ordering::Relaxed);
    let hb = Heartbeat { transactions: 12, dialogs: 4 };
    fp1.tx.send(ProcessorMessage { kind: Some(PKind::Heartbeat(hb)) }).await?;
    fp1.barrier(d.main, &barrier_phone).await?;
    fp2.drain().await?;
    fp2.barrier(d.main, &barrier_phone).await?;

    let status = d.status().await?;
    let after_ms = unix_ms();
    assert_eq!(status.dispatcher_id, "d-test");
    assert!(status.uptime_ms < after_ms - before_ms + 1000, "uptime {}", status.uptime_ms);
    let [p1, p2] = status.processors.as_slice() else {
        bail!("expected two processors: {status:?}");
    };
    assert_eq!((p1.node_id.as_str(), p2.node_id.as_str()), ("fp1", "fp2"), "sorted by id");
    assert_eq!((p1.transactions, p1.dialogs, p1.draining, p1.routed), (12, 4, false, 3));
    assert_eq!((p2.draining, p2.routed), (true, 0));
    for p in [p1, p2] {
        let peer: SocketAddr = p.peer.parse().with_context(|| format!("peer {:?}", p.peer))?;
        assert_eq!(peer.ip().to_string(), "127.0.0.1");
        assert!((before_ms..=after_ms).contains(&p.connected_at_ms), "{}", p.connected_at_ms);
        assert!(p.last_seen_ms_ago < 2000, "heard from recently: {}", p.last_seen_ms_ago);
        assert_eq!(p.capacity, 100);
    }
    d.shutdown().await
}

#[tokio::test]
async fn status_command_prints_the_cluster_view() -> Result<()> {
    let d = Dispatcher::start().await?;
    let fp1 = FakeProcessor::connect(d.grpc, "fp1").await?;
    let _fp2 = FakeProcessor::connect(d.grpc, "fp2").await?;
    fp1.drain().await?;
    fp1.barrier(d.main, &Phone::new().await?).await?;

    let grpc = format!("http://{}", d.grpc);
    let out = status_command(&["--grpc", &grpc]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("dispatcher d-test at {grpc}: up "))
            && lines[0].ends_with("2 processors linked (1 draining)"),
        "{text}"
    );
    assert!(lines[1].starts_with("PROCESSOR "), "{text}");
    let state = |id: &str| {
        lines.iter().find(|l| l.starts_with(&format!("{id} "))).map(|l| l.contains(" draining "))
    };
    assert_eq!((state("fp1"), state("fp2")), (Some(true), Some(false)), "{text}");

    // A dispatcher that does not answer: exit status 1 and the reason on stderr.
    let out = status_command(&["--grpc", "http://127.0.0.1:1"]).await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("http://127.0.0.1:1"));
    d.shutdown().await
}

/// Runs `sipalias-dispatcher status ARGS` (the real binary) to completion.
async fn status_command(args: &[&str]) -> Result<std::process::Output> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sipalias-dispatcher"));
    command.arg("status").args(args).env_remove("SIPALIAS_CONFIG");
    // The command gives up on a dispatcher after 5 s; this bound is only against a hang.
    let run = tokio::task::spawn_blocking(move || command.output());
    Ok(timeout(EVENT * 3, run).await.context("status did not finish")???)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
