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
