//! The cluster as operators judge it: calls spread over the processors, a processor added under
//! load, one killed mid-call, one drained with SIGTERM, a dispatcher and Redis restarted, and
//! the `status` view — all with calls flowing through real processes.
//!
//! Which processor handled a call is read from what the callee receives: the top Via branch of
//! the INVITE carries the processor's routing token (`z9hG4bKsa.<node>.…`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sipalias_tests::cdr::Cdr;
use sipalias_tests::cluster::{Cluster, ClusterOptions, KEY_PREFIX};
use sipalias_tests::phone::{Call, Incoming, Phone, Server, sdp};
use sipalias_tests::{status, wait};

use super::{WAIT, assert_sent_from, cluster, complete_call, registered};

/// The processor that sent `req`, from the routing token in its top Via branch.
fn node_of(req: &Incoming) -> Result<String> {
    let via = req.msg.top_via()?;
    let branch = via.branch().with_context(|| format!("{} has no branch", req.summary()))?;
    let node = sipmsg::scan::branch_token(branch)
        .with_context(|| format!("branch {branch} of {} names no processor", req.summary()))?;
    Ok(node.to_owned())
}

/// `3` for `p3`: the harness's number of a processor id.
fn number(node: &str) -> Result<usize> {
    node.strip_prefix('p').and_then(|n| n.parse().ok()).with_context(|| format!("node {node}"))
}

/// Billing's reference of an answered call, minted by the processor that set it up.
fn call_ref(cluster: &Cluster, caller_side: &Call) -> Result<String> {
    cluster.call_ref_of(&caller_side.call_id, WAIT)
}

fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("phone thread panicked"))?
}

/// Both sides of an answered, ACKed call, and the processor that set it up.
struct Established {
    /// The caller's side.
    out: Call,
    /// The callee's side.
    inb: Call,
    node: String,
}

/// `caller` calls `callee` through `server`; the callee, who registered through `callee_via`,
/// gets the INVITE and the ACK from there and answers. Nothing is hung up.
fn establish(
    caller: &mut Phone,
    server: &Server,
    callee: &mut Phone,
    callee_via: SocketAddr,
) -> Result<Established> {
    let mut out =
        caller.invite(server, callee.user(), &sdp(caller.user(), caller.addr().ip(), 40_000))?;
    let invite = callee.recv_request("INVITE", WAIT)?;
    let inb = answer(caller, &mut out, server, callee, &invite, callee_via)?;
    Ok(Established { out, inb, node: node_of(&invite)? })
}

/// The callee answers `invite` (of the caller's `out`) with 200; the caller gets it and ACKs;
/// the callee gets the ACK from `callee_via`. Returns the callee's side of the call.
fn answer(
    caller: &mut Phone,
    out: &mut Call,
    server: &Server,
    callee: &mut Phone,
    invite: &Incoming,
    callee_via: SocketAddr,
) -> Result<Call> {
    assert_sent_from(invite, callee_via)?;
    let answer = sdp(callee.user(), callee.addr().ip(), 50_000);
    let inb = callee.answer(invite, 200, "OK", &answer)?;
    let ok = caller.final_response(out, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    ensure!(ok.from == server.addr, "200 came from {}, expected {}", ok.from, server.addr);
    caller.ack(out)?;
    let ack = recv_in_call(callee, "ACK", &inb.call_id)?;
    ensure!(ack.from == callee_via, "ACK came from {}, expected {callee_via}", ack.from);
    Ok(inb)
}

/// The next `method` request of the call with this Call-ID (others are kept for later).
fn recv_in_call(phone: &mut Phone, method: &str, call_id: &str) -> Result<Incoming> {
    phone.recv_matching(WAIT, &format!("{method} of call {call_id}"), |m| {
        m.method() == Some(method) && m.call_id().is_ok_and(|c| c == call_id)
    })
}

/// `a` hangs up its side `a_call` (its BYE goes to `a_server`, whence the 200 must come);
/// `b` must get the BYE of its leg `b_call_id` from `b_via`, sent from and naming that socket,
/// and answers it.
fn hang_up(
    a: &mut Phone,
    a_call: &mut Call,
    a_server: SocketAddr,
    b: &mut Phone,
    b_call_id: &str,
    b_via: SocketAddr,
) -> Result<()> {
    let bye = a.send_bye(a_call)?;
    let relayed = recv_in_call(b, "BYE", b_call_id)?;
    assert_sent_from(&relayed, b_via).with_context(|| format!("BYE to {}", b.user()))?;
    b.respond(&relayed, 200, "OK", None)?;
    let resp = a.final_response_to(&bye, WAIT)?;
    ensure!(resp.msg.status() == Some(200), "{}'s BYE got {}", a.user(), resp.summary());
    ensure!(resp.from == a_server, "the 200 to the BYE came from {}", resp.from);
    Ok(())
}

/// Waits until billing has a CDR with a duration for every call in `refs`, then asserts each
/// has exactly one.
fn assert_one_cdr_each(cluster: &Cluster, refs: &[String]) -> Result<()> {
    let missing = |cdrs: &[Cdr]| -> Vec<String> {
        refs.iter()
            .filter(|r| !cdrs.iter().any(|c| &c.call_ref == *r && c.duration_ms.is_some()))
            .map(|r| {
                let rows: Vec<_> = cdrs.iter().filter(|c| &c.call_ref == r).collect();
                format!("{r}: {rows:?}")
            })
            .collect()
    };
    let waited = wait::until_every(
        &format!("a CDR with a duration for each of {} calls", refs.len()),
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let cdrs = cluster.cdrs()?;
            Ok(missing(&cdrs).is_empty().then_some(cdrs))
        },
    );
    let cdrs = match waited {
        Ok(cdrs) => cdrs,
        Err(e) => {
            let left = missing(&cluster.cdrs()?);
            bail!("{e:#}; {} calls lack one: {left:#?}", left.len());
        }
    };
    for r in refs {
        let mine: Vec<_> = cdrs.iter().filter(|c| &c.call_ref == r).collect();
        ensure!(mine.len() == 1, "call {r} has {} CDRs: {mine:?}", mine.len());
        ensure!(mine[0].answered_ms.is_some() && mine[0].ended_ms.is_some(), "{:?}", mine[0]);
    }
    Ok(())
}

/// A callee phone answering `calls` calls with 200, and each BYE with 200, every message
/// coming from `via`; returns the processor of each call's INVITE.
fn answer_calls(mut phone: Phone, via: SocketAddr, calls: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut nodes = BTreeMap::new();
    let (mut acked, mut ended) = (HashSet::new(), HashSet::new());
    let answer = sdp(phone.user(), phone.addr().ip(), 50_000);
    while ended.len() < calls {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = phone.recv(left).with_context(|| {
            format!("{} of {calls} calls ended at {}", ended.len(), phone.user())
        })?;
        let call_id = m.msg.call_id()?.to_owned();
        match m.msg.method() {
            Some("INVITE") => {
                assert_sent_from(&m, via)?;
                let node = node_of(&m)?;
                nodes.entry(call_id).or_insert(node);
                // A retransmission (our 200 was slow on a busy machine) gets the same answer.
                phone.answer(&m, 200, "OK", &answer)?;
            }
            Some("ACK") => {
                ensure!(m.from == via, "{} came from {}", m.summary(), m.from);
                acked.insert(call_id);
            }
            Some("BYE") => {
                assert_sent_from(&m, via)?;
                phone.respond(&m, 200, "OK", None)?;
                ensure!(acked.contains(&call_id), "BYE before the ACK of call {call_id}");
                ended.insert(call_id);
            }
            _ => bail!("callee {} got an unexpected {}", phone.user(), m.summary()),
        }
    }
    ensure!(nodes.len() == calls, "{} got {} calls, expected {calls}", phone.user(), nodes.len());
    Ok(nodes.into_values().collect())
}

/// A caller phone placing one call to each of `callees` through `server` (each answered and
/// ACKed), holding them all until the test has checked them (two barrier waits, reached even
/// if placing failed, so no thread is left waiting), then hanging them all up.
fn hold_then_hang_up(
    mut phone: Phone,
    server: Server,
    callees: Vec<String>,
    barrier: Arc<Barrier>,
) -> Result<usize> {
    let placed = (|| -> Result<Vec<Call>> {
        let offer = sdp(phone.user(), phone.addr().ip(), 40_000);
        let mut calls = Vec::new();
        for callee in &callees {
            let mut call = phone.invite(&server, callee, &offer)?;
            let ok = phone.final_response(&mut call, WAIT)?;
            ensure!(ok.msg.status() == Some(200), "call to {callee} got {}", ok.summary());
            ensure!(ok.from == server.addr, "200 came from {}", ok.from);
            phone.ack(&call)?;
            calls.push(call);
        }
        Ok(calls)
    })();
    barrier.wait(); // every caller has placed its calls
    barrier.wait(); // the test has seen them all up at once
    let mut calls = placed?;
    let mut byes = Vec::new();
    for call in &mut calls {
        byes.push(phone.send_bye(call)?);
    }
    for bye in &byes {
        let resp = phone.final_response_to(bye, WAIT)?;
        ensure!(resp.msg.status() == Some(200), "BYE got {}", resp.summary());
        ensure!(resp.from == server.addr, "the 200 to the BYE came from {}", resp.from);
    }
    Ok(calls.len())
}

#[test]
fn hundred_concurrent_calls_are_spread_over_three_processors_none_taking_more_than_half()
-> Result<()> {
    const CALLERS: usize = 10;
    const CALLEES: usize = 5;
    const CALLS_PER_CALLER: usize = 10;
    const CALLS: usize = CALLERS * CALLS_PER_CALLER;
    let cluster = Cluster::start(ClusterOptions { processors: 3, ..ClusterOptions::default() })?;
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut callees = Vec::new();
    for i in 0..CALLEES {
        let user = format!("callee{i}");
        cluster.add_account(&user, "pw")?;
        callees.push(registered(&alias, &user, "pw")?);
    }
    let mut callers = Vec::new();
    for i in 0..CALLERS {
        let user = format!("caller{i}");
        cluster.add_account(&user, "pw")?;
        callers.push(Phone::new(&user, "pw")?);
    }

    let answering: Vec<_> = callees
        .into_iter()
        .map(|phone| {
            let via = alias.addr;
            std::thread::spawn(move || answer_calls(phone, via, CALLS / CALLEES))
        })
        .collect();
    let barrier = Arc::new(Barrier::new(CALLERS + 1));
    let calling: Vec<_> = callers
        .into_iter()
        .enumerate()
        .map(|(i, phone)| {
            // Round robin: every callee gets CALLS / CALLEES calls.
            let targets = (0..CALLS_PER_CALLER)
                .map(|j| format!("callee{}", (i * CALLS_PER_CALLER + j) % CALLEES))
                .collect();
            let (server, barrier) = (main.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || hold_then_hang_up(phone, server, targets, barrier))
        })
        .collect();
    barrier.wait();
    // Every answered call is stored in Redis until it ends: all 100 are up at once.
    let held = wait::until("every call to be stored as a dialog", WAIT, || {
        let n = cluster.redis_keys(&format!("{KEY_PREFIX}dlg:*"))?.len();
        Ok((n == CALLS).then_some(()))
    });
    barrier.wait();
    let mut placed = 0;
    for h in calling {
        placed += join(h)?;
    }
    held?;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for h in answering {
        for node in join(h)? {
            *per_node.entry(node).or_default() += 1;
        }
    }
    ensure!(placed == CALLS, "{placed} calls placed");
    ensure!(per_node.values().sum::<usize>() == CALLS, "calls per processor: {per_node:?}");
    for node in ["p1", "p2", "p3"] {
        let n = per_node.get(node).copied().unwrap_or_default();
        ensure!(n > 0, "{node} handled no call: {per_node:?}");
        ensure!(n <= CALLS / 2, "{node} handled more than half the calls: {per_node:?}");
    }
    wait::until("every dialog to be removed at the end of its call", WAIT, || {
        Ok(cluster.redis_keys(&format!("{KEY_PREFIX}dlg:*"))?.is_empty().then_some(()))
    })?;
    cluster.check_all_running()
}

#[test]
fn calls_of_a_killed_processor_hang_up_from_either_side_from_the_right_socket_once_billed()
-> Result<()> {
    const DOOMED: usize = 20;
    let mut cluster = cluster()?;
    for (user, pw) in [("alice", "pw-a"), ("carol", "pw-c"), ("bob", "pw-b"), ("dave", "pw-d")] {
        cluster.add_account(user, pw)?;
    }
    let main = cluster.main();
    // Callees behind two different alias sockets: the BYE must leave from each one's own.
    let (alias2, alias3x) = (cluster.alias2(), cluster.alias3_extra());
    let mut callees = [
        (registered(&alias2, "alice", "pw-a")?, alias2.addr),
        (registered(&alias3x, "carol", "pw-c")?, alias3x.addr),
    ];
    let mut callers = Vec::new();
    for (user, pw) in [("bob", "pw-b"), ("dave", "pw-d"), ("bob", "pw-b")] {
        callers.push(Phone::new(user, pw)?);
    }

    // Calls until one processor holds DOOMED of them (the other's calls stay up too).
    let mut calls: Vec<(usize, usize, Established)> = Vec::new();
    let victim = loop {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, _, c) in &calls {
            *count.entry(c.node.as_str()).or_default() += 1;
        }
        if let Some((node, _)) = count.into_iter().find(|(_, n)| *n >= DOOMED) {
            break node.to_owned();
        }
        ensure!(calls.len() < 100, "no processor got {DOOMED} of 100 calls");
        let i = calls.len();
        let (ci, ei) = (i % callers.len(), i % callees.len());
        let (callee, via) = &mut callees[ei];
        calls.push((ci, ei, establish(&mut callers[ci], &main, callee, *via)?));
    };
    cluster.kill_processor(number(&victim)?)?;

    let mut refs = Vec::new();
    let doomed = calls.iter_mut().filter(|(_, _, c)| c.node == victim).take(DOOMED);
    for (k, (ci, ei, c)) in doomed.enumerate() {
        refs.push(call_ref(&cluster, &c.out)?);
        let caller = &mut callers[*ci];
        let (callee, via) = &mut callees[*ei];
        if k % 2 == 0 {
            hang_up(caller, &mut c.out, main.addr, callee, &c.inb.call_id, *via)
                .with_context(|| format!("the caller hanging up call {k}"))?;
        } else {
            hang_up(callee, &mut c.inb, *via, caller, &c.out.call_id, main.addr)
                .with_context(|| format!("the callee hanging up call {k}"))?;
        }
    }
    assert_one_cdr_each(&cluster, &refs)?;
    wait::until("the dialogs of the ended calls to be removed", WAIT, || {
        for r in &refs {
            if !cluster.redis_keys(&Cluster::dialog_key(r))?.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;

    // New calls, behind both aliases, go to the survivor.
    for k in 0..4 {
        let (callee, via) = &mut callees[k % 2];
        let invite = complete_call(&mut callers[k % 3], &main, callee, *via)?;
        ensure!(node_of(&invite)? != victim, "a new call went to the dead {victim}");
    }
    cluster.check_all_running()
}

#[test]
fn fourth_processor_started_under_load_gets_new_calls_within_2s_and_no_call_fails() -> Result<()> {
    const LOOPS: usize = 3;
    let mut cluster =
        Cluster::start(ClusterOptions { processors: 3, ..ClusterOptions::default() })?;
    let (main, alias) = (cluster.main(), cluster.alias2());
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for i in 0..LOOPS {
        let (caller_user, callee_user) = (format!("caller{i}"), format!("callee{i}"));
        cluster.add_account(&caller_user, "pw")?;
        cluster.add_account(&callee_user, "pw")?;
        let mut callee = registered(&alias, &callee_user, "pw")?;
        let mut caller = Phone::new(&caller_user, "pw")?;
        let (seen, stop, main, via) =
            (Arc::clone(&seen), Arc::clone(&stop), main.clone(), alias.addr);
        loops.push(std::thread::spawn(move || -> Result<usize> {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let invite = complete_call(&mut caller, &main, &mut callee, via)
                    .with_context(|| format!("call {n} of loop {i} failed"))?;
                let node = node_of(&invite)?;
                seen.lock().unwrap_or_else(PoisonError::into_inner).push((invite.at, node));
                n += 1;
            }
            Ok(n)
        }));
    }
    let seen_now = || seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
    // A loop that stopped early has failed a call: stop waiting and report it.
    let check_loops = |loops: &[JoinHandle<Result<usize>>]| -> Result<()> {
        ensure!(!loops.iter().any(JoinHandle::is_finished), "a call loop ended early");
        Ok(())
    };
    let outcome = (|| -> Result<(Instant, Instant)> {
        wait::until("calls to flow", WAIT, || {
            check_loops(&loops)?;
            Ok((seen_now().len() >= 10).then_some(()))
        })?;
        let connected = cluster.start_processor(4)?;
        let first_p4 = wait::until("p4 to receive a call", WAIT, || {
            check_loops(&loops)?;
            Ok(seen_now().into_iter().find(|(_, n)| n == "p4").map(|(at, _)| at))
        })?;
        // Keep the load on a while after the join.
        wait::until("more calls after the join", WAIT, || {
            check_loops(&loops)?;
            let after: Vec<_> = seen_now().into_iter().filter(|(at, _)| *at > connected).collect();
            Ok((after.len() >= 40 && after.iter().filter(|(_, n)| n == "p4").count() >= 5)
                .then_some(()))
        })?;
        Ok((connected, first_p4))
    })();
    stop.store(true, Ordering::SeqCst);
    let mut placed = 0;
    for h in loops {
        placed += join(h)?;
    }
    let (connected, first_p4) = outcome?;
    let delay = first_p4.saturating_duration_since(connected);
    ensure!(delay <= Duration::from_secs(2), "p4's first call came {delay:?} after it connected");
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (_, node) in seen_now().into_iter().filter(|(at, _)| *at > connected) {
        *per_node.entry(node).or_default() += 1;
    }
    ensure!(per_node.len() == 4, "after the join, calls went to {per_node:?} only");
    eprintln!("{placed} calls; p4 got its first {delay:?} after connecting; after: {per_node:?}");
    cluster.check_all_running()
}

#[test]
fn sigterm_lets_ringing_calls_complete_and_the_processor_exits_within_its_drain_timeout()
-> Result<()> {
    const DRAIN: Duration = Duration::from_secs(5);
    const RINGING: usize = 3;
    let mut cluster = Cluster::start(ClusterOptions {
        processor_toml: format!("drain_timeout_secs = {}\n", DRAIN.as_secs()),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;

    // Calls ringing on one processor (the first call's); calls that land on the other are
    // answered and ended at once.
    let mut callers = Vec::new();
    let mut ringing: Vec<(usize, Call, Incoming)> = Vec::new();
    let mut target = None;
    while ringing.len() < RINGING {
        ensure!(callers.len() < 40, "{RINGING} calls did not ring on one processor");
        let mut caller = Phone::new("bob", "pw-b")?;
        let mut out = caller.invite(&main, "alice", &sdp("bob", caller.addr().ip(), 40_000))?;
        let invite = alice.recv_request("INVITE", WAIT)?;
        let node = node_of(&invite)?;
        if target.get_or_insert_with(|| node.clone()) == &node {
            alice.respond(&invite, 180, "Ringing", None)?;
            let ring = caller.next_response(&mut out, WAIT)?;
            ensure!(ring.msg.status() == Some(180), "caller got {}", ring.summary());
            ringing.push((callers.len(), out, invite));
        } else {
            let mut inb = answer(&mut caller, &mut out, &main, &mut alice, &invite, alias.addr)?;
            hang_up(&mut alice, &mut inb, alias.addr, &mut caller, &out.call_id, main.addr)?;
        }
        callers.push(caller);
    }
    let target = target.context("no call placed")?;
    let n = number(&target)?;

    let mark = cluster.dispatcher().mark();
    cluster.signal_processor_term(n)?;
    cluster.dispatcher().wait_for_line_since(
        mark,
        &format!("processor {target} draining"),
        WAIT,
    )?;
    // The operator's view shows it draining while its calls still ring.
    let view = status::parse(&cluster.status()?)?;
    let row = view.processor(&target).with_context(|| format!("{target} not listed: {view:?}"))?;
    ensure!(row.state == "draining", "{target} is {} while draining: {view:?}", row.state);
    ensure!(view.summary.contains("(1 draining)"), "{}", view.summary);
    // New work goes elsewhere.
    {
        let mut caller = Phone::new("bob", "pw-b")?;
        let invite = complete_call(&mut caller, &main, &mut alice, alias.addr)?;
        ensure!(node_of(&invite)? != target, "a new call went to the draining {target}");
    }

    // The ringing calls are answered now, after the SIGTERM, and complete: all but the last
    // ACKed at once, while the processor still runs (it waits for the last one).
    let (last, first) = ringing.split_last_mut().context("no call rang")?;
    let mut answered = Vec::new();
    for (ci, out, invite) in first {
        let inb = answer(&mut callers[*ci], out, &main, &mut alice, invite, alias.addr)
            .with_context(|| format!("answering a call ringing on the draining {target}"))?;
        answered.push(inb);
    }
    // With its last call answered it has nothing left to wait for and exits.
    let (ci, out, invite) = last;
    assert_sent_from(invite, alias.addr)?;
    let inb = alice.answer(invite, 200, "OK", &sdp("alice", alice.addr().ip(), 50_000))?;
    let ok = callers[*ci].final_response(out, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "the last ringing call got {}", ok.summary());
    let exit = cluster.wait_processor_exit(n, DRAIN + Duration::from_secs(5))?;
    ensure!(exit.status.success(), "{target} exited with {}", exit.status);
    ensure!(
        exit.took < DRAIN,
        "{target} took {:?} to exit, more than its drain timeout",
        exit.took
    );
    // Its ACK comes after the exit: the other processor carries the call on from Redis.
    callers[*ci].ack(out)?;
    let ack = recv_in_call(&mut alice, "ACK", &inb.call_id)?;
    ensure!(ack.from == alias.addr, "ACK came from {}", ack.from);
    answered.push(inb);
    eprintln!("{target} exited {:?} after SIGTERM", exit.took);

    // It is gone: the calls are carried on by the other processor, from Redis.
    let mut refs = Vec::new();
    for (k, ((ci, out, _), inb)) in ringing.iter_mut().zip(&mut answered).enumerate() {
        refs.push(call_ref(&cluster, out)?);
        let caller = &mut callers[*ci];
        if k == 0 {
            hang_up(&mut alice, inb, alias.addr, caller, &out.call_id, main.addr)?;
        } else {
            hang_up(caller, out, main.addr, &mut alice, &inb.call_id, alias.addr)?;
        }
    }
    assert_one_cdr_each(&cluster, &refs)?;
    cluster.check_all_running()
}

#[test]
fn processors_are_back_within_5s_of_a_dispatcher_restart_and_an_earlier_registration_is_called()
-> Result<()> {
    let mut cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;

    let restart = cluster.restart_dispatcher()?;
    ensure!(
        restart.processors_back_after <= Duration::from_secs(5),
        "processors linked {:?} after the new dispatcher listened",
        restart.processors_back_after
    );
    eprintln!("processors linked {:?} after the edge listened", restart.processors_back_after);
    let view = status::parse(&cluster.status()?)?;
    for id in ["p1", "p2"] {
        let row = view.processor(id).with_context(|| format!("{id} not linked: {view:?}"))?;
        ensure!(row.state == "active", "{id} is {}", row.state);
    }
    ensure!(cluster.redis_bindings("alice")?.len() == 1, "alice's binding changed");

    let mut bob = Phone::new("bob", "pw-b")?;
    complete_call(&mut bob, &main, &mut alice, alias.addr)?;
    cluster.check_all_running()
}

#[test]
fn redis_restart_keeps_bindings_and_dialogs_503s_while_down_and_service_resumes_by_itself()
-> Result<()> {
    /// How soon a request must be refused while Redis is down.
    const QUICK: Duration = Duration::from_secs(3);
    let mut cluster =
        Cluster::start(ClusterOptions { redis_persistence: true, ..ClusterOptions::default() })?;
    for (user, pw) in [("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")] {
        cluster.add_account(user, pw)?;
    }
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;
    let mut bob = registered(&main, "bob", "pw-b")?;
    let mut held = establish(&mut bob, &main, &mut alice, alias.addr)?;
    let dialog = Cluster::dialog_key(&call_ref(&cluster, &held.out)?);
    wait::until("the answered call to be stored", WAIT, || {
        Ok((!cluster.redis_keys(&dialog)?.is_empty()).then_some(()))
    })?;
    let bindings_before = (cluster.redis_bindings("alice")?, cluster.redis_bindings("bob")?);

    cluster.stop_redis()?;
    let mut carol = Phone::new("carol", "pw-c")?;
    let asked = Instant::now();
    let reg = carol.register(&main, 300)?;
    let took = asked.elapsed();
    ensure!(reg.status() == 503, "REGISTER with Redis down got {}", reg.response.summary());
    ensure!(
        reg.response.msg.header("retry-after").is_some(),
        "503 to REGISTER without Retry-After"
    );
    ensure!(took <= QUICK, "REGISTER took {took:?} to be refused");
    let mut caller = Phone::new("bob", "pw-b")?;
    let asked = Instant::now();
    let mut refused = caller.invite(&main, "alice", &sdp("bob", caller.addr().ip(), 40_002))?;
    let resp = caller.final_response(&mut refused, WAIT)?;
    let took = asked.elapsed();
    ensure!(resp.msg.status() == Some(503), "INVITE with Redis down got {}", resp.summary());
    ensure!(resp.msg.header("retry-after").is_some(), "503 to INVITE without Retry-After");
    ensure!(took <= QUICK, "INVITE took {took:?} to be refused");
    cluster.check_all_running()?;

    cluster.start_redis()?;
    let bindings_after = (cluster.redis_bindings("alice")?, cluster.redis_bindings("bob")?);
    ensure!(bindings_after == bindings_before, "bindings changed over the Redis restart");
    ensure!(!cluster.redis_keys(&dialog)?.is_empty(), "the answered call's dialog is gone");

    // Nothing restarted but Redis: registrations and calls work again, the held call ends.
    // The very first request after Redis is back must be served, not refused with a 503
    // left over from the outage: a phone obeying Retry-After would lose 5 s more.
    let reg = carol.register(&main, 300)?;
    ensure!(reg.status() == 200, "REGISTER after Redis came back got {}", reg.response.summary());
    complete_call(&mut caller, &main, &mut alice, alias.addr)?;
    hang_up(&mut bob, &mut held.out, main.addr, &mut alice, &held.inb.call_id, alias.addr)?;
    wait::until("the ended call's dialog to be removed", WAIT, || {
        Ok(cluster.redis_keys(&dialog)?.is_empty().then_some(()))
    })?;
    cluster.check_all_running()
}

#[test]
fn cluster_view_lists_both_processors_active_and_the_dialogs_of_the_one_holding_a_call()
-> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;
    let mut bob = Phone::new("bob", "pw-b")?;
    let mut call = establish(&mut bob, &main, &mut alice, alias.addr)?;

    // The load is what the processor reported at its last heartbeat (every 2 s).
    let dialogs_of = |node: &str, pred: fn(u64) -> bool| {
        wait::until_every(
            &format!("the cluster view to show {node}'s dialogs"),
            WAIT,
            Duration::from_millis(200),
            || {
                let view = status::parse(&cluster.status()?)?;
                let held = view.processor(node).is_some_and(|p| pred(p.dialogs));
                Ok(held.then_some(view))
            },
        )
    };
    let view = dialogs_of(&call.node, |d| d >= 1)?;
    ensure!(view.summary.starts_with("dispatcher d1 at http://127.0.0.1:"), "{}", view.summary);
    ensure!(view.summary.contains("2 processors linked"), "{}", view.summary);
    let ids: Vec<&str> = view.processors.iter().map(|p| p.id.as_str()).collect();
    ensure!(ids == ["p1", "p2"], "listed {ids:?}");
    for p in &view.processors {
        ensure!(p.state == "active", "{} is {}", p.id, p.state);
        ensure!(p.peer.starts_with("127.0.0.1:"), "{} links from {}", p.id, p.peer);
    }
    let holder = view.processor(&call.node).context("holder")?;
    ensure!(holder.routed > 0, "nothing routed to {}: {holder:?}", call.node);

    hang_up(&mut bob, &mut call.out, main.addr, &mut alice, &call.inb.call_id, alias.addr)?;
    dialogs_of(&call.node, |d| d == 0)?;
    Ok(())
}

/// Calls between `a` (registered through `a_via`) and `b` (through `b_via`), each answered and
/// hung up, until every processor in `nodes` has set one up in each direction, the callee always
/// hearing from its own socket. Returns the number of calls made.
fn calls_both_ways_on_every_processor(
    a: &mut Phone,
    a_via: &Server,
    b: &mut Phone,
    b_via: &Server,
    nodes: &[&str],
) -> Result<usize> {
    /// Enough rounds for each processor to win a Call-ID (1 in 2 each) in each direction.
    const ROUNDS: usize = 20;
    let (mut b_to_a, mut a_to_b) = (HashSet::new(), HashSet::new());
    let mut calls = 0;
    for round in 0..ROUNDS {
        if nodes.iter().all(|n| b_to_a.contains(*n) && a_to_b.contains(*n)) {
            return Ok(calls);
        }
        // b calls a: INVITE, ACK and BYE reach a from a_via; the 200 reaches b from b_via.
        let mut c = establish(b, b_via, a, a_via.addr)
            .with_context(|| format!("{} calling {}, round {round}", b.user(), a.user()))?;
        if round % 2 == 0 {
            hang_up(b, &mut c.out, b_via.addr, a, &c.inb.call_id, a_via.addr)?;
        } else {
            hang_up(a, &mut c.inb, a_via.addr, b, &c.out.call_id, b_via.addr)?;
        }
        b_to_a.insert(c.node);
        // And the reverse.
        let mut c = establish(a, a_via, b, b_via.addr)
            .with_context(|| format!("{} calling {}, round {round}", a.user(), b.user()))?;
        if round % 2 == 0 {
            hang_up(a, &mut c.out, a_via.addr, b, &c.inb.call_id, b_via.addr)?;
        } else {
            hang_up(b, &mut c.inb, b_via.addr, a, &c.out.call_id, a_via.addr)?;
        }
        a_to_b.insert(c.node);
        calls += 2;
    }
    bail!(
        "after {calls} calls: {} -> {} set up by {b_to_a:?}, the reverse by {a_to_b:?}; \
         expected each of {nodes:?}",
        b.user(),
        a.user()
    )
}

/// The processors linked to a dispatcher, by id, asserting each is active.
fn linked_active(view: &status::ClusterView) -> Result<Vec<&str>> {
    for p in &view.processors {
        ensure!(p.state == "active", "{} is {}: {view:?}", p.id, p.state);
    }
    Ok(view.processors.iter().map(|p| p.id.as_str()).collect())
}

#[test]
fn processors_link_to_two_dispatchers_and_send_each_call_through_the_one_owning_the_socket()
-> Result<()> {
    let mut cluster =
        Cluster::start(ClusterOptions { second_dispatcher: true, ..ClusterOptions::default() })?;
    for (user, pw) in [("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")] {
        cluster.add_account(user, pw)?;
    }
    // Every processor is linked to both dispatchers.
    let (d1_view, d2_view) =
        (status::parse(&cluster.status()?)?, status::parse(&cluster.second_dispatcher_status()?)?);
    ensure!(d1_view.summary.starts_with("dispatcher d1 at "), "{}", d1_view.summary);
    ensure!(d2_view.summary.starts_with("dispatcher d2 at "), "{}", d2_view.summary);
    for view in [&d1_view, &d2_view] {
        ensure!(linked_active(view)? == ["p1", "p2"], "{view:?}");
    }

    // alice behind d2's alias, bob behind d1's main IP, carol behind d1's alias.
    let (main, alias2, d2_alias) = (cluster.main(), cluster.alias2(), cluster.d2_alias()?);
    let mut alice = registered(&d2_alias, "alice", "pw-a")?;
    let mut bob = registered(&main, "bob", "pw-b")?;
    let mut carol = registered(&alias2, "carol", "pw-c")?;
    for (user, dispatcher, via) in
        [("alice", "d2", d2_alias.addr), ("bob", "d1", main.addr), ("carol", "d1", alias2.addr)]
    {
        let bindings = cluster.redis_bindings(user)?;
        ensure!(bindings.len() == 1, "{user} has {} bindings: {bindings:?}", bindings.len());
        let b = bindings.values().next().context("no binding")?;
        ensure!(b["dispatcher"] == dispatcher, "{user}'s binding names {}: {b}", b["dispatcher"]);
        let ingress = (b["ingress"]["ip"].as_str(), b["ingress"]["port"].as_u64());
        ensure!(
            ingress == (Some(&*via.ip().to_string()), Some(u64::from(via.port()))),
            "{user}'s binding records ingress {}, expected {via}",
            b["ingress"]
        );
    }

    // bob -> alice: alice hears only from 127.0.0.5 (d2); alice -> bob: bob only from
    // 127.0.0.1 (d1). Both processors do both, so each sends through both dispatchers.
    let calls =
        calls_both_ways_on_every_processor(&mut alice, &d2_alias, &mut bob, &main, &["p1", "p2"])
            .context("alice on d2, bob on d1")?;
    let d2_view = status::parse(&cluster.second_dispatcher_status()?)?;
    for p in &d2_view.processors {
        ensure!(p.routed > 0, "d2 routed nothing to {}: {d2_view:?}", p.id);
    }

    // Without d2 the processors carry on through d1.
    cluster.kill_second_dispatcher()?;
    let d1_view = status::parse(&cluster.status()?)?;
    ensure!(linked_active(&d1_view)? == ["p1", "p2"], "after d2 died: {d1_view:?}");
    let after =
        calls_both_ways_on_every_processor(&mut carol, &alias2, &mut bob, &main, &["p1", "p2"])
            .context("carol and bob on d1, after d2 was killed")?;
    eprintln!("{calls} calls between d2 and d1 phones; {after} between d1 phones once d2 died");
    cluster.check_all_running()
}
