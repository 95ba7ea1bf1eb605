//! Content-Length framing for stream transports (RFC 3261 §18.3), check-then-parse.

use crate::error::Error;

/// What the front of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet; read more.
    Incomplete,
    /// `n` bytes of CRLF keepalive (RFC 5626 §3.5.1): a double CRLF is a ping to answer with CRLF.
    KeepAlive(usize),
    /// One whole message occupies the first `n` bytes.
    Message(usize),
}

/// Looks at the front of `buf`. A message without Content-Length, or longer than `limit`, is an
/// error (the caller answers 400/513 and closes the connection). No allocation.
pub fn frame(buf: &[u8], limit: usize) -> Result<Frame, Error> {
    let crlf = buf.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
    if crlf > 0 {
        return Ok(Frame::KeepAlive(crlf));
    }
    let Some(head_end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > limit {
            return Err(Error::TooLarge { limit });
        }
        return Ok(Frame::Incomplete);
    };
    let body_start = head_end + 4;
    // The head against the limit first: the answer to an oversized head must not depend on
    // whether its blank line arrived in the same read (fuzz finding 1, docs/fuzzing.md).
    if body_start > limit {
        return Err(Error::TooLarge { limit });
    }
    let head = &buf[..head_end];
    let mut length = None;
    for line in head.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let name = trim(&line[..colon]);
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            if length.is_some() {
                // Two lengths: the message's extent is unknown (RFC 4475 §3.3.9).
                return Err(Error::BadHeader {
                    name: "Content-Length",
                    detail: "multiple values".into(),
                });
            }
            let value = std::str::from_utf8(trim(&line[colon + 1..])).unwrap_or("x");
            length = Some(crate::lex::parse_length(value).ok_or_else(|| Error::BadHeader {
                name: "Content-Length",
                detail: value.to_owned(),
            })?);
        }
    }
    let length = length.ok_or(Error::Missing("Content-Length"))?;
    let total = body_start.checked_add(length).ok_or(Error::TooLarge { limit })?;
    if total > limit {
        return Err(Error::TooLarge { limit });
    }
    if buf.len() < total { Ok(Frame::Incomplete) } else { Ok(Frame::Message(total)) }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &s[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_head_is_too_large_wherever_the_stream_was_cut() {
        // No Content-Length either: once it was `Missing` with its blank line, `TooLarge`
        // without (fuzz finding 1).
        let head = format!("OPTIONS sip:a SIP/2.0\r\nX: {}\r\n\r\n", "a".repeat(300));
        for cut in [201, head.len() - 2, head.len()] {
            assert_eq!(frame(&head.as_bytes()[..cut], 200), Err(Error::TooLarge { limit: 200 }));
        }
    }

    const MSG: &[u8] = b"OPTIONS sip:a SIP/2.0\r\nl: 3\r\n\r\nabc";

    #[test]
    fn frames_split_and_joined_messages() {
        for cut in 0..MSG.len() {
            assert_eq!(frame(&MSG[..cut], 1000), Ok(Frame::Incomplete), "cut {cut}");
        }
        let two = [MSG, MSG].concat();
        assert_eq!(frame(&two, 1000), Ok(Frame::Message(MSG.len())));
        assert_eq!(frame(b"\r\n\r\nOPT", 1000), Ok(Frame::KeepAlive(4)));
    }

    #[test]
    fn refuses_missing_or_huge_length() {
        assert_eq!(
            frame(b"OPTIONS sip:a SIP/2.0\r\n\r\n", 1000),
            Err(Error::Missing("Content-Length"))
        );
        assert_eq!(
            frame(b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 10000000\r\n\r\n", 65535),
            Err(Error::TooLarge { limit: 65535 })
        );
        assert_eq!(frame(&[b'A'; 2000], 1000), Err(Error::TooLarge { limit: 1000 }));
        for bad in ["l: 1\r\nContent-Length: 1", "l: -1", "l: +1"] {
            let msg = format!("OPTIONS sip:a SIP/2.0\r\n{bad}\r\n\r\nab");
            assert!(matches!(frame(msg.as_bytes(), 1000), Err(Error::BadHeader { .. })), "{bad}");
        }
    }
}
