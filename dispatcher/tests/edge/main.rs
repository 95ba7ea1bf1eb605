//! The dispatcher in-process, over real sockets on 127.0.0.x: UDP, TCP and TLS listeners on
//! the main IP and on aliases, the gRPC edge link on 127.0.0.1, and fake processors speaking
//! the real `Edge` protocol through tonic's client. One test binary for all of them.
//!
//! Every socket is bound on port 0 by the test *before* the dispatcher starts and handed to
//! `run_with`, so there is no free-port race and no waiting for readiness. Events are awaited
//! with a timeout; absence is shown by ordering where possible (send what must be ignored,
//! then what must be answered, and check the first answer is the second's). TLS certificates
//! are generated at test time with `rcgen` into a temporary directory.

mod cluster;
mod harness;
mod tcp;
mod tls;
mod udp;
