//! `sipmsg::framing::frame` (Content-Length framing of stream transports) on a byte stream that
//! arrives in chunks.
//!
//! Input layout: byte 0 picks the size limit (65535, 1024 or 200 bytes) and the number `k` of
//! split points (0–7); the next `2k` bytes are the split points (little-endian `u16`, taken
//! modulo the stream length); the rest is the stream.
//!
//! Checks, besides "never panics":
//! - framing the whole stream at once and framing it incrementally (appending one chunk at a
//!   time, framing after each as the dispatcher does) give the same messages, the same
//!   keepalive bytes (consecutive keepalives merged: a CRLF run split across chunks comes out
//!   in pieces), the same error and the same unconsumed rest;
//! - every `Message(n)` / `KeepAlive(n)` is non-empty and within the buffer, and a message is
//!   at most `limit` bytes;
//! - a framed message is never `Unterminated` or `Truncated` for `sipmsg::parse` (the
//!   processor must see the same message extent the dispatcher framed).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sipmsg::Error;
use sipmsg::framing::{Frame, frame};

#[derive(Debug, PartialEq, Eq)]
enum Event {
    KeepAlive(usize),
    Message(Vec<u8>),
    Error(Error),
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let limit = [65_535, 1024, 200][usize::from(ctl % 3)];
    let k = usize::from((ctl >> 2) & 7);
    if rest.len() < 2 * k {
        return;
    }
    let (cuts, stream) = rest.split_at(2 * k);
    let mut cuts: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();

    // All at once.
    let mut whole = Vec::new();
    let mut buf = stream.to_vec();
    let done = drain(&mut buf, limit, &mut whole);
    let whole_rest = if done { None } else { Some(buf) };

    // One chunk at a time.
    let mut pieces = Vec::new();
    let mut buf = Vec::new();
    let mut done = false;
    let mut from = 0;
    for to in cuts.into_iter().chain([stream.len()]) {
        buf.extend_from_slice(&stream[from..to]);
        from = to;
        if drain(&mut buf, limit, &mut pieces) {
            done = true;
            break;
        }
    }
    let pieces_rest = if done { None } else { Some(buf) };

    assert_eq!(pieces, whole, "incremental framing differs");
    assert_eq!(pieces_rest, whole_rest, "unconsumed rest differs");
});

/// Frames the front of `buf` until it is incomplete or an error, consuming what it frames and
/// recording it. Returns true after an error (the connection is closed then).
fn drain(buf: &mut Vec<u8>, limit: usize, events: &mut Vec<Event>) -> bool {
    loop {
        match frame(buf, limit) {
            Ok(Frame::Incomplete) => return false,
            Ok(Frame::KeepAlive(n)) => {
                assert!(n > 0 && n <= buf.len(), "keepalive {n} of {}", buf.len());
                assert!(buf[..n].iter().all(|b| *b == b'\r' || *b == b'\n'));
                if let Some(Event::KeepAlive(m)) = events.last_mut() {
                    *m += n;
                } else {
                    events.push(Event::KeepAlive(n));
                }
                buf.drain(..n);
            }
            Ok(Frame::Message(n)) => {
                assert!(n > 0 && n <= buf.len() && n <= limit, "message {n} of {}", buf.len());
                let message: Vec<u8> = buf.drain(..n).collect();
                match sipmsg::parse(&message) {
                    Err(e @ (Error::Unterminated | Error::Truncated { .. })) => {
                        panic!("framed message does not parse: {e}: {message:?}")
                    }
                    _ => {}
                }
                events.push(Event::Message(message));
            }
            Err(e) => {
                events.push(Event::Error(e));
                return true;
            }
        }
    }
}
