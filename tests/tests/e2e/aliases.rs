//! Aliases at runtime: a SIGHUP makes the dispatcher re-read its sockets — a new alias is
//! bound and phones register and are called through it without a restart; a removed alias
//! drains (its TCP connections closed once `socket_drain_secs` has passed), its phones are
//! reported by the CLI and get no call; a configuration that cannot be applied changes
//! nothing.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions, DOMAIN};
use sipalias_tests::phone::{Phone, Transport, sdp};
use sipalias_tests::ports;

use super::{WAIT, complete_call, from_to_hosts, registered};

/// The alias added at runtime: an address no other test's cluster uses.
const NEW_ALIAS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 16);

/// Writes `text` as the cluster's configuration and sends the dispatcher SIGHUP; returns the
/// dispatcher's first line about it that contains `expect`.
fn reload(cluster: &Cluster, text: &str, expect: &str) -> Result<String> {
    std::fs::write(cluster.config_path(), text)?;
    let d = cluster.dispatcher();
    let mark = d.mark();
    d.send_hup()?;
    d.wait_for_line_since(mark, expect, WAIT)
}

/// Every processor's output mark, to wait for what they log next.
fn marks(cluster: &Cluster, n: usize) -> Result<Vec<usize>> {
    (1..=n).map(|p| Ok(cluster.processor(p).context("processor")?.mark())).collect()
}

/// Waits until every processor took a new socket table from the dispatcher.
fn learned(cluster: &Cluster, marks: &[usize]) -> Result<()> {
    for (i, mark) in marks.iter().enumerate() {
        let p = cluster.processor(i + 1).context("processor")?;
        p.wait_for_line_since(*mark, "socket table learned", WAIT)?;
    }
    Ok(())
}

/// The dispatcher's sockets as `sipalias-dispatcher sockets --json` lists them:
/// `(ip:port/transport, state)`.
fn sockets(cluster: &Cluster) -> Result<Vec<(String, String)>> {
    let json: serde_json::Value =
        serde_json::from_str(&cluster.dispatcher_cli(&["sockets", "--json"])?)?;
    let list = json[0]["sockets"].as_array().context("no sockets array")?;
    Ok(list
        .iter()
        .map(|s| {
            let name = format!(
                "{}:{}/{}",
                s["ip"].as_str().unwrap_or("?"),
                s["port"],
                s["transport"].as_str().unwrap_or("?")
            );
            (name, s["state"].as_str().unwrap_or("?").to_owned())
        })
        .collect())
}

#[test]
fn a_sighup_adds_an_alias_phones_use_at_once_and_removes_it_after_draining() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions {
        dispatcher_toml: "socket_drain_secs = 1\n".into(),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("bob", "pw-bob")?;
    cluster.add_account("carol", "pw-carol")?;
    cluster.add_account("dave", "pw-dave")?;
    let mut bob = registered(&cluster.main(), "bob", "pw-bob")?;
    let port = ports::free_sip_port_on_all(&[NEW_ALIAS])?;
    let original = std::fs::read_to_string(cluster.config_path())?;
    let with_alias =
        |table: &str| original.replacen("[processor]\n", &format!("{table}\n[processor]\n"), 1);

    // What cannot be applied changes nothing, and says which key is wrong.
    let line = reload(
        &cluster,
        &with_alias(
            "[[dispatcher.aliases]]\nip = \"192.0.2.1\"\ndomain = \"x.example\"\ntransports = [\"udp\"]\n",
        ),
        "SIGHUP: sockets unchanged",
    )?;
    ensure!(
        line.contains("dispatcher.aliases[2].udp_port: cannot bind 192.0.2.1:5060/udp"),
        "{line}"
    );
    let line = reload(
        &cluster,
        &with_alias("[[dispatcher.aliases]]\nip = \"127.0.0.x\"\ndomain = \"x.example\"\n"),
        "SIGHUP: sockets unchanged",
    )?;
    ensure!(line.contains("dispatcher.aliases[2].ip"), "{line}");
    let line = reload(
        &cluster,
        &with_alias("[[dispatcher.aliases]]\nip = \"127.0.0.2\"\ndomain = \"x.example\"\n"),
        "SIGHUP: sockets unchanged",
    )?;
    ensure!(line.contains("already configured"), "an IP twice: {line}");
    std::fs::write(cluster.config_path(), &original)?;
    let before = sockets(&cluster)?;
    ensure!(
        !before.iter().any(|(s, _)| s.starts_with("192.0.2.1") || s.starts_with("127.0.0.16")),
        "{before:?}"
    );

    // The new alias: UDP and TCP on a port of its own.
    let added = with_alias(&format!(
        "[[dispatcher.aliases]]\nip = \"{NEW_ALIAS}\"\ndomain = \"{DOMAIN}\"\n\
         transports = [\"udp\", \"tcp\"]\nudp_port = {port}\ntcp_port = {port}\n"
    ));
    let marks_added = marks(&cluster, 2)?;
    let line = reload(&cluster, &added, "SIGHUP: sockets reloaded")?;
    ensure!(
        line.contains(&format!("2 added ({NEW_ALIAS}:{port}/udp, {NEW_ALIAS}:{port}/tcp)")),
        "{line}"
    );
    learned(&cluster, &marks_added)?;
    let listed = sockets(&cluster)?;
    for t in ["udp", "tcp"] {
        let name = format!("{NEW_ALIAS}:{port}/{t}");
        ensure!(listed.contains(&(name.clone(), "configured".into())), "{name} not in {listed:?}");
    }

    // Phones use it at once: one over UDP called from the main IP, from the alias socket,
    // with the alias IP as From/To host; one over TCP keeps its connection.
    let udp = Cluster::server(NEW_ALIAS, port, Transport::Udp);
    let mut carol = registered(&udp, "carol", "pw-carol")?;
    let invite = complete_call(&mut bob, &cluster.main(), &mut carol, udp.addr)?;
    let alias = NEW_ALIAS.to_string();
    ensure!(from_to_hosts(&invite.msg)? == (alias.clone(), alias), "{}", invite.summary());
    let tcp = Cluster::server(NEW_ALIAS, port, Transport::Tcp);
    let mut dave = Phone::for_server("dave", "pw-dave", &tcp)?;
    ensure!(dave.register(&tcp, 300)?.status() == 200, "dave over TCP");
    let conn = dave.connection_to(tcp.addr).context("dave's connection")?;

    // Removed: it drains, then closes — its connection with it — and processors forget it.
    let marks_removed = marks(&cluster, 2)?;
    let d = cluster.dispatcher();
    let mark = d.mark();
    let line = reload(&cluster, &original, "SIGHUP: sockets reloaded")?;
    ensure!(line.contains("0 added, 2 draining"), "{line}");
    let closed = d.wait_for_line_since(mark, "drained sockets closed", WAIT)?;
    ensure!(closed.contains(&format!("{NEW_ALIAS}:{port}/udp")), "{closed}");
    ensure!(closed.contains(&format!("{NEW_ALIAS}:{port}/tcp (1 connections closed)")), "{closed}");
    dave.wait_closed(conn.id, WAIT)?;
    learned(&cluster, &marks_removed)?;
    ensure!(sockets(&cluster)? == before, "back to the original sockets");
    ensure!(
        !ports::udp_bound(SocketAddrV4::new(NEW_ALIAS, port))?,
        "the dispatcher still holds {NEW_ALIAS}:{port}/udp"
    );

    // Its phones are reported, and get no call.
    let json = cluster.processor_cli(&["registrations", "--removed", "--json"])?;
    let rows: serde_json::Value = serde_json::from_str(&json)?;
    let rows = rows.as_array().context("an array")?;
    let aors: Vec<&str> = rows.iter().filter_map(|r| r["aor"].as_str()).collect();
    ensure!(aors == ["carol@sip.example.net", "dave@sip.example.net"], "{json}");
    ensure!(rows.iter().all(|r| r["socket"] == "removed"), "{json}");
    let all = cluster.processor_cli(&["registrations"])?;
    ensure!(all.lines().any(|l| l.starts_with("bob@") && l.contains(" served ")), "{all}");
    let offer = sdp("bob", bob.addr().ip(), 40_000);
    let mut call = bob.invite(&cluster.main(), "carol", &offer)?;
    let answer = bob.final_response(&mut call, WAIT)?;
    ensure!(answer.msg.status() == Some(480), "a call to carol got {}", answer.summary());
    carol.expect_none(std::time::Duration::from_millis(300), |m| m.method() == Some("INVITE"))?;
    cluster.check_all_running()
}
