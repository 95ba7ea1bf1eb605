//! What the B2BUA asks the async shell to do (look up callees, authorize, account) and the
//! plan a call setup comes back with.

use super::*;

/// One callee binding to ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The binding's Contact: the B-leg Request-URI.
    pub contact: String,
    /// Socket it registered through and the address to send to.
    pub egress: Egress,
    /// From/To host: the alias IP for an alias socket, the main domain otherwise.
    pub host: String,
    /// The B leg's To (a name-addr) when it is not the callee at `host`: a trunk's number at
    /// the trunk's address.
    pub to: Option<String>,
    /// Credentials to answer the target's digest challenge with (a trunk's).
    pub auth: Option<crate::routing::TrunkAuth>,
}

/// What the async setup task decided for a new call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPlan {
    /// Authenticated caller, `user@domain`.
    pub caller_aor: String,
    /// Callee, `user@domain`.
    pub callee_aor: String,
    /// Every binding of the callee, rung at once.
    pub targets: Vec<Target>,
    /// With no `targets`: trunks tried one after the other, the next when one fails
    /// ([`crate::routing::fails_over`]).
    pub hunt: Vec<Target>,
    /// The caller's identity asserted to trunks (`P-Asserted-Identity`, RFC 3325), a SIP URI:
    /// its DID at the domain, else its AOR. Phones are never sent one: they are not trusted.
    pub asserted: Option<String>,
    /// Longest call allowed by billing, 0 = unlimited.
    pub max_duration_secs: u32,
    /// The call's id towards billing (reservation, start and stop), minted by the processor.
    pub call_ref: String,
    /// The caller may make the callee's phone answer by itself (`trusted_auto_answer`): its
    /// auto-answer headers are passed on instead of removed.
    pub auto_answer: bool,
}

/// Work for the async shell.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A REGISTER to authenticate and apply.
    Register {
        /// Its server transaction.
        key: ServerKey,
        /// The request.
        request: SipMessage,
        /// Where it came from.
        ingress: Ingress,
    },
    /// A new INVITE to authenticate, authorize and route.
    Invite {
        /// Its server transaction.
        key: ServerKey,
        /// The request.
        request: SipMessage,
        /// Where it came from.
        ingress: Ingress,
    },
    /// A keepalive OPTIONS to binding `field` of `aor` was answered (`ok`) or timed out.
    KeepaliveResult {
        /// The AOR.
        aor: String,
        /// The binding's field in the AOR's hash.
        field: String,
        /// Answered (any response) rather than timed out.
        ok: bool,
    },
    /// Store (or update) an answered call in Redis.
    SaveDialog(Box<DialogRecord>),
    /// Remove an ended call from Redis.
    DeleteDialog(Box<DialogRecord>),
    /// An ACK (for a 2xx) for a call this processor does not hold: look for it in Redis, then
    /// relay it.
    LoadDialogForAck {
        /// The ACK.
        request: SipMessage,
    },
    /// An in-dialog request for a call this processor does not hold: look for it in Redis.
    LoadDialog {
        /// Its server transaction.
        key: ServerKey,
        /// The request.
        request: SipMessage,
    },
    /// Tell billing a call ended (an answered one carries its start).
    AccountingStop(AccountingStopRequest),
}
