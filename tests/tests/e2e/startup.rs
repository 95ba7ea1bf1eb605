//! The start-up skeleton the three binaries share (`startup/`): their command lines, and what
//! they do with a bad configuration — refuse to start, exit 2, and name the key in one format.

use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, ensure};
use sipalias_tests::binary;

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(binary::path(bin)?);
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("SIPALIAS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().with_context(|| format!("running {bin} {args:?}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn every_binary_tells_its_version_and_refuses_unknown_arguments() -> Result<()> {
    for bin in [binary::DISPATCHER, binary::PROCESSOR, binary::BILLING] {
        let version = run(bin, &["--version"], &[])?;
        ensure!(version.status.success(), "{bin} --version: {}", text(&version));
        ensure!(text(&version).starts_with(&format!("{bin} ")), "{bin}: {}", text(&version));
        for hostile in ["--bogus", "--\u{202e}gifnoc", "--config", "-c"] {
            let out = run(bin, &[hostile], &[])?;
            ensure!(
                out.status.code() == Some(2),
                "{bin} {hostile:?}: {:?} {}",
                out.status,
                text(&out)
            );
        }
    }
    Ok(())
}

#[test]
fn a_bad_configuration_stops_each_service_with_status_2_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.toml");
    // One wrong key per table, each of a different kind: a type, a range, an unknown key.
    std::fs::write(
        &file,
        "[dispatcher]\nretry_after_secs = 'soon'\n[processor]\nt1_ms = -5\n[billing]\nlisten = '127.0.0.1:7080'\nno_such_key = 1\n",
    )?;
    let config = file.to_str().context("utf-8 path")?;
    for (bin, args, key) in [
        (binary::DISPATCHER, vec!["--config", config], "dispatcher.retry_after_secs"),
        (binary::PROCESSOR, vec!["--config", config], "processor.t1_ms"),
        (binary::BILLING, vec!["--config", config, "serve"], "billing.no_such_key"),
    ] {
        let out = run(bin, &args, &[])?;
        ensure!(out.status.code() == Some(2), "{bin}: {:?} {}", out.status, text(&out));
        ensure!(text(&out).contains(key), "{bin} does not name {key}: {}", text(&out));
        ensure!(text(&out).contains("bad.toml"), "{bin} does not name the file: {}", text(&out));
    }
    // The same through the environment: a hostile processor id.
    let out = run(
        binary::PROCESSOR,
        &["--config", config],
        &[("SIPALIAS_PROCESSOR__T1_MS", "500"), ("SIPALIAS_PROCESSOR__ID", "p1;rm -rf /")],
    )?;
    ensure!(out.status.code() == Some(2), "processor: {:?} {}", out.status, text(&out));
    ensure!(text(&out).contains("processor.id"), "{}", text(&out));
    Ok(())
}

#[test]
fn check_config_says_ok_or_names_the_key_and_binds_nothing() -> Result<()> {
    // Every port of this configuration is held by the test: a real start could not bind, so
    // an exit 0 shows the check bound nothing. Redis is nowhere: it connects to nothing either.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let sip_port = udp.local_addr()?.port();
    let tcp = std::net::TcpListener::bind(("127.0.0.1", sip_port))
        .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?;
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let held_port = held.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let good = format!(
        "[dispatcher]\nid = \"d1\"\ngrpc_listen = \"127.0.0.1:{held_port}\"\nmetrics_listen = \"127.0.0.1:{held_port}\"\n\
[dispatcher.main]\nip = \"127.0.0.1\"\ndomain = \"sip.example.net\"\nudp_port = {sip_port}\ntcp_port = {}\n\
[processor]\nauth_secret = \"0123456789abcdef\"\nredis_url = \"redis://127.0.0.1:1/\"\nmetrics_listen = \"127.0.0.1:{held_port}\"\n\
[billing]\nlisten = \"127.0.0.1:{held_port}\"\nredis_url = \"redis://127.0.0.1:1/\"\n",
        tcp.local_addr()?.port()
    );
    let file = dir.path().join("good.toml");
    std::fs::write(&file, &good)?;
    let config = file.to_str().context("utf-8 path")?;
    for bin in [binary::DISPATCHER, binary::PROCESSOR, binary::BILLING] {
        let out = run(bin, &["--check-config", "--config", config], &[])?;
        ensure!(out.status.success(), "{bin}: {:?} {}", out.status, text(&out));
        ensure!(
            text(&out).contains("configuration OK") && text(&out).contains("good.toml"),
            "{bin}: {}",
            text(&out)
        );
    }
    // A certificate that cannot be read is a configuration error too (the dispatcher loads
    // certificates as part of the check); and each service names its bad key.
    let cases = [
        (
            binary::DISPATCHER,
            "tls_port = 5061\ntls_cert = \"/nonexistent.crt\"\ntls_key = \"/nonexistent.key\"\n",
            "[dispatcher.main]\n",
            "tls_cert",
        ),
        (
            binary::PROCESSOR,
            "max_setup_in_flight = 0\n",
            "[processor]\n",
            "processor.max_setup_in_flight",
        ),
        (
            binary::BILLING,
            "metrics_listen = \"localhost:9090\"\n",
            "[billing]\n",
            "billing.metrics_listen",
        ),
    ];
    for (bin, line, table, key) in cases {
        let bad = good.replacen(table, &format!("{table}{line}"), 1);
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, bad)?;
        let out = run(bin, &["--check-config", "--config", file.to_str().context("utf-8")?], &[])?;
        ensure!(out.status.code() == Some(2), "{bin}: {:?} {}", out.status, text(&out));
        ensure!(text(&out).contains(key), "{bin} does not name {key}: {}", text(&out));
    }
    // Billing's check takes no command, and a command is still required without it.
    for args in [vec!["--check-config", "--config", config, "serve"], vec!["--config", config]] {
        let out = run(binary::BILLING, &args, &[])?;
        ensure!(out.status.code() == Some(2), "billing {args:?}: {:?} {}", out.status, text(&out));
    }
    drop((udp, tcp, held));
    Ok(())
}
