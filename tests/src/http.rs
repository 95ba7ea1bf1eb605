//! A minimal HTTP/1.1 client for the services' operations listeners (`/metrics`, `/healthz`,
//! `/readyz`), and a reader of the Prometheus text they serve.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// `GET path` on `addr`: the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).with_context(|| format!("read from {addr}{path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    // Bodies of these endpoints are small; axum sends them with Content-Length (not chunked).
    Ok((status, body.to_owned()))
}

/// Polls `GET path` until it answers `status`, for at most `timeout`; the last body.
pub fn wait_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = get(addr, path);
        if let Ok((s, body)) = &last
            && *s == status
        {
            return Ok(body.clone());
        }
        if Instant::now() >= deadline {
            bail!("{addr}{path} did not answer {status} within {timeout:?}: last {last:?}");
        }
        // Polling an HTTP endpoint: there is no event to wait on.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the samples of `name` whose labels include every one of `labels` (`k`, `v`),
/// in Prometheus text exposition (`name{k="v",…} value`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            if !all {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_the_matching_series_only() {
        let text = "# HELP x\n# TYPE x counter\n\
x{ip=\"127.0.0.2\",method=\"INVITE\",status=\"200\"} 2\n\
x{ip=\"127.0.0.2\",method=\"INVITE\",status=\"486\"} 1\n\
x{ip=\"127.0.0.1\",method=\"INVITE\",status=\"200\"} 5\n\
xy{ip=\"127.0.0.2\"} 7\ngauge 3\n";
        assert_eq!(metric_sum(text, "x", &[("ip", "127.0.0.2")]), 3.0);
        assert_eq!(metric_sum(text, "x", &[("ip", "127.0.0.2"), ("status", "200")]), 2.0);
        assert_eq!(metric_sum(text, "x", &[("method", "INVITE")]), 8.0);
        assert_eq!(metric_sum(text, "x", &[("ip", "127.0.0.9")]), 0.0);
        assert_eq!(metric_sum(text, "gauge", &[]), 3.0);
    }
}
