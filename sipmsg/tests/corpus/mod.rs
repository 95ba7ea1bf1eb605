//! The RFC 4475 and RFC 5118 torture messages: which exist, and how to read them. Shared by
//! `sipmsg/tests/torture.rs` and `processor/tests/torture.rs` (included there by path).

// Each including test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::PathBuf;

/// RFC 4475 §3.1.1 (valid messages), §3.2.1 (syntactically valid) and those of §3.3/§3.4 a
/// parser must accept: every one must parse and survive a round trip.
pub const RFC4475_PARSEABLE: &[&str] = &[
    "wsinv",
    "intmeth",
    "esc01",
    "escnull",
    "esc02",
    "lwsdisp",
    "longreq",
    "dblreq",
    "semiuri",
    "transports",
    "mpart01",
    "unreason",
    "noreason",
    "badbranch",
    "unkscm",
    "novelsc",
    "unksm2",
    "bext01",
    "invut",
    "regaut01",
    "bcast",
    "zeromf",
    "cparam01",
    "cparam02",
    "regescrt",
    "sdp01",
    "inv2543",
];

/// RFC 4475 §3.1.2 (invalid messages) and the §3.3 messages an element must refuse.
pub const RFC4475_INVALID: &[&str] = &[
    "badinv01",
    "clerr",
    "ncl",
    "scalar02",
    "scalarlg",
    "quotbal",
    "ltgtruri",
    "lwsruri",
    "lwsstart",
    "trws",
    "escruri",
    "baddate",
    "regbadct",
    "badaspec",
    "baddn",
    "badvers",
    "mismatch01",
    "mismatch02",
    "bigcode",
    "insuf",
    "multi01",
    "mcl01",
];

/// RFC 5118 §4, in section order.
pub const RFC5118: &[&str] = &[
    "ipv6-good",
    "ipv6-bad",
    "port-ambiguous",
    "port-unambiguous",
    "via-received-param-with-delim",
    "via-received-param-no-delim",
    "ipv6-in-sdp",
    "mult-ip-in-header",
    "mult-ip-in-sdp",
    "ipv4-mapped-ipv6",
    "ipv6-bug-abnf-3-colons",
    "ipv6-correct-abnf-2-colons",
];

/// The directory of one RFC's messages. Found from the including crate's manifest directory, so
/// that `processor/tests/torture.rs` reads the same files.
pub fn corpus_dir(rfc: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sipmsg/tests/torture").join(rfc)
}

pub fn load(rfc: &str, name: &str) -> Vec<u8> {
    let path = corpus_dir(rfc).join(format!("{name}.dat"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn rfc4475(name: &str) -> Vec<u8> {
    load("rfc4475", name)
}

/// RFC 5118's archive (Appendix A) holds its messages with bare LF line ends, the two §4.10
/// messages without the empty line that ends a header section, and Content-Length values that
/// do not match their bodies (`ipv6-in-sdp` says 268 for 242 octets, `mult-ip-in-sdp` 181 for
/// 180). The files keep those bytes; this is the message a phone would put on the wire: CRLF
/// line ends, the header section closed and Content-Length counting the body. No octet of a URI,
/// an address or a body changes.
pub fn wire(name: &str) -> Vec<u8> {
    let raw = load("rfc5118", name);
    let mut text = String::from_utf8(raw).expect("RFC 5118 messages are text");
    if !text.contains("\n\n") {
        text.push('\n');
    }
    let (head, body) = text.split_once("\n\n").expect("header section");
    let head: Vec<String> = head
        .lines()
        .map(|l| match l.split_once(':') {
            Some((n, _)) if n.eq_ignore_ascii_case("content-length") => {
                format!("Content-Length: {}", body.replace('\n', "\r\n").len())
            }
            _ => l.to_owned(),
        })
        .collect();
    format!("{}\r\n\r\n{}", head.join("\r\n"), body.replace('\n', "\r\n")).into_bytes()
}
