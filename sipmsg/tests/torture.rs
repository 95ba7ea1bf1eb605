//! The message layer against the public SIP torture messages: RFC 4475 ("SIP Torture Test
//! Messages") and RFC 5118 ("SIP Torture Test Messages for IPv6"), grouped by RFC section.
//!
//! The messages live in `tests/torture/rfc4475/*.dat` and `tests/torture/rfc5118/*.dat`, one file
//! per message, named as in the RFCs, byte for byte: RFC 4475's with CRLF line ends, RFC 5118's
//! with the bare LF its archive has (see [`wire`]). Each test asserts what the RFC says at the
//! layer that owns it here: `parse` (framing and syntax), `validate_request` /
//! `validate_response` (what an element must refuse), or the typed views (what a parser must
//! expose). The SIP status an element answers with is asserted in `processor/tests/torture.rs`.

use sipmsg::framing::{Frame, frame};
use sipmsg::parse::parse_head;
use sipmsg::scan::{NotSip, scan};
use sipmsg::{Error, SipMessage, Uri, parse};

mod corpus;

use corpus::{RFC4475_INVALID, RFC4475_PARSEABLE, RFC5118, corpus_dir, load, rfc4475, wire};

/// Parses a message the RFC calls well formed.
fn ok(name: &str) -> SipMessage {
    parse(&rfc4475(name)).unwrap_or_else(|e| panic!("RFC 4475 {name} must parse: {e}"))
}

/// `parse(to_bytes(m)) == m`. `to_bytes` always writes a Content-Length (stream transports need
/// one, RFC 3261 §18.3), so a message that had none comes back with exactly that header added.
fn assert_round_trip(name: &str, m: &SipMessage) {
    let mut expected = m.clone();
    if m.header("content-length").is_none() {
        expected.push_header("Content-Length", m.body.len().to_string());
    }
    let again = parse(&m.to_bytes()).unwrap_or_else(|e| panic!("{name}: reparse failed: {e}"));
    assert_eq!(again, expected, "{name}: round trip");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The header line (as written on the wire) whose canonical key is `key`.
fn names_of<'a>(m: &'a SipMessage, key: &str) -> Vec<&'a str> {
    m.headers.iter().filter(|h| h.key == key).map(|h| h.name.as_str()).collect()
}

#[test]
fn corpus_is_complete_and_named_as_in_the_rfcs() {
    for (rfc, expected) in
        [("rfc4475", [RFC4475_PARSEABLE, RFC4475_INVALID].concat()), ("rfc5118", RFC5118.to_vec())]
    {
        let mut on_disk: Vec<String> = std::fs::read_dir(corpus_dir(rfc))
            .expect("corpus directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = expected.iter().map(|n| format!("{n}.dat")).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "{rfc}");
    }
    // RFC 4475 §3.1.1 has 13 valid and §3.1.2 19 invalid messages; 49 in all.
    assert_eq!(RFC4475_PARSEABLE.len() + RFC4475_INVALID.len(), 49);
}

#[test]
fn rfc4475_files_are_crlf_and_rfc5118_files_are_lf_as_published() {
    for name in [RFC4475_PARSEABLE, RFC4475_INVALID].concat() {
        let bytes = rfc4475(name);
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect(name);
        let head = &bytes[..head_end];
        let bare_lf = head.iter().enumerate().any(|(i, b)| *b == b'\n' && head[i - 1] != b'\r');
        assert!(!bare_lf, "{name}: every header line ends in CRLF");
    }
    for name in RFC5118 {
        assert!(!load("rfc5118", name).contains(&b'\r'), "{name}: the archive has no CR");
    }
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.1.1: valid messages. "All elements should treat this as a well-formed request."

#[test]
fn valid_messages_parse_validate_and_round_trip() {
    for name in RFC4475_PARSEABLE {
        let m = ok(name);
        assert_round_trip(name, &m);
        let check = if m.is_request() { m.validate_request() } else { m.validate_response() };
        if *name != "badbranch" {
            check.unwrap_or_else(|e| panic!("{name} is valid: {e}"));
        }
    }
}

/// §3.1.1.1: line folding, escaped quotes, an empty Subject, LWS around every separator, mixed
/// short and long header names, leading zeros in Max-Forwards and CSeq, unknown headers.
#[test]
fn s3_1_1_1_wsinv_short_tortuous_invite() {
    let m = ok("wsinv");
    assert_eq!(m.method(), Some("INVITE"));
    assert_eq!(m.request_uri(), Some("sip:vivekg@chair-dnrc.example.com;unknownparam"));
    assert_eq!(
        Uri::parse(m.request_uri().expect("uri")).expect("uri").param("unknownparam"),
        Some("")
    );
    assert_eq!(m.header("max-forwards"), Some("0068"), "kept as written");
    assert_eq!(names_of(&m, "max-forwards"), ["MaX-fOrWaRdS"], "name kept as written");
    let to = m.to().expect("To");
    assert_eq!(to.tag(), Some("1918181833n"));
    assert_eq!(to.uri.to_string(), "sip:vivekg@chair-dnrc.example.com");
    let from = m.from().expect("From");
    assert_eq!(from.display.as_deref(), Some(r#""J Rosenberg \\\"""#), "escapes kept");
    assert_eq!(from.tag(), Some("98asjd8"));
    let cseq = m.cseq().expect("CSeq");
    assert_eq!((cseq.seq, cseq.method.as_str()), (9, "INVITE"));
    assert_eq!(m.header("subject"), Some(""), "empty `s :`");
    assert_eq!(m.header("newfangledheader"), Some("newfangled value continued newfangled value"));
    assert_eq!(m.header("UnknownHeaderWithUnusualValue"), Some(";;,,;;,;"), "kept unparsed");
    let vias = m.vias().expect("Vias");
    let summary: Vec<_> = vias
        .iter()
        .map(|v| (v.transport.as_str(), v.host.as_str(), v.branch().unwrap_or_default()))
        .collect();
    assert_eq!(
        summary,
        [
            ("UDP", "192.0.2.2", "390skdjuw"),
            ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
            ("UDP", "192.168.255.111", "z9hG4bK30239"),
        ]
    );
    let contact = &m.contacts().expect("Contact")[0];
    assert_eq!(contact.display.as_deref(), Some(r#""Quoted string \"\"""#));
    assert_eq!(contact.param("newparam"), Some("newvalue"));
    assert_eq!(contact.param("secondparam"), Some(""));
    assert_eq!(contact.param("q"), Some("0.33"));
    assert_eq!(
        m.header("route"),
        Some("<sip:services.example.com;lr;unknownwith=value;unknown-no-value>")
    );
    assert_eq!(m.body.len(), 150);
    assert!(m.body.ends_with(b"a=rtpmap:31 LPC\r\n"));
}

/// §3.1.1.2: an extension method of every token character, an unusual user and password, a
/// quoted NUL/BEL/DEL, UTF-8 in a parameter and an extension header.
#[test]
fn s3_1_1_2_intmeth_wide_range_of_valid_characters() {
    let m = ok("intmeth");
    let method = "!interesting-Method0123456789_*+`.%indeed'~";
    assert_eq!(m.method(), Some(method));
    assert_eq!(m.cseq().expect("CSeq").method, method);
    let uri = Uri::parse(m.request_uri().expect("uri")).expect("Request-URI");
    assert_eq!(
        uri.user.as_deref(),
        Some(
            "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
        )
    );
    assert_eq!(uri.user_name(), Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"));
    assert_eq!((uri.host.as_str(), uri.headers.as_deref()), ("example.com", None));
    let to = m.to().expect("To");
    assert_eq!(to.display.as_deref(), Some("\"BEL:\\\u{7} NUL:\\\u{0} DEL:\\\u{7f}\""));
    assert_eq!(to.uri.user.as_deref(), Some("1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"));
    let from = m.from().expect("From");
    assert_eq!(from.display.as_deref(), Some("token1~` token2'+_ token3*%!.-"));
    assert_eq!(from.param("fromParam''~+*_!.-%"), Some("\"работающий\""));
    assert_eq!(from.tag(), Some("_token~1'+`*%!-."));
    assert_eq!(m.call_id().expect("Call-ID"), "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{");
    assert_eq!(m.header("extensionHeader-!.%*+_`'~"), Some("\u{feff}大停電"));
    assert_eq!(m.top_via().expect("Via").branch(), Some("z9hG4bK-.!%66*_+`'~"));
    assert_eq!(m.header("max-forwards"), Some("255"));
}

/// §3.1.1.3: `%HEX HEX` escapes are kept verbatim (decoding is the application's business, and
/// never recursive).
#[test]
fn s3_1_1_3_esc01_escapes_kept_verbatim() {
    let m = ok("esc01");
    let ruri = Uri::parse(m.request_uri().expect("uri")).expect("Request-URI");
    assert_eq!(ruri.user.as_deref(), Some("sips%3Auser%40example.com"));
    assert_eq!(ruri.host, "example.net");
    assert_eq!(m.to().expect("To").uri.user.as_deref(), Some("%75se%72"));
    assert_eq!(m.from().expect("From").uri.user.as_deref(), Some("I%20have%20spaces"));
    let contact = &m.contacts().expect("Contact")[0].uri;
    assert_eq!(contact.user.as_deref(), Some("cal%6Cer"));
    assert_eq!(
        contact.params,
        [("%6C%72".to_owned(), None), ("n%61me".to_owned(), Some("v%61lue%25%34%31".to_owned()))]
    );
    assert_eq!(m.header("content-type"), Some("application/sdp"), "compact `C:`");
    assert_eq!(m.call_id().expect("Call-ID"), "esc01.239409asdfakjkn23onasd0-3234");
}

/// §3.1.1.4: `%00` in user parts must not shorten them; two distinct Contacts.
#[test]
fn s3_1_1_4_escnull_escaped_nulls() {
    let bytes = rfc4475("escnull");
    assert!(!bytes.contains(&0), "the file holds %00 escapes, not NUL octets");
    let m = ok("escnull");
    assert_eq!(m.to().expect("To").uri.user.as_deref(), Some("null-%00-null"));
    assert_eq!(m.from().expect("From").uri.user.as_deref(), Some("null-%00-null"));
    let users: Vec<_> = m
        .contacts()
        .expect("Contact")
        .into_iter()
        .map(|c| c.uri.user.unwrap_or_default())
        .collect();
    assert_eq!(users, ["%00", "%00%00"]);
    assert_eq!(names_of(&m, "content-length"), ["L"]);
}

/// §3.1.1.5: `%` is not an escape in a method, a display name, a branch or a header name.
#[test]
fn s3_1_1_5_esc02_percent_that_is_not_an_escape() {
    let m = ok("esc02");
    assert_eq!(m.method(), Some("RE%47IST%45R"), "an unknown method, not REGISTER");
    assert_eq!(m.to().expect("To").display.as_deref(), Some("\"%Z%45\""));
    assert_eq!(m.top_via().expect("Via").branch(), Some("z9hG4bK209%fzsnel234"));
    let contacts: Vec<_> =
        m.contacts().expect("Contact").into_iter().map(|c| c.uri.to_string()).collect();
    assert_eq!(contacts, ["sip:alias1@host1.example.com", "sip:alias3@host3.example.com"]);
    assert_eq!(m.header("C%6Fntact"), Some("<sip:alias2@host2.example.com>"));
}

/// §3.1.1.6: no LWS between a token display name and `<`.
#[test]
fn s3_1_1_6_lwsdisp_no_lws_before_angle_bracket() {
    let from = ok("lwsdisp").from().expect("From");
    assert_eq!(from.display.as_deref(), Some("caller"));
    assert_eq!(from.uri.to_string(), "sip:caller@example.com");
    assert_eq!(from.tag(), Some("323"));
}

/// §3.1.1.7: long values everywhere, 34 Vias under every spelling of the name.
#[test]
fn s3_1_1_7_longreq_long_values() {
    let m = ok("longreq");
    let vias = m.vias().expect("Vias");
    assert_eq!(vias.len(), 34);
    assert_eq!(vias[0].host, "sip33.example.com");
    assert_eq!(vias[32].host, "sip1.example.com");
    let last = &vias[33];
    assert_eq!(last.param("received"), Some("192.0.2.5"));
    assert_eq!(last.branch(), Some(format!("very{}branchvalue", "long".repeat(50)).as_str()));
    assert_eq!(
        names_of(&m, "via")[..17],
        [
            "Via", "v", "V", "Via", "ViA", "VIa", "VIA", "via", "viA", "vIa", "vIA", "V", "v", "V",
            "v", "Via", "Via"
        ]
    );
    let to = m.to().expect("To");
    let display = format!("\"I have a user name of {} proportion\"", "extreme".repeat(10));
    assert_eq!(to.display.as_deref(), Some(display.as_str()));
    assert_eq!(to.uri.port, Some(6000));
    assert_eq!(to.uri.params.len(), 3);
    let from = m.from().expect("From");
    assert_eq!(from.tag(), Some(format!("12{}424", "982".repeat(50)).as_str()));
    assert_eq!(from.uri.user.as_deref(), Some("amazinglylongcallername".repeat(5).as_str()));
    let call_id = format!("longreq.one{}longcallid", "really".repeat(20));
    assert_eq!(m.call_id().expect("Call-ID"), call_id);
    let unknown = format!("Unknown-{}-Name", "Long".repeat(20));
    let long = "long".repeat(20);
    assert_eq!(
        m.header(&unknown),
        Some(
            format!(
                "unknown-{long}-value; unknown-{long}-parameter-name = unknown-{long}-parameter-value"
            )
            .as_str()
        )
    );
    assert_eq!(m.body.len(), 150);
}

/// §3.1.1.8: a REGISTER whose datagram continues with what looks like an INVITE; the extra
/// octets are noise (RFC 3261 §18.3) and must not survive into anything we send.
#[test]
fn s3_1_1_8_dblreq_extra_octets_are_ignored() {
    let m = ok("dblreq");
    assert_eq!(m.method(), Some("REGISTER"));
    assert!(m.body.is_empty());
    assert_eq!(m.call_id().expect("Call-ID"), "dblreq.0ha0isndaksdj99sdfafnl3lk233412");
    let out = m.to_bytes();
    assert!(!contains(&out, b"INVITE"), "{}", String::from_utf8_lossy(&out));
}

/// §3.1.1.9: "The Request-URI will parse so that the user part is `user;par=u@example.net`"
/// (kept escaped here: `user;par=u%40example.net`).
#[test]
fn s3_1_1_9_semiuri_semicolon_in_user_part() {
    let m = ok("semiuri");
    let uri = Uri::parse(m.request_uri().expect("uri")).expect("Request-URI");
    assert_eq!(uri.user.as_deref(), Some("user;par=u%40example.net"));
    assert_eq!(uri.host, "example.com");
    assert!(uri.params.is_empty());
    assert_eq!(m.header_list("accept").len(), 6, "folded Accept list");
}

/// §3.1.1.10: every Via transport, known and unknown.
#[test]
fn s3_1_1_10_transports_varied_and_unknown() {
    let m = ok("transports");
    let transports: Vec<_> =
        m.vias().expect("Vias").into_iter().map(|v| (v.transport, v.host)).collect();
    let expected = [
        ("UDP", "t1.example.com"),
        ("SCTP", "t2.example.com"),
        ("TLS", "t3.example.com"),
        ("UNKNOWN", "t4.example.com"),
        ("TCP", "t5.example.com"),
    ];
    assert_eq!(transports, expected.map(|(t, h)| (t.to_owned(), h.to_owned())));
    assert_eq!(m.call_id().expect("Call-ID"), "transports.kijh4akdnaqjkwendsasfdj");
}

/// §3.1.1.11: a multipart body with a binary part containing NUL, CR and LF octets must be framed
/// by Content-Length and kept intact.
#[test]
fn s3_1_1_11_mpart01_binary_multipart_body_intact() {
    let bytes = rfc4475("mpart01");
    let m = ok("mpart01");
    assert_eq!(m.body.len(), 553);
    assert_eq!(&m.body[..], &bytes[bytes.len() - 553..]);
    assert!(m.body.contains(&0) && m.body.ends_with(b"--7a9cbec02ceef655--\r\n"));
    assert_eq!(m.header("content-type"), Some("multipart/mixed;boundary=7a9cbec02ceef655"));
    assert!(m.to_bytes().ends_with(&bytes[bytes.len() - 553..]));
}

/// §3.1.1.12: a reason phrase with `*`, `=` and UTF-8 is relayed byte for byte.
#[test]
fn s3_1_1_12_unreason_reason_phrase_byte_exact() {
    let bytes = rfc4475("unreason");
    let m = ok("unreason");
    assert_eq!(m.status(), Some(200));
    assert_eq!(m.reason(), Some("= 2**3 * 5**2 но сто девяносто девять - простое"));
    let first_line = &bytes[..bytes.windows(2).position(|w| w == b"\r\n").expect("line") + 2];
    assert!(m.to_bytes().starts_with(first_line));
}

/// §3.1.1.13: an empty reason phrase (the SP after the code is there) stays empty.
#[test]
fn s3_1_1_13_noreason_empty_reason_phrase() {
    let m = ok("noreason");
    assert_eq!((m.status(), m.reason()), (Some(100), Some("")));
    assert!(m.to_bytes().starts_with(b"SIP/2.0 100 \r\n"));
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.1.2: invalid messages. "Parsers must not break"; an element answers 400 (or 505).

fn invalid(name: &str) -> Error {
    let m =
        parse(&rfc4475(name)).unwrap_or_else(|e| panic!("{name} parses; it is refused later: {e}"));
    let err = m.validate_request().expect_err(name);
    assert_eq!(err.status(), 400, "{name}: {err}");
    err
}

fn bad_header(name: &str) -> &'static str {
    match invalid(name) {
        Error::BadHeader { name, .. } => name,
        other => panic!("{name}: expected a bad header, got {other:?}"),
    }
}

/// §3.1.2.1: extra `;` and `,` in Via and Contact: "respond with a 400 Bad Request".
#[test]
fn s3_1_2_1_badinv01_extraneous_separators() {
    assert_eq!(bad_header("badinv01"), "Via");
    let m = parse(&rfc4475("badinv01")).expect("parse");
    assert!(m.contacts().is_err(), "`;;;;` after a Contact is no parameter");
}

/// §3.1.2.2: Content-Length larger than the datagram: a framing error (answered `400` over UDP
/// from the head alone, which is why `parse_head` exists).
#[test]
fn s3_1_2_2_clerr_content_length_larger_than_message() {
    let bytes = rfc4475("clerr");
    assert_eq!(parse(&bytes), Err(Error::Truncated { have: 154, want: 9999 }));
    let head = parse_head(&bytes).expect("head");
    assert_eq!(head.call_id().expect("Call-ID"), "clerr.0ha0isndaksdjweiafasdk3");
    assert!(head.body.is_empty());
    assert_eq!(frame(&bytes, 65535), Ok(Frame::Incomplete), "over TCP: wait for more");
}

/// §3.1.2.3: a negative Content-Length is an error, never a number.
#[test]
fn s3_1_2_3_ncl_negative_content_length() {
    let bytes = rfc4475("ncl");
    assert!(
        matches!(parse(&bytes), Err(Error::BadHeader { name: "Content-Length", ref detail }) if detail == "-999")
    );
    assert!(parse_head(&bytes).is_ok());
    assert!(matches!(frame(&bytes, 65535), Err(Error::BadHeader { .. })));
}

/// §3.1.2.4: CSeq > 2**32-1 ("respond with a 400 Bad Request due to the CSeq error"), and
/// Max-Forwards > 255 on its own is refused too.
#[test]
fn s3_1_2_4_scalar02_overlarge_request_scalars() {
    assert_eq!(bad_header("scalar02"), "CSeq");
    let mut m = parse(&rfc4475("scalar02")).expect("parse");
    m.set_header("CSeq", "36 REGISTER");
    assert!(matches!(m.validate_request(), Err(Error::BadHeader { name: "Max-Forwards", .. })));
    m.set_header("Max-Forwards", "70");
    m.validate_request().expect("only the scalars were wrong");
    assert_eq!(m.expires(), None, "an overlarge Expires reads as absent (the default applies)");
}

/// §3.1.2.5: a response with CSeq > 2**32-1: "An element receiving this response will simply
/// discard it" (the processor drops what fails `validate_response`).
#[test]
fn s3_1_2_5_scalarlg_overlarge_response_scalars() {
    let m = ok("scalarlg");
    assert!(matches!(m.validate_response(), Err(Error::BadHeader { name: "CSeq", .. })));
}

/// §3.1.2.6: an unterminated quote in the To display name.
#[test]
fn s3_1_2_6_quotbal_unterminated_quote() {
    assert_eq!(bad_header("quotbal"), "To");
}

/// §3.1.2.7: a Request-URI in `<>`.
#[test]
fn s3_1_2_7_ltgtruri_angle_brackets_around_request_uri() {
    assert!(matches!(invalid("ltgtruri"), Error::BadUri(_)));
}

/// §3.1.2.8–10: LWS inside the Request-URI, doubled SP and trailing SP in the request line. We
/// do not guess: the request line is malformed, for the parser and the dispatcher's scan alike.
#[test]
fn s3_1_2_8_to_10_request_line_whitespace() {
    for name in ["lwsruri", "lwsstart", "trws"] {
        let bytes = rfc4475(name);
        assert!(matches!(parse(&bytes), Err(Error::StartLine(_))), "{name}");
        assert_eq!(scan(&bytes), Err(NotSip::StartLine), "{name}");
    }
}

/// §3.1.2.11: escaped headers in a SIP Request-URI (RFC 3261 §19.1.1 forbids them there).
#[test]
fn s3_1_2_11_escruri_headers_in_request_uri() {
    assert!(matches!(invalid("escruri"), Error::BadUri(_)));
}

/// §3.1.2.12: a non-GMT Date. Nothing here reads Date, so being liberal costs nothing: the
/// request is accepted and the header kept as written.
#[test]
fn s3_1_2_12_baddate_is_tolerated() {
    let m = parse(&rfc4475("baddate")).expect("parse");
    m.validate_request().expect("Date is not interpreted");
    assert_eq!(m.header("date"), Some("Fri, 01 Jan 2010 16:00:00 EST"));
}

/// §3.1.2.13: an addr-spec Contact with `?` must have been in `<>`.
#[test]
fn s3_1_2_13_regbadct_contact_needs_angle_brackets() {
    assert_eq!(bad_header("regbadct"), "Contact");
}

/// §3.1.2.14: spaces inside `<>`.
#[test]
fn s3_1_2_14_badaspec_spaces_in_addr_spec() {
    assert_eq!(bad_header("badaspec"), "To");
}

/// §3.1.2.15: an unquoted display name with a comma.
#[test]
fn s3_1_2_15_baddn_unquoted_non_token_display_name() {
    assert_eq!(bad_header("baddn"), "From");
}

/// §3.1.2.16: SIP/7.0 parses far enough to be answered, and is answered `505`.
#[test]
fn s3_1_2_16_badvers_unknown_version_is_505() {
    let bytes = rfc4475("badvers");
    let m = parse(&bytes).expect("a well-formed request line of another version");
    assert_eq!(m.version(), "SIP/7.0");
    let err = m.validate_request().expect_err("not SIP/2.0");
    assert_eq!(err, Error::VersionNotSupported("SIP/7.0".into()));
    assert_eq!((err.status(), err.reason_phrase().as_str()), (505, "Version Not Supported"));
    assert!(m.to_bytes().starts_with(b"OPTIONS sip:t.watson@example.org SIP/7.0\r\n"));
    assert_eq!(scan(&bytes).expect("the dispatcher passes it on").method, Some("OPTIONS"));
}

/// §3.1.2.17–18: CSeq method differs from the request's ("400 is also acceptable" for the
/// unknown method of mismatch02; 501 would be preferred at proxies).
#[test]
fn s3_1_2_17_18_cseq_method_mismatch() {
    assert_eq!(bad_header("mismatch01"), "CSeq");
    assert_eq!(bad_header("mismatch02"), "CSeq");
}

/// §3.1.2.19: a status code of 4294967301 is no status code; "simply drop it".
#[test]
fn s3_1_2_19_bigcode_overlarge_status_code() {
    let bytes = rfc4475("bigcode");
    assert!(matches!(parse(&bytes), Err(Error::StartLine(_))));
    assert_eq!(scan(&bytes), Err(NotSip::StartLine), "not a 429");
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.2: transaction layer.

/// §3.2.1: `branch=z9hG4bK` with no identifier. "A parser must not break"; an element may refuse
/// it with 400 (preferably statelessly), which is what `validate_request` asks for.
#[test]
fn s3_2_1_badbranch_magic_cookie_without_identifier() {
    let m = ok("badbranch");
    assert_eq!(m.top_via().expect("Via").branch(), Some("z9hG4bK"));
    assert_eq!(bad_header("badbranch"), "Via");
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.3: application layer. What to answer is the processor's; here: what parses.

/// §3.3.1: no Call-ID, From or To: "Ideally, it will respond with a 400 Bad Request error."
#[test]
fn s3_3_1_insuf_missing_required_headers() {
    assert_eq!(invalid("insuf"), Error::Missing("Call-ID"));
    let m = parse(&rfc4475("insuf")).expect("parse");
    assert!(m.from().is_err() && m.to().is_err());
}

/// §3.3.2–3: unknown and atypical Request-URI schemes parse; refusing them (416) is the
/// application's decision.
#[test]
fn s3_3_2_3_unknown_request_uri_schemes_parse() {
    for (name, scheme) in [("unkscm", "nobodyknowsthisscheme"), ("novelsc", "soap.beep")] {
        let m = ok(name);
        m.validate_request().expect(name);
        let uri = Uri::parse(m.request_uri().expect("uri")).expect(name);
        assert_eq!(uri.scheme, scheme);
        assert!(!uri.is_sip());
    }
}

/// §3.3.4: unknown schemes in To, From and Contact are syntactically fine.
#[test]
fn s3_3_4_unksm2_unknown_schemes_in_headers() {
    let m = ok("unksm2");
    assert_eq!(m.to().expect("To").uri.scheme, "isbn");
    assert_eq!(m.from().expect("From").uri.scheme, "http");
    assert_eq!(m.contacts().expect("Contact")[0].uri.to_string(), "name:John_Smith");
}

/// §3.3.5: Require and Proxy-Require values are available to answer 420 with.
#[test]
fn s3_3_5_bext01_require_values() {
    let m = ok("bext01");
    assert_eq!(m.header_list("require"), ["nothingSupportsThis", "nothingSupportsThisEither"]);
}

/// §3.3.6: a body of unknown type is kept as it came.
#[test]
fn s3_3_6_invut_unknown_content_type() {
    let m = ok("invut");
    assert_eq!(m.header("content-type"), Some("application/unknownformat"));
    assert_eq!(&m.body[..], b"<audio>\r\n <pcmu port=\"443\"/>\r\n</audio>\r\n");
}

/// §3.3.7: an Authorization of an unknown scheme is no digest and does not break the parser.
#[test]
fn s3_3_7_regaut01_unknown_authorization_scheme() {
    let m = ok("regaut01");
    let auth = m.header("authorization").expect("Authorization");
    assert!(sipmsg::digest::Credentials::parse(auth).is_err());
}

/// §3.3.8: To, From, Call-ID, CSeq and Max-Forwards twice each.
#[test]
fn s3_3_8_multi01_repeated_single_value_headers() {
    assert_eq!(bad_header("multi01"), "Call-ID");
}

/// §3.3.9: two Content-Length values: the body's extent is unknown, a framing error.
#[test]
fn s3_3_9_mcl01_multiple_content_lengths() {
    let bytes = rfc4475("mcl01");
    let multiple =
        Err(Error::BadHeader { name: "Content-Length", detail: "multiple values".into() });
    assert_eq!(parse(&bytes), multiple);
    assert!(matches!(frame(&bytes, 65535), Err(Error::BadHeader { name: "Content-Length", .. })));
    assert!(parse_head(&bytes).is_ok(), "still answerable");
}

/// §3.3.10: a 200 whose second Via is the broadcast address is well formed.
#[test]
fn s3_3_10_bcast_broadcast_via() {
    let m = ok("bcast");
    assert_eq!(m.vias().expect("Vias")[1].host, "255.255.255.255");
}

/// §3.3.11: Max-Forwards 0 is legal.
#[test]
fn s3_3_11_zeromf_max_forwards_zero() {
    assert_eq!(ok("zeromf").header("max-forwards"), Some("0"));
}

/// §3.3.12–13: `;unknownparam` outside `<>` is a contact parameter, inside a URI parameter.
#[test]
fn s3_3_12_13_cparam_contact_versus_uri_parameter() {
    let c1 = &ok("cparam01").contacts().expect("Contact")[0];
    assert_eq!((c1.param("unknownparam"), c1.uri.params.len()), (Some(""), 0));
    let c2 = &ok("cparam02").contacts().expect("Contact")[0];
    assert_eq!((c2.uri.param("unknownparam"), c2.params.len()), (Some(""), 0));
}

/// §3.3.14: an escaped header in a Contact URI is kept, to be returned with the binding.
#[test]
fn s3_3_14_regescrt_escaped_header_in_contact() {
    let m = ok("regescrt");
    let contact = &m.contacts().expect("Contact")[0];
    assert_eq!(contact.uri.headers.as_deref(), Some("Route=%3Csip:sip.example.com%3E"));
    assert_eq!(names_of(&m, "contact"), ["M"]);
}

/// §3.3.15: an Accept without application/sdp is the callee's problem, not a syntax one.
#[test]
fn s3_3_15_sdp01_unacceptable_accept() {
    assert_eq!(ok("sdp01").header("accept"), Some("text/nobodyKnowsThis"));
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.4: backward compatibility.

/// §3.4.1: RFC 2543 syntax: no branch, no From tag, no Content-Length, no Max-Forwards.
#[test]
fn s3_4_1_inv2543_rfc2543_invite() {
    let m = ok("inv2543");
    assert_eq!(m.top_via().expect("Via").branch(), None);
    assert_eq!(m.from().expect("From").tag(), None);
    assert_eq!(m.header("content-length"), None);
    assert_eq!(m.body.len(), 105, "the rest of the datagram");
    assert!(m.body.ends_with(b"m=audio 49217 RTP/AVP 0\r\n"));
}

// ------------------------------------------------------------------------------------------------
// RFC 5118 §4: IPv6.

fn ipv6(name: &str) -> SipMessage {
    let m = parse(&wire(name)).unwrap_or_else(|e| panic!("RFC 5118 {name}: {e}"));
    m.validate_request().unwrap_or_else(|e| panic!("RFC 5118 {name} is valid: {e}"));
    assert_round_trip(name, &m);
    m
}

fn ruri(m: &SipMessage) -> Uri {
    Uri::parse(m.request_uri().expect("request")).expect("Request-URI")
}

/// The archive's own bytes: bare LF is accepted as a line end; what fails is what the archive
/// gets wrong for SIP (no empty line, Content-Length longer than the body).
#[test]
fn rfc5118_archive_bytes_as_published() {
    for name in RFC5118 {
        let raw = load("rfc5118", name);
        let result = parse(&raw);
        match *name {
            "ipv6-in-sdp" => assert_eq!(result, Err(Error::Truncated { have: 242, want: 268 })),
            "mult-ip-in-sdp" => assert_eq!(result, Err(Error::Truncated { have: 180, want: 181 })),
            "ipv6-bug-abnf-3-colons" | "ipv6-correct-abnf-2-colons" => {
                assert_eq!(result, Err(Error::Unterminated))
            }
            _ => assert!(result.is_ok(), "{name}: {result:?}"),
        }
    }
}

/// §4.1: an IPv6 reference in the Request-URI, Via and Contact.
#[test]
fn s4_1_ipv6_good() {
    let m = ipv6("ipv6-good");
    assert_eq!(ruri(&m).host, "[2001:db8::10]");
    assert_eq!(m.top_via().expect("Via").host, "[2001:db8::9:1]");
    assert_eq!(m.contacts().expect("Contact")[0].uri.host, "[2001:db8::1]");
}

/// §4.2: an IPv6 address without brackets: "should respond with a 400 Bad Request".
#[test]
fn s4_2_ipv6_bad() {
    let m = parse(&wire("ipv6-bad")).expect("parse");
    let err = m.validate_request().expect_err("unbracketed IPv6");
    assert!(matches!(err, Error::BadUri(_)) && err.status() == 400, "{err:?}");
}

/// §4.3–4: a port inside the brackets is part of the address; outside it is a port.
#[test]
fn s4_3_4_port_ambiguous_and_unambiguous() {
    let a = ruri(&ipv6("port-ambiguous"));
    assert_eq!((a.host.as_str(), a.port), ("[2001:db8::10:5070]", None));
    let u = ruri(&ipv6("port-unambiguous"));
    assert_eq!((u.host.as_str(), u.port), ("[2001:db8::10]", Some(5070)));
}

/// §4.5: `received` with and without brackets must both parse.
#[test]
fn s4_5_via_received_with_and_without_delimiters() {
    let with = ipv6("via-received-param-with-delim");
    assert_eq!(with.top_via().expect("Via").param("received"), Some("[2001:db8::9:255]"));
    let without = ipv6("via-received-param-no-delim");
    assert_eq!(without.top_via().expect("Via").param("received"), Some("2001:db8::9:255"));
}

/// §4.6 and §4.8: IPv6 in SDP (never bracketed there) is body, kept intact.
#[test]
fn s4_6_and_4_8_ipv6_in_sdp_bodies() {
    let m = ipv6("ipv6-in-sdp");
    assert_eq!(ruri(&m).host, "[2001:db8::10]");
    assert!(contains(&m.body, b"\r\nc=IN IP6 2001:db8::20\r\n"));
    let m = ipv6("mult-ip-in-sdp");
    assert!(contains(&m.body, b"\r\nc=IN IP4 192.0.2.1\r\n"));
    assert!(contains(&m.body, b"\r\nc=IN IP6 2001:db8::1\r\n"));
}

/// §4.7: IPv6 and IPv4 in one Via list, with a port after the bracket.
#[test]
fn s4_7_mult_ip_in_header() {
    let vias = ipv6("mult-ip-in-header").vias().expect("Vias");
    let hosts: Vec<_> = vias.iter().map(|v| (v.host.as_str(), v.port)).collect();
    assert_eq!(
        hosts,
        [("[2001:db8::9:1]", Some(6050)), ("192.0.2.1", None), ("[2001:db8::9:255]", None)]
    );
    assert_eq!(vias[2].param("received"), Some("192.0.2.200"));
}

/// §4.9: IPv4-mapped IPv6 addresses.
#[test]
fn s4_9_ipv4_mapped_ipv6() {
    let m = ipv6("ipv4-mapped-ipv6");
    let vias = m.vias().expect("Vias");
    assert_eq!((vias[0].host.as_str(), vias[0].port), ("[::ffff:192.0.2.10]", Some(19823)));
    assert_eq!(m.contacts().expect("Contact")[0].uri.host, "[::ffff:192.0.2.2]");
}

/// §4.10: "an implementation must tolerate both" the three-colon form RFC 3261's ABNF allowed and
/// the correct two-colon one; the reference is kept as written.
#[test]
fn s4_10_ipv6_abnf_bug_is_tolerated() {
    assert_eq!(ruri(&ipv6("ipv6-bug-abnf-3-colons")).host, "[2001:db8:::192.0.2.1]");
    assert_eq!(ruri(&ipv6("ipv6-correct-abnf-2-colons")).host, "[2001:db8::192.0.2.1]");
}

// ------------------------------------------------------------------------------------------------
// Mutations: what a hostile network makes of these messages must never panic a parser.

/// xorshift64*: deterministic, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A byte that matters to SIP syntax more often than chance would pick it.
    fn byte(&mut self) -> u8 {
        const SYNTAX: &[u8] = b"\r\n :;,<>\"\\@[]%?=/0123456789\t\0";
        if self.next().is_multiple_of(2) {
            SYNTAX[self.below(SYNTAX.len())]
        } else {
            self.next() as u8
        }
    }
}

fn mutate(rng: &mut Rng, original: &[u8]) -> Vec<u8> {
    let mut m = original.to_vec();
    for _ in 0..=rng.below(3) {
        let len = m.len();
        let at = rng.below(len);
        match rng.below(6) {
            0 if len > 0 => m[at] ^= 1 << rng.below(8),
            1 => m.insert(at.min(len), rng.byte()),
            2 if len > 0 => {
                let n = rng.below(8).min(len - at);
                m.drain(at..at + n);
            }
            3 if len > 0 => {
                let n = (1 + rng.below(16)).min(len - at);
                let copy = m[at..at + n].to_vec();
                m.splice(at..at, copy);
            }
            4 => m.truncate(at),
            _ if len > 0 => m[at] = rng.byte(),
            _ => {}
        }
    }
    m
}

/// 2,000 mutations of every message a parser must accept: `parse`, `parse_head`, `scan` and
/// `frame` answer every one without panicking, and whatever `parse` accepts still round-trips and
/// can be validated, and what `frame`/`scan` report stays within the input.
#[test]
fn mutated_torture_messages_never_panic_and_what_parses_round_trips() {
    let mut corpus: Vec<(String, Vec<u8>)> =
        RFC4475_PARSEABLE.iter().map(|n| (n.to_string(), rfc4475(n))).collect();
    corpus.extend(RFC5118.iter().map(|n| (n.to_string(), wire(n))));
    let mut rng = Rng(0x5eed_4475_5118_2026);
    let mut parsed = 0usize;
    for (name, original) in &corpus {
        for i in 0..2_000 {
            let input = mutate(&mut rng, original);
            let what = || format!("{name} mutation {i}: {:?}", String::from_utf8_lossy(&input));
            if let Ok(m) = parse(&input) {
                parsed += 1;
                let _ = m.validate_request();
                let _ = m.validate_response();
                let _ = (m.vias(), m.contacts(), m.from(), m.to());
                let mut expected = m.clone();
                if m.header("content-length").is_none() {
                    expected.push_header("Content-Length", m.body.len().to_string());
                }
                assert_eq!(parse(&m.to_bytes()).as_ref(), Ok(&expected), "{}", what());
            }
            let _ = parse_head(&input);
            if let Ok(s) = scan(&input) {
                assert!(s.status.is_none_or(|c| (100..=699).contains(&c)), "{}", what());
            }
            match frame(&input, 65_535) {
                Ok(Frame::Message(n) | Frame::KeepAlive(n)) => {
                    assert!(n <= input.len(), "{}", what())
                }
                Ok(Frame::Incomplete) | Err(_) => {}
            }
        }
    }
    // The mutations must leave enough messages parseable for the round-trip check to mean
    // something.
    assert!(parsed > corpus.len() * 200, "only {parsed} mutated messages parsed");
}
