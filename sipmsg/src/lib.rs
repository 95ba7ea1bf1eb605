//! The SIP message layer of sipalias.
//!
//! - [`parse`](parse::parse) turns bytes into a [`SipMessage`] without losing anything a relay must
//!   keep: header names as written, header order, unknown headers and reason phrases survive a
//!   parse/serialize round trip. Compact header forms (`v: i: f: t: m: l:` …) and folded header
//!   lines (RFC 3261 §7.3.1) are understood.
//! - [`frame`](framing::frame) is Content-Length framing for stream transports, check-then-parse.
//! - [`scan`](scan::scan) is the dispatcher's cheap look at a datagram: just the routing keys.
//! - [`uri`], [`headers`] and [`digest`] are the typed views the processor needs.
//!
//! We own this layer instead of using `rsip`: see `docs/parser-measurements.md` for the measurements
//! behind that choice.

pub mod digest;
pub mod error;
pub mod framing;
pub mod headers;
mod lex;
pub mod message;
pub mod methods;
pub mod net;
pub mod parse;
pub mod scan;
pub mod uri;

pub use error::Error;
pub use message::{Header, SipMessage, StartLine};
pub use parse::parse;
pub use uri::Uri;
