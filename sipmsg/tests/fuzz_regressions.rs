//! Inputs found by the fuzz targets of `fuzz/` (see `docs/fuzzing.md`), kept as regression
//! tests: each is the minimized input, as a byte literal, and what must hold for it.

use sipmsg::Error;
use sipmsg::framing::{Frame, frame};

/// Finding 1 (`framing` target): a head longer than the size limit is refused with
/// `TooLarge` (513) while its blank line has not arrived, but with `Missing("Content-Length")`
/// (400) once it has: `frame` looks for Content-Length before it compares the head with the
/// limit. The connection is refused either way (what this test pins); only the answer depends
/// on how TCP cut the bytes.
const LONG_HEAD: &[u8] = b"OPTIONS sip:a SIP/2.0\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
const LIMIT: usize = 200;

#[test]
fn long_head_is_refused_however_it_arrives() {
    assert!(LONG_HEAD.len() > LIMIT);
    for cut in 0..=LONG_HEAD.len() {
        match frame(&LONG_HEAD[..cut], LIMIT) {
            Ok(Frame::Incomplete) => assert!(cut <= LIMIT, "cut {cut}: more than the limit"),
            Ok(other) => panic!("cut {cut}: {other:?}"),
            Err(_) => assert!(cut > LIMIT, "cut {cut}: refused within the limit"),
        }
    }
}

/// The same input: the error does not depend on where the stream was cut (`frame` compares
/// the head with the limit before it looks for Content-Length).
#[test]
fn long_head_error_does_not_depend_on_the_cut() {
    let before_blank_line = frame(&LONG_HEAD[..LIMIT + 1], LIMIT);
    let whole = frame(LONG_HEAD, LIMIT);
    assert_eq!(before_blank_line, Err(Error::TooLarge { limit: LIMIT }));
    assert_eq!(whole, before_blank_line);
}
