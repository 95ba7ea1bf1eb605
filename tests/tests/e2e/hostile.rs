//! Hostile callers (docs/security.md): each test performs an attack on a real cluster — a
//! caller with a valid account, or a stranger who has seen a Call-ID or a captured request —
//! and shows that it fails while the victims' own calls go on.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sipalias_tests::auth::Challenge;
use sipalias_tests::cluster::{Cluster, ClusterOptions, DOMAIN};
use sipalias_tests::phone::{Call, Phone, Server, sdp};
use sipmsg::SipMessage;
use sipmsg::digest::{self, Algorithm, ResponseInput};

use super::{WAIT, cluster, registered};

/// How long a phone listens to be sure something did not happen.
const QUIET: Duration = Duration::from_millis(1500);

/// A random token for tags, branches and Call-IDs of hand-made requests.
fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A request built by hand, as an attacker would: `from` and `to` are full header values.
fn request(
    phone: &Phone,
    method: &str,
    uri: &str,
    from: &str,
    to: &str,
    call_id: &str,
    cseq: u32,
) -> SipMessage {
    let mut m = SipMessage::request(method, uri.to_owned());
    m.push_header("Via", phone.via());
    m.push_header("Max-Forwards", "70");
    m.push_header("From", from.to_owned());
    m.push_header("To", to.to_owned());
    m.push_header("Call-ID", call_id.to_owned());
    m.push_header("CSeq", format!("{cseq} {method}"));
    m.push_header("Contact", format!("<{}>", phone.contact_uri()));
    m
}

/// Sends `req` to `server` and returns the status of its final response.
fn final_status(phone: &mut Phone, req: &SipMessage, server: &Server) -> Result<u16> {
    phone.send(req, server.addr)?;
    let resp = phone.final_response_to(req, WAIT)?;
    Ok(resp.msg.status().unwrap_or_default())
}

/// Fails if `phone` is sent an INVITE within [`QUIET`].
fn never_rings(phone: &mut Phone) -> Result<()> {
    phone.expect_none(QUIET, |m| m.method() == Some("INVITE"))
}

/// A cluster with alice registered through alias 127.0.0.2 and bob, a caller on the main IP.
fn alice_and_bob() -> Result<(Cluster, Server, Phone, Phone)> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alice = registered(&cluster.alias2(), "alice", "pw-a")?;
    let bob = Phone::new("bob", "pw-b")?;
    let main = cluster.main();
    Ok((cluster, main, alice, bob))
}

/// `caller` calls `callee` through `server`; the call is answered and ACKed.
pub(crate) fn answered(
    caller: &mut Phone,
    server: &Server,
    callee: &mut Phone,
) -> Result<(Call, Call)> {
    let offer = sdp(caller.user(), caller.addr().ip(), 40_000);
    let mut call = caller.invite(server, callee.user(), &offer)?;
    let invite = callee.recv_request("INVITE", WAIT)?;
    let inbound =
        callee.answer(&invite, 200, "OK", &sdp(callee.user(), callee.addr().ip(), 50_000))?;
    let ok = caller.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    caller.ack(&call)?;
    callee.recv_request("ACK", WAIT)?;
    Ok((call, inbound))
}

/// The caller hangs up and the callee, who must get the BYE, confirms it.
fn hang_up(caller: &mut Phone, call: &mut Call, callee: &mut Phone) -> Result<()> {
    let bye = caller.send_bye(call)?;
    let relayed = callee.recv_request("BYE", WAIT)?;
    callee.respond(&relayed, 200, "OK", None)?;
    let resp = caller.final_response_to(&bye, WAIT)?;
    ensure!(resp.msg.status() == Some(200), "BYE got {}", resp.summary());
    Ok(())
}

/// The digest challenges (`WWW-Authenticate`) of a REGISTER's 401.
fn register_challenges(phone: &mut Phone, server: &Server, call_id: &str) -> Result<Vec<String>> {
    let uri = format!("sip:{}", server.domain);
    let aor = format!("<sip:{}@{}>", phone.user(), server.domain);
    let req = request(phone, "REGISTER", &uri, &format!("{aor};tag={}", token()), &aor, call_id, 1);
    phone.send(&req, server.addr)?;
    let resp = phone.final_response_to(&req, WAIT)?;
    ensure!(resp.msg.status() == Some(401), "REGISTER got {}", resp.summary());
    Ok(resp.msg.headers_named("www-authenticate").map(str::to_owned).collect())
}

/// REGISTER with credentials computed with `alg` for the challenge `ch` (whatever algorithm
/// it named): the final status.
fn register_with(
    phone: &mut Phone,
    server: &Server,
    call_id: &str,
    password: &str,
    ch: &Challenge,
    alg: Algorithm,
) -> Result<u16> {
    let contacts = [format!("<{}>", phone.contact_uri())];
    let req = authenticated_register(phone, server, call_id, 2, password, ch, alg, &contacts);
    final_status(phone, &req, server)
}

/// A REGISTER (CSeq `cseq`) of `contacts` with credentials computed with `alg` for `ch`.
#[allow(clippy::too_many_arguments)]
fn authenticated_register(
    phone: &Phone,
    server: &Server,
    call_id: &str,
    cseq: u32,
    password: &str,
    ch: &Challenge,
    alg: Algorithm,
    contacts: &[String],
) -> SipMessage {
    let uri = format!("sip:{}", server.domain);
    let user = phone.user().to_owned();
    let aor = format!("<sip:{user}@{}>", server.domain);
    let ha1 = digest::ha1(alg, &user, &ch.realm, password);
    let cnonce = token();
    let input = ResponseInput {
        method: "REGISTER",
        uri: &uri,
        nonce: &ch.nonce,
        qop: Some("auth"),
        nc: "00000001",
        cnonce: &cnonce,
    };
    let response = digest::response(alg, &ha1, &input);
    let mut req =
        request(phone, "REGISTER", &uri, &format!("{aor};tag={}", token()), &aor, call_id, cseq);
    req.remove_header("contact");
    for c in contacts {
        req.push_header("Contact", c.clone());
    }
    req.push_header(
        "Authorization",
        format!(
            "Digest username=\"{user}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", \
             response=\"{response}\", algorithm={}, qop=auth, nc=00000001, cnonce=\"{cnonce}\"",
            ch.realm,
            ch.nonce,
            alg.as_str()
        ),
    );
    req.push_header("Expires", "300");
    req
}

#[test]
fn challenges_offer_md5_alone_by_default_and_sha256_only_where_an_ip_asks_for_it() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        alias3_toml: "digest_algorithms = [\"SHA-256\"]".into(),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("alice", "pw-a")?;
    let mut alice = Phone::new("alice", "pw-a")?;

    // Main IP and 127.0.0.2: the default, one MD5 challenge (what baresip and others need).
    for server in [cluster.main(), cluster.alias2()] {
        let offered = register_challenges(&mut alice, &server, &token())?;
        ensure!(offered.len() == 1, "{server}: {} challenges: {offered:?}", offered.len());
        ensure!(offered[0].contains("algorithm=MD5"), "{server} offered {offered:?}");
    }

    // 127.0.0.3 asks for SHA-256 alone; an MD5 answer (a downgrade) is challenged again.
    let alias3 = cluster.alias3();
    let call_id = token();
    let offered = register_challenges(&mut alice, &alias3, &call_id)?;
    ensure!(offered.len() == 1 && offered[0].contains("algorithm=SHA-256"), "{offered:?}");
    let ch = Challenge::parse(&offered[0])?;
    let md5 = register_with(&mut alice, &alias3, &call_id, "pw-a", &ch, Algorithm::Md5)?;
    ensure!(md5 == 401, "MD5 credentials on a SHA-256-only IP got {md5}");

    let call_id = token();
    let ch = Challenge::parse(&register_challenges(&mut alice, &alias3, &call_id)?[0])?;
    let sha = register_with(&mut alice, &alias3, &call_id, "pw-a", &ch, Algorithm::Sha256)?;
    ensure!(sha == 200, "SHA-256 credentials got {sha}");
    Ok(())
}

#[test]
fn captured_invite_credentials_ring_neither_another_callee_nor_anyone_from_another_ip() -> Result<()>
{
    let cluster = cluster()?;
    for (user, pw) in [("alice", "pw-a"), ("bob", "pw-b"), ("carol", "pw-c")] {
        cluster.add_account(user, pw)?;
    }
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;
    let mut carol = registered(&alias, "carol", "pw-c")?;
    let mut bob = Phone::new("bob", "pw-b")?;
    let (mut call, _) = answered(&mut bob, &main, &mut alice)?;
    let captured = call.last_invite().context("bob's INVITE")?.clone();
    let creds = captured.header("proxy-authorization").context("bob authenticated")?.to_owned();

    // An eavesdropper on another IP replays bob's credentials: first to carol (the digest
    // names alice's URI), then to alice herself (the nonce-count was used).
    let mut mallory = Phone::new("mallory", "none")?;
    for (callee, expected) in [("carol", 400), ("alice", 407)] {
        let uri = format!("sip:{callee}@{DOMAIN}");
        let from = format!("<sip:bob@{DOMAIN}>;tag={}", token());
        let mut replay = request(&mallory, "INVITE", &uri, &from, &format!("<{uri}>"), &token(), 2);
        replay.push_header("Proxy-Authorization", creds.clone());
        replay.push_header("Content-Type", "application/sdp");
        replay.body = sdp("bob", mallory.addr().ip(), 40_000).into_bytes().into();
        let status = final_status(&mut mallory, &replay, &main)?;
        ensure!(status == expected, "replay to {callee} got {status}, expected {expected}");
    }
    never_rings(&mut carol)?;
    never_rings(&mut alice)?;
    // The same bytes again, from bob's own address: still used up.
    let mut again = captured.clone();
    again.set_header("Via", bob.via());
    again.set_header("Call-ID", token());
    let status = final_status(&mut bob, &again, &main)?;
    ensure!(status == 407, "bob's own INVITE replayed got {status}");
    never_rings(&mut alice)?;
    hang_up(&mut bob, &mut call, &mut alice)
}

#[test]
fn credentials_without_qop_are_challenged_again() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    let mut alice = Phone::new("alice", "pw-a")?;
    let server = cluster.alias2();
    let call_id = token();
    let ch = Challenge::parse(&register_challenges(&mut alice, &server, &call_id)?[0])?;
    // RFC 2069 form: no qop, nc or cnonce, though qop="auth" was offered.
    let uri = format!("sip:{}", server.domain);
    let ha1 = digest::ha1(Algorithm::Md5, "alice", &ch.realm, "pw-a");
    let input = ResponseInput {
        method: "REGISTER",
        uri: &uri,
        nonce: &ch.nonce,
        qop: None,
        nc: "",
        cnonce: "",
    };
    let response = digest::response(Algorithm::Md5, &ha1, &input);
    let aor = format!("<sip:alice@{}>", server.domain);
    let mut req =
        request(&alice, "REGISTER", &uri, &format!("{aor};tag={}", token()), &aor, &call_id, 2);
    req.push_header(
        "Authorization",
        format!(
            "Digest username=\"alice\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", \
             response=\"{response}\", algorithm=MD5",
            ch.realm, ch.nonce
        ),
    );
    let status = final_status(&mut alice, &req, &server)?;
    ensure!(status == 401, "a response without qop got {status}");
    ensure!(cluster.redis_bindings("alice")?.is_empty(), "alice was registered");
    Ok(())
}

/// Bob's answered call to alice; then a second INVITE with that call's Call-ID and From tag
/// (new branch, new CSeq) to carol, as a caller wanting a free second call would send it.
fn second_invite_on_a_live_call(cluster: &Cluster, caller: &str) -> Result<()> {
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;
    let mut carol = registered(&alias, "carol", "pw-c")?;
    let mut bob = Phone::new(caller, "pw-b")?;
    let (mut call, _) = answered(&mut bob, &main, &mut alice)?;
    let first = call.last_invite().context("bob's INVITE")?.clone();
    let mut second = first.clone();
    let uri = format!("sip:carol@{DOMAIN}");
    second.start = sipmsg::StartLine::Request { method: "INVITE".into(), uri: uri.clone() };
    second.set_header("To", format!("<{uri}>"));
    second.set_header("Via", bob.via());
    let seq = first.cseq()?.seq + 1;
    second.set_header("CSeq", format!("{seq} INVITE"));
    second.remove_header("proxy-authorization");
    let status = final_status(&mut bob, &second, &main)?;
    ensure!(status == 482, "the second INVITE got {status}");
    never_rings(&mut carol)?;
    hang_up(&mut bob, &mut call, &mut alice)?;
    let cdr =
        cluster.wait_for_cdr(WAIT, |c| c.caller.starts_with(caller) && c.duration_ms.is_some())?;
    ensure!(cdr.callee.starts_with("alice@"), "CDR {cdr:?}");
    let mine: Vec<_> =
        cluster.cdrs()?.into_iter().filter(|c| c.caller.starts_with(caller)).collect();
    ensure!(mine.len() == 1, "{} CDRs for one call: {mine:?}", mine.len());
    Ok(())
}

#[test]
fn invite_reusing_a_live_calls_call_id_never_rides_its_authorization() -> Result<()> {
    for (caller, limit) in [("limited", Some("1")), ("unlimited", None)] {
        let cluster = cluster()?;
        match limit {
            Some(n) => cluster.add_account_with(caller, "pw-b", &["--max-calls", n])?,
            None => cluster.add_account(caller, "pw-b")?,
        }
        cluster.add_account("alice", "pw-a")?;
        cluster.add_account("carol", "pw-c")?;
        second_invite_on_a_live_call(&cluster, caller)
            .with_context(|| format!("caller {caller} (max calls {limit:?})"))?;
    }
    Ok(())
}

#[test]
fn a_stranger_who_knows_the_call_id_cannot_end_redirect_or_ack_the_call() -> Result<()> {
    let (_cluster, main, mut alice, mut bob) = alice_and_bob()?;
    let (mut call, _) = answered(&mut bob, &main, &mut alice)?;
    let target = call.remote_target.clone().context("our Contact")?;
    let bob_from = format!("{};tag={}", call.local_uri, call.local_tag);
    let our_to = format!("{};tag={}", call.remote_uri, call.remote_tag.clone().unwrap_or_default());

    let mut mallory = Phone::new("mallory", "none")?;
    let guessed_to = format!("{};tag={}", call.remote_uri, token());
    let guessed_from = format!("{};tag={}", call.local_uri, token());
    // Knows the Call-ID and our Contact; guesses one tag or the other.
    for (k, (method, from, to)) in [
        ("BYE", &bob_from, &guessed_to),
        ("BYE", &guessed_from, &our_to),
        ("INVITE", &bob_from, &guessed_to),
        ("INVITE", &guessed_from, &our_to),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = request(&mallory, method, &target, from, to, &call.call_id, 50 + k as u32);
        if method == "INVITE" {
            req.push_header("Content-Type", "application/sdp");
            req.body = sdp("mallory", mallory.addr().ip(), 6666).into_bytes().into();
        }
        let status = final_status(&mut mallory, &req, &main)?;
        ensure!(status == 481, "stranger's {method} ({from} / {to}) got {status}");
    }
    let ack = request(&mallory, "ACK", &target, &guessed_from, &our_to, &call.call_id, 2);
    mallory.send(&ack, main.addr)?;
    alice.expect_none(QUIET, |m| m.is_request())?;
    // The call is untouched: bob can still hang up, and alice hears it.
    hang_up(&mut bob, &mut call, &mut alice)
}

#[test]
fn callee_that_rings_forever_is_cancelled_at_the_no_answer_limit_and_the_slot_comes_back()
-> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        processor_toml: "no_answer_timeout_secs = 2".into(),
        // 64*T1 = 3.2 s: how long a callee that ignores CANCEL is waited for.
        t1_ms: Some(50),
        ..ClusterOptions::default()
    })?;
    cluster.add_account_with("bob", "pw-b", &["--max-calls", "1"])?;
    cluster.add_account("alice", "pw-a")?;
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;
    let mut bob = Phone::new("bob", "pw-b")?;
    // First alice answers the CANCEL; the second time she ignores it. Each call waits for
    // bob's one call slot: it comes back when the previous call's stop reached billing (at
    // once after the 487, 64*T1 after an ignored CANCEL).
    for answers_cancel in [true, false] {
        let (mut call, invite) = ring_when_free(&mut bob, &main, &mut alice)?;
        let started = Instant::now();
        alice.respond(&invite, 180, "Ringing", None)?;
        let resp = bob.final_response(&mut call, WAIT)?;
        let took = started.elapsed();
        ensure!(resp.msg.status() == Some(408), "bob got {}", resp.summary());
        ensure!(took >= Duration::from_millis(1500) && took < Duration::from_secs(6), "{took:?}");
        let cancel = alice.recv_request("CANCEL", WAIT)?;
        if answers_cancel {
            alice.respond(&cancel, 200, "OK", None)?;
            alice.respond(&invite, 487, "Request Terminated", None)?;
            alice.recv_request("ACK", WAIT)?;
        }
        let _ = alice.discard_pending();
    }
    let (_, last) = ring_when_free(&mut bob, &main, &mut alice)?;
    alice.respond(&last, 486, "Busy Here", None)?;
    Ok(())
}

/// Calls `callee` until it rings: a caller limited to one call gets `403` while its previous
/// call still holds the slot. Returns the caller's call and the callee's INVITE.
fn ring_when_free(
    caller: &mut Phone,
    server: &Server,
    callee: &mut Phone,
) -> Result<(Call, sipalias_tests::phone::Incoming)> {
    sipalias_tests::wait::until_every(
        "the caller's call slot to be free",
        WAIT,
        Duration::from_millis(250),
        || {
            let offer = sdp(caller.user(), caller.addr().ip(), 40_000);
            let mut call = caller.invite(server, callee.user(), &offer)?;
            match caller.next_response(&mut call, Duration::from_millis(300)) {
                Ok(r) if r.msg.status() == Some(403) => Ok(None),
                _ => Ok(Some((call, callee.recv_request("INVITE", WAIT)?))),
            }
        },
    )
}

const AUTO_ANSWER: &[(&str, &str)] = &[
    ("Call-Info", "<sip:127.0.0.1>;answer-after=0"),
    ("Alert-Info", "<http://127.0.0.1/ring.wav>"),
    ("Alert-Info", "<http://127.0.0.1/x>;info=alert-autoanswer;delay=0"),
    ("Answer-Mode", "Auto"),
];

#[test]
fn auto_answer_headers_reach_the_callee_only_from_a_trusted_intercom() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        processor_toml: format!("trusted_auto_answer = [\"intercom@{DOMAIN}\"]"),
        ..ClusterOptions::default()
    })?;
    for (user, pw) in [("alice", "pw-a"), ("bob", "pw-b"), ("intercom", "pw-i")] {
        cluster.add_account(user, pw)?;
    }
    let (main, alias) = (cluster.main(), cluster.alias2());
    let mut alice = registered(&alias, "alice", "pw-a")?;
    for (caller, pw, trusted) in [("bob", "pw-b", false), ("intercom", "pw-i", true)] {
        let mut phone = Phone::new(caller, pw)?;
        phone.set_invite_headers(AUTO_ANSWER);
        let mut call = phone.invite(&main, "alice", &sdp(caller, phone.addr().ip(), 40_000))?;
        let invite = alice.recv_request("INVITE", WAIT)?;
        let m = &invite.msg;
        let call_info: Vec<_> = m.headers_named("call-info").collect();
        let alert: Vec<_> = m.headers_named("alert-info").collect();
        if trusted {
            ensure!(call_info.iter().any(|c| c.contains("answer-after")), "{call_info:?}");
            ensure!(alert.len() == 2 && m.header("answer-mode") == Some("Auto"), "{m:?}");
        } else {
            ensure!(call_info.is_empty(), "Call-Info reached alice: {call_info:?}");
            ensure!(alert == vec!["<http://127.0.0.1/ring.wav>"], "Alert-Info {alert:?}");
            ensure!(m.header("answer-mode").is_none(), "Answer-Mode reached alice");
        }
        alice.respond(&invite, 486, "Busy Here", None)?;
        let resp = phone.final_response(&mut call, WAIT)?;
        ensure!(resp.msg.status() == Some(486), "{caller} got {}", resp.summary());
        let _ = alice.discard_pending();
    }
    Ok(())
}

#[test]
fn cr_inside_a_header_is_refused_with_400_and_the_callee_never_rings() -> Result<()> {
    let (_cluster, main, mut alice, mut bob) = alice_and_bob()?;
    let uri = format!("sip:alice@{DOMAIN}");
    for (header, value, reason) in [
        ("From", format!("\"Bob\rX-Evil: 1\" <sip:bob@{DOMAIN}>;tag={}", token()), "From"),
        ("Call-Info", "<http://x/a.png>;purpose=icon\rAnswer-Mode: Auto".to_owned(), "Call-Info"),
    ] {
        let from = format!("<sip:bob@{DOMAIN}>;tag={}", token());
        let mut req = request(&bob, "INVITE", &uri, &from, &format!("<{uri}>"), &token(), 1);
        req.set_header(header, value);
        bob.send(&req, main.addr)?;
        let resp = bob.final_response_to(&req, WAIT)?;
        ensure!(resp.msg.status() == Some(400), "CR in {header}: {}", resp.summary());
        let phrase = resp.msg.reason().unwrap_or_default();
        ensure!(phrase == format!("Line Break Inside {reason}"), "reason {phrase:?}");
    }
    never_rings(&mut alice)
}

#[test]
fn tags_and_branches_the_cluster_sends_are_unpredictable() -> Result<()> {
    let (_cluster, main, mut alice, mut bob) = alice_and_bob()?;
    // To tags of 50 answers to OPTIONS pings.
    let mut tags = Vec::new();
    for k in 0..50 {
        let from = format!("<sip:bob@{DOMAIN}>;tag={}", token());
        let to = format!("<sip:{DOMAIN}>");
        let ping = request(&bob, "OPTIONS", &format!("sip:{DOMAIN}"), &from, &to, &token(), k + 1);
        bob.send(&ping, main.addr)?;
        let resp = bob.final_response_to(&ping, WAIT)?;
        tags.push(resp.msg.to()?.tag().context("To tag")?.to_owned());
    }
    // Via branches of 10 INVITEs the cluster sends alice.
    let mut branches = Vec::new();
    for _ in 0..10 {
        let mut call = bob.invite(&main, "alice", &sdp("bob", bob.addr().ip(), 40_000))?;
        let invite = alice.recv_request("INVITE", WAIT)?;
        branches.push(invite.msg.top_via()?.param("branch").context("branch")?.to_owned());
        alice.respond(&invite, 486, "Busy Here", None)?;
        bob.final_response(&mut call, WAIT)?;
        let _ = alice.discard_pending();
    }
    for (what, ids) in [("tags", &tags), ("branches", &branches)] {
        for pair in ids.windows(2) {
            let common = pair[0].bytes().zip(pair[1].bytes()).take_while(|(a, b)| a == b).count();
            let differing = pair[1].len() - common;
            if differing < 8 {
                bail!("{what}: {} then {} differ only in {differing} characters", pair[0], pair[1]);
            }
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        ensure!(unique.len() == ids.len(), "{what} repeat: {ids:?}");
    }
    Ok(())
}

/// An authenticated REGISTER (after its challenge) of `contacts` through `server`: the final
/// status and reason phrase.
fn register_contacts(
    phone: &mut Phone,
    server: &Server,
    password: &str,
    contacts: &[String],
) -> Result<(u16, String)> {
    let call_id = token();
    let ch = Challenge::parse(&register_challenges(phone, server, &call_id)?[0])?;
    let req =
        authenticated_register(phone, server, &call_id, 2, password, &ch, Algorithm::Md5, contacts);
    phone.send(&req, server.addr)?;
    let resp = phone.final_response_to(&req, WAIT)?;
    Ok((resp.msg.status().unwrap_or_default(), resp.msg.reason().unwrap_or_default().to_owned()))
}

#[test]
fn an_aor_never_holds_more_than_max_contacts_bindings() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    let server = cluster.alias2();
    let mut alice = Phone::new("alice", "pw-a")?;
    let contact = |n: u32| format!("<sip:alice@127.0.0.77:{}>", 10_000 + n);
    let register = |alice: &mut Phone, contacts: &[String]| {
        register_contacts(alice, &server, "pw-a", contacts)
    };
    // 300 contacts in one REGISTER: refused whole.
    let all: Vec<String> = (0..300).map(contact).collect();
    let (status, reason) = register(&mut alice, &all)?;
    ensure!(
        (status, reason.as_str()) == (403, "Too Many Contacts"),
        "300 contacts got {status} {reason}"
    );
    ensure!(cluster.redis_bindings("alice")?.is_empty(), "something of the 300 was stored");
    // One by one: the default max_contacts (10) pass, the rest are refused.
    let mut refused = 0;
    for n in 0..15 {
        let (status, _) = register(&mut alice, &[contact(n)])?;
        match status {
            200 => {}
            403 => refused += 1,
            other => bail!("contact {n} got {other}"),
        }
    }
    let stored = cluster.redis_bindings("alice")?.len();
    ensure!(stored == 10 && refused == 5, "{stored} bindings stored, {refused} refused");
    // Fetching the bindings (a REGISTER without Contact) lists them only with credentials.
    let aor = format!("<sip:alice@{}>", server.domain);
    let mut fetch =
        request(&alice, "REGISTER", &format!("sip:{}", server.domain), &aor, &aor, &token(), 1);
    fetch.remove_header("contact");
    fetch.set_header("From", format!("{aor};tag={}", token()));
    alice.send(&fetch, server.addr)?;
    let resp = alice.final_response_to(&fetch, WAIT)?;
    ensure!(resp.msg.status() == Some(401), "unauthenticated fetch got {}", resp.summary());
    ensure!(resp.msg.header("contact").is_none(), "bindings listed without credentials");
    let (status, _) = register(&mut alice, &[])?;
    ensure!(status == 200, "authenticated fetch got {status}");
    Ok(())
}

/// Everything `phone` receives within `window`: (messages, bytes as serialized).
fn received_within(phone: &mut Phone, window: Duration) -> (usize, usize) {
    let deadline = Instant::now() + window;
    let (mut count, mut bytes) = (0, 0);
    while let Ok(m) = phone.recv(deadline.saturating_duration_since(Instant::now())) {
        count += 1;
        bytes += m.msg.to_bytes().len();
    }
    (count, bytes)
}

#[test]
fn a_spoofed_invite_or_register_gets_one_answer_no_bigger_than_twice_itself() -> Result<()> {
    // T1 = 50 ms: Timer G would have re-sent a 407 six times within the window.
    let cluster = Cluster::start(ClusterOptions { t1_ms: Some(50), ..ClusterOptions::default() })?;
    cluster.add_account("alice", "pw-a")?;
    let main = cluster.main();
    // The victim: whatever address a spoofed request names as its source.
    let mut victim = Phone::new("victim", "none")?;
    let uri = format!("sip:alice@{DOMAIN}");
    let from = format!("<sip:x@{DOMAIN}>;tag={}", token());
    let invite = request(&victim, "INVITE", &uri, &from, &format!("<{uri}>"), &token(), 1);
    let aor = format!("<sip:alice@{DOMAIN}>");
    let register = request(&victim, "REGISTER", &format!("sip:{DOMAIN}"), &from, &aor, &token(), 1);
    for (what, req, status) in [("INVITE", &invite, 407), ("REGISTER", &register, 401)] {
        let sent = req.to_bytes().len();
        victim.send(req, main.addr)?;
        let first = victim.final_response_to(req, WAIT)?;
        ensure!(first.msg.status() == Some(status), "{what} got {}", first.summary());
        let (more, more_bytes) = received_within(&mut victim, Duration::from_millis(1500));
        let out = first.msg.to_bytes().len() + more_bytes;
        let ratio = out as f64 / sent as f64;
        eprintln!(
            "reflection {what}: {sent} bytes in, {} messages / {out} bytes out, {ratio:.2}x",
            1 + more
        );
        ensure!(more == 0, "{what}: {more} more messages were sent to the source");
        ensure!(ratio <= 2.0, "{what}: {out} bytes out for {sent} in ({ratio:.2}x)");
    }
    Ok(())
}

#[test]
fn a_contact_aimed_at_the_clusters_own_services_or_unusable_networks_is_refused() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    let server = cluster.alias2();
    let mut alice = Phone::new("alice", "pw-a")?;
    let billing = cluster.billing_addr();
    let main = cluster.main().addr;
    let register = |alice: &mut Phone, contact: &str| {
        register_contacts(alice, &server, "pw-a", &[contact.to_owned()])
    };
    for contact in [
        format!("<sip:alice@{billing}>"),
        format!("<sip:alice@{main}>"),
        "<sip:alice@224.0.0.1:5060>".to_owned(),
        "<sip:alice@169.254.10.10>".to_owned(),
        "<sip:alice@0.0.0.0:5060>".to_owned(),
    ] {
        let (status, reason) = register(&mut alice, &contact)?;
        ensure!(
            (status, reason.as_str()) == (403, "Contact Not Allowed"),
            "Contact {contact} got {status} {reason}"
        );
    }
    ensure!(cluster.redis_bindings("alice")?.is_empty(), "a refused contact was stored");
    // The phone's own address is fine.
    let own = format!("<{}>", alice.contact_uri());
    let (status, _) = register(&mut alice, &own)?;
    ensure!(status == 200, "the phone's own Contact got {status}");
    Ok(())
}

#[test]
fn password_guessing_bans_the_source_but_never_locks_the_account() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    let server = cluster.alias2();
    // One guesser, one address: the default budget is 10 failures a minute.
    let mut guesser = Phone::new("alice", "guess")?;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(guesser.register(&server, 300)?.status());
    }
    ensure!(statuses[..9].iter().all(|s| *s == 401), "{statuses:?}");
    ensure!(statuses[9] == 403, "the 10th failure bans, answered 403: {statuses:?}");
    // From then on the dispatcher drops the source's traffic before any processor: 50 more
    // guesses get no answer at all, and neither does the right password from that address.
    let ip = guesser.addr().ip();
    for _ in 0..50 {
        unanswered_register(&mut guesser, &server, Duration::ZERO)?;
    }
    ensure!(received_within(&mut guesser, QUIET).0 == 0, "a banned source got an answer");
    let mut same_ip = Phone::bind("alice", "pw-a", std::net::SocketAddr::new(ip, 0))?;
    ensure!(unanswered_register(&mut same_ip, &server, QUIET)?, "the banned address was answered");
    // The account is not locked: alice's own phone elsewhere registers.
    let ex = Phone::new("alice", "pw-a")?.register(&server, 300)?;
    ensure!(ex.status() == 200, "alice from another address got {}", ex.status());
    ensure!(cluster.redis_keys("e2e:ban:*")?.len() == 1, "{:?}", cluster.redis_keys("e2e:ban:*")?);

    // The operator sees the ban, with what it dropped, and lifts it.
    let bans = cluster.bans()?;
    let row = bans
        .lines()
        .find(|l| l.starts_with(&format!("{ip} ")))
        .with_context(|| format!("{ip} not listed:\n{bans}"))?;
    ensure!(row.contains("auth-failures"), "{row}");
    let dropped: u64 = row.split_whitespace().last().and_then(|d| d.parse().ok()).unwrap_or(0);
    ensure!(dropped >= 51, "dropped {dropped} of 51: {row}");
    ensure!(bans.contains("1 bans from processors"), "{bans}");
    let lifted = cluster.lift_ban(&ip.to_string())?;
    ensure!(lifted.contains(&format!("ban on {ip} lifted")), "{lifted}");
    let ex = same_ip.register(&server, 300)?;
    ensure!(ex.status() == 200, "after the lift the right password got {}", ex.status());
    ensure!(cluster.redis_keys("e2e:ban:*")?.is_empty(), "the ban stays in Redis");
    ensure!(!cluster.bans()?.contains(&format!("{ip} ")), "still listed");
    Ok(())
}

/// Sends a REGISTER (without credentials) from `phone` and reports whether nothing at all came
/// back within `window` (zero: send only, for a burst that is checked afterwards).
fn unanswered_register(phone: &mut Phone, server: &Server, window: Duration) -> Result<bool> {
    let aor = format!("<sip:{}@{}>", phone.user(), server.domain);
    let from = format!("{aor};tag={}", token());
    let uri = format!("sip:{}", server.domain);
    let reg = request(phone, "REGISTER", &uri, &from, &aor, &token(), 1);
    phone.send(&reg, server.addr)?;
    Ok(received_within(phone, window).0 == 0)
}

#[test]
fn known_scanners_get_no_answer_at_all() -> Result<()> {
    let cluster = cluster()?;
    let main = cluster.main();
    let mut phone = Phone::new("scanner", "none")?;
    for (ua, answered) in
        [("friendly-scanner", false), ("SIPVicious 0.3.4", false), ("Yealink SIP-T46S", true)]
    {
        let from = format!("<sip:100@{DOMAIN}>;tag={}", token());
        let mut ping = request(
            &phone,
            "OPTIONS",
            &format!("sip:100@{DOMAIN}"),
            &from,
            "<sip:100@x>",
            &token(),
            1,
        );
        ping.push_header("User-Agent", ua);
        phone.send(&ping, main.addr)?;
        let (got, _) = received_within(&mut phone, QUIET);
        ensure!((got > 0) == answered, "User-Agent {ua:?}: {got} answers");
    }
    // Dropped at the dispatcher, before any processor.
    let bans = cluster.bans()?;
    ensure!(bans.contains("2 from scanners"), "{bans}");
    Ok(())
}

/// A flood from one source (1,000 requests at once, twice the default `source_rate_limit` of
/// 500 a second) gets the source banned at the dispatcher: its traffic is dropped from then on,
/// while a phone elsewhere registers and a call already up ends normally.
#[test]
fn a_flooding_source_is_banned_at_the_dispatcher_and_others_keep_working() -> Result<()> {
    let (cluster, main, mut alice, mut bob) = alice_and_bob()?;
    let (mut call, _) = answered(&mut bob, &main, &mut alice)?;
    let mut flooder = Phone::new("flood", "none")?;
    let uri = format!("sip:100@{DOMAIN}");
    for _ in 0..1000 {
        let from = format!("<sip:x@{DOMAIN}>;tag={}", token());
        let ping = request(&flooder, "OPTIONS", &uri, &from, "<sip:100@x>", &token(), 1);
        flooder.send(&ping, main.addr)?;
    }
    let (answered_count, _) = received_within(&mut flooder, QUIET);
    ensure!(answered_count <= 500, "{answered_count} of 1000 flood requests were answered");
    ensure!(unanswered_register(&mut flooder, &main, QUIET)?, "the banned flooder was answered");
    let ip = flooder.addr().ip();
    let bans = cluster.bans()?;
    let row = bans.lines().find(|l| l.starts_with(&format!("{ip} "))).context(bans.clone())?;
    ensure!(row.contains(" rate "), "{row}");
    ensure!(bans.contains("1 rate bans"), "{bans}");
    // Everyone else is served: a new registration, and the call up ends normally.
    let ex = Phone::new("alice", "pw-a")?.register(&cluster.alias2(), 300)?;
    ensure!(ex.status() == 200, "another phone got {}", ex.status());
    let bye = bob.bye(&mut call, WAIT)?;
    ensure!(bye.msg.status() == Some(200), "BYE got {}", bye.summary());
    Ok(())
}

/// Past `admission_rate`, new INVITEs and REGISTERs get the dispatcher's `503` with
/// `Retry-After`, while a call already up keeps working (its BYE is not new work).
#[test]
fn past_the_admission_rate_new_requests_get_503_and_calls_up_go_on() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        dispatcher_toml: "admission_rate = 10".into(),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let main = cluster.main();
    let mut alice = registered(&cluster.alias2(), "alice", "pw-a")?;
    let mut bob = Phone::new("bob", "pw-b")?;
    let (mut call, _) = answered(&mut bob, &main, &mut alice)?;
    let mut burst = Phone::new("burst", "none")?;
    let aor = format!("<sip:burst@{DOMAIN}>");
    let mut sent = Vec::new();
    for _ in 0..60 {
        let from = format!("{aor};tag={}", token());
        let reg = request(&burst, "REGISTER", &format!("sip:{DOMAIN}"), &from, &aor, &token(), 1);
        burst.send(&reg, main.addr)?;
        sent.push(reg);
    }
    let (mut challenged, mut refused) = (0, 0);
    for reg in &sent {
        let resp = burst.final_response_to(reg, WAIT)?;
        match resp.msg.status() {
            Some(401) => challenged += 1,
            Some(503) => {
                ensure!(resp.msg.header("retry-after") == Some("5"), "{}", resp.summary());
                refused += 1;
            }
            _ => bail!("unexpected {}", resp.summary()),
        }
    }
    ensure!(refused >= 30 && challenged >= 1, "401 ×{challenged}, 503 ×{refused}");
    let bye = bob.bye(&mut call, WAIT)?;
    ensure!(bye.msg.status() == Some(200), "BYE got {}", bye.summary());
    ensure!(cluster.bans()?.contains(&format!("{refused} new requests answered 503")));
    Ok(())
}
