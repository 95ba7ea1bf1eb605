//! Calls: authorization with reservations, and accounting that charges each call once.
//!
//! A call goes through three scripts, each atomic:
//!
//! 1. **authorize** (`lua/authorize.lua`) reserves what the call's longest allowed duration
//!    would cost in `{prefix}resv:{aor}` and writes the call record `{prefix}call:{call_ref}`
//!    (account, tariff snapshot, max duration). A repeated call ref gets the same answer.
//! 2. **start** (`lua/start.lua`) records the answer in the CDR.
//! 3. **stop** (`lua/stop.lua`) records the end, prices the call with the snapshot, debits the
//!    account and releases the reservation, all in one step guarded by the CDR's `stop_key`,
//!    so a retried stop charges nothing more. A stop for a call that was never answered only
//!    releases the reservation.
//!
//! Starts and stops may arrive in either order (a start queued by a processor during a billing
//! outage is delivered after the stop); whichever completes the pair charges.

use std::sync::LazyLock;

use tracing::warn;

use super::{Store, validate_call_ref};
use crate::account::{Account, Aor, Status};
use crate::error::Error;
use crate::rating::{CUTOFF_GRACE_MS, FUNDED_CEILING_SECS};
use crate::store::Tariff;

/// A reservation outlives the call's longest allowed duration by this much before it lapses
/// on its own, in case the stop is lost (the processor queues stops durably, so this is a
/// safety net, not the normal path).
const RESERVATION_GRACE_MS: u64 = 3_600_000;
/// What a call without a duration limit holds its slot for, before the grace.
const UNLIMITED_HOLD_SECS: u32 = 86_400;
/// How long a finished call's record is kept, so that a late Authorize for it is refused.
const TOMBSTONE_MS: u64 = 3_600_000;
/// Attempts of an accounting update whose call record changed under it. Two suffice (one to
/// learn a missing tariff, one to apply); more only under an unlikely race.
const ATTEMPTS: usize = 4;

const TARIFF_LUA: &str = include_str!("lua/tariff.lua");
const ACCOUNTING_LUA: &str = include_str!("lua/accounting.lua");

static AUTHORIZE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!("{TARIFF_LUA}\n{}", include_str!("lua/authorize.lua")))
});
static START: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{TARIFF_LUA}\n{ACCOUNTING_LUA}\n{}",
        include_str!("lua/start.lua")
    ))
});
static START_STOP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{TARIFF_LUA}\n{ACCOUNTING_LUA}\n{}",
        include_str!("lua/start_stop.lua")
    ))
});
static STOP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!("{TARIFF_LUA}\n{ACCOUNTING_LUA}\n{}", include_str!("lua/stop.lua")))
});

/// Why a call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// No account for the caller.
    UnknownAccount,
    /// The account is blocked.
    Blocked,
    /// The account's concurrent-call limit is reached.
    TooManyCalls,
    /// The funds do not buy the connection fee and the first increment.
    InsufficientFunds,
    /// The account's rate plan has no entry for the destination.
    NoRate,
    /// This call ref has already ended (a late or replayed Authorize); nothing is reserved.
    CallEnded,
}

impl Denial {
    /// The code the scripts use.
    fn code(self) -> &'static str {
        match self {
            Denial::UnknownAccount => "unknown_account",
            Denial::Blocked => "blocked",
            Denial::TooManyCalls => "too_many_calls",
            Denial::InsufficientFunds => "insufficient_funds",
            Denial::NoRate => "no_rate",
            Denial::CallEnded => "ended",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        [
            Denial::UnknownAccount,
            Denial::Blocked,
            Denial::TooManyCalls,
            Denial::InsufficientFunds,
            Denial::NoRate,
            Denial::CallEnded,
        ]
        .into_iter()
        .find(|d| d.code() == code)
    }

    /// The text for logs and the SIP `Reason` header.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::UnknownAccount => "unknown caller",
            Denial::Blocked => "account blocked",
            Denial::TooManyCalls => "too many calls",
            Denial::InsufficientFunds => "insufficient funds",
            Denial::NoRate => "no rate for destination",
            Denial::CallEnded => "call already ended",
        }
    }
}

/// The answer to an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    /// The call may proceed.
    Allowed {
        /// Longest it may last; 0 = no limit.
        max_duration_secs: u32,
        /// What is held for it until its stop.
        reserved_micros: i64,
        /// This call ref had been authorized before: the first answer, nothing held again.
        repeated: bool,
    },
    /// The call is refused.
    Denied(Denial),
}

/// What `accounting_start` is told about an answered call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStart {
    /// Unique id of the call, chosen by the processor (the `call_ref` of its Authorize).
    pub call_ref: String,
    /// Caller's AOR.
    pub caller: String,
    /// Callee's AOR.
    pub callee: String,
    /// Local IP the caller came in on.
    pub caller_ingress_ip: String,
    /// Local IP the callee was reached through.
    pub callee_ingress_ip: String,
    /// Answer time, milliseconds since the Unix epoch.
    pub answered_ms: u64,
}

/// What `accounting_stop` is told about the end of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStop {
    /// The call.
    pub call_ref: String,
    /// Hang-up time, milliseconds since the Unix epoch.
    pub ended_ms: u64,
    /// Why it ended.
    pub cause: String,
    /// Same for every retry of this stop.
    pub idempotency_key: String,
    /// Whether the call was answered. A recorded start counts as answered too.
    pub answered: bool,
    /// For a call not answered: the final status its caller got (0: unknown) and its reason;
    /// kept in the failed attempt's CDR.
    pub status: u16,
    /// The reason phrase of `status`, or why the call was refused.
    pub reason: String,
    /// Caller, callee and the caller's ingress IP, for an attempt billing holds no record of
    /// (empty: taken from the call record).
    pub caller: String,
    /// See `caller`.
    pub callee: String,
    /// See `caller`.
    pub caller_ingress_ip: String,
}

/// What an accounting event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountingOutcome {
    /// A start was recorded; the charge comes with the stop.
    Recorded,
    /// The call was priced and the account debited (by `charge_micros`, maybe 0).
    Charged,
    /// An answered call's stop was recorded before its start: it is charged when the start
    /// arrives.
    AwaitingStart,
    /// A call that was not answered: its reservation was released, a CDR of the failed
    /// attempt (status, reason) was written; no charge.
    Released,
    /// The call had already been charged (a retried stop or start): nothing changed, and the
    /// charge is the one applied then.
    Duplicate,
}

/// The outcome of an accounting event and the call's charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountingResult {
    /// What happened.
    pub outcome: AccountingOutcome,
    /// The call's charge in micro-units: what was debited now (`Charged`) or before
    /// (`Duplicate`); 0 otherwise.
    pub charge_micros: i64,
}

impl AccountingResult {
    fn parse(call_ref: &str, (code, charge_micros): (String, i64)) -> Result<Self, Error> {
        let outcome = match code.as_str() {
            "recorded" => AccountingOutcome::Recorded,
            "charged" => AccountingOutcome::Charged,
            "awaiting_start" => AccountingOutcome::AwaitingStart,
            "released" => AccountingOutcome::Released,
            "duplicate" => AccountingOutcome::Duplicate,
            other => {
                return Err(Error::CorruptRecord {
                    key: call_ref.to_owned(),
                    reason: format!("unexpected accounting outcome {other:?}"),
                });
            }
        };
        Ok(Self { outcome, charge_micros })
    }
}

/// The 7 script arguments of a tariff (see `lua/tariff.lua`); `None` asks the script to use
/// the call record's snapshot and say `need_tariff` if there is none.
fn tariff_args(tariff: Option<&Tariff>) -> [String; 7] {
    let blank = |kind: &str| {
        [
            kind.to_owned(),
            String::new(),
            String::new(),
            "0".into(),
            "0".into(),
            "1".into(),
            "1".into(),
        ]
    };
    match tariff {
        None => blank("none"),
        Some(Tariff::Unrated | Tariff::NoRate { .. }) => blank("unrated"),
        Some(Tariff::Rated { plan, prefix, rate }) => [
            "rated".to_owned(),
            plan.clone(),
            prefix.clone(),
            rate.rate_micros_per_minute.to_string(),
            rate.connection_fee_micros.to_string(),
            rate.first_increment_secs.to_string(),
            rate.next_increment_secs.to_string(),
        ],
    }
}

/// Where the account keys of an accounting script came from (checked by the script).
enum Owner {
    /// The call record's `aor`.
    CallRecord(String),
    /// No call record: the caller named by the start or the CDR (maybe none).
    Other(String),
}

impl Owner {
    fn aor(&self) -> &str {
        match self {
            Owner::CallRecord(a) | Owner::Other(a) => a,
        }
    }

    fn source(&self) -> &'static str {
        match self {
            Owner::CallRecord(_) => "call",
            Owner::Other(_) => "other",
        }
    }
}

impl Store {
    /// Authorizes a call from `caller` to `callee` at `now_ms`, reserving funds and a
    /// concurrent-call slot under `call_ref` until its stop (or until the reservation lapses,
    /// an hour after the longest allowed duration).
    ///
    /// Checks, in order: a previous authorization of the same `call_ref` (answered again,
    /// unchanged), unknown caller, blocked, no rate for the destination, the concurrent-call
    /// limit, the funds. See [`crate::rating::authorize`] for the duration.
    pub async fn authorize(
        &self,
        caller: &str,
        callee: &str,
        call_ref: &str,
        now_ms: u64,
    ) -> Result<Authorization, Error> {
        validate_call_ref(call_ref)?;
        let Ok(aor) = Aor::parse(caller) else {
            return Ok(Authorization::Denied(Denial::UnknownAccount));
        };
        let account = self.get(&aor).await?;
        self.authorize_account(&aor, account.as_ref(), callee, call_ref, now_ms).await
    }

    /// [`authorize`](Self::authorize) for a caller whose account the caller of this function
    /// has just read (Authorize with credentials reads it once for the digest and the call).
    pub async fn authorize_account(
        &self,
        aor: &Aor,
        account: Option<&Account>,
        callee: &str,
        call_ref: &str,
        now_ms: u64,
    ) -> Result<Authorization, Error> {
        validate_call_ref(call_ref)?;
        // Read outside the script: only the rate lookup needs it, and the script checks the
        // account again.
        let (verdict, tariff) = match account {
            None => (Some(Denial::UnknownAccount), Tariff::Unrated),
            Some(a) if a.status == Status::Blocked => (Some(Denial::Blocked), Tariff::Unrated),
            Some(a) => match self.tariff(a, callee).await? {
                Tariff::NoRate { .. } => (Some(Denial::NoRate), Tariff::Unrated),
                t => (None, t),
            },
        };
        let aor = aor.to_string();
        let mut invocation = AUTHORIZE.prepare_invoke();
        invocation
            .key(self.account_key_str(&aor))
            .key(self.reservations_key(&aor))
            .key(self.call_key(call_ref))
            .arg(call_ref)
            .arg(&aor)
            .arg(callee)
            .arg(now_ms)
            .arg(verdict.map_or("ok", Denial::code))
            .arg(self.max_duration_cap_secs)
            .arg(FUNDED_CEILING_SECS)
            .arg(UNLIMITED_HOLD_SECS)
            .arg(RESERVATION_GRACE_MS);
        for a in tariff_args(Some(&tariff)) {
            invocation.arg(a);
        }
        let (code, max, reserved): (String, i64, i64) =
            invocation.invoke_async(&mut self.conn.clone()).await?;
        let allowed = |repeated| Authorization::Allowed {
            max_duration_secs: u32::try_from(max).unwrap_or(u32::MAX),
            reserved_micros: reserved,
            repeated,
        };
        match code.as_str() {
            "allowed" => Ok(allowed(false)),
            "repeat" => Ok(allowed(true)),
            other => Denial::from_code(other).map(Authorization::Denied).ok_or_else(|| {
                Error::CorruptRecord {
                    key: self.call_key(call_ref),
                    reason: format!("unexpected authorization outcome {other:?}"),
                }
            }),
        }
    }

    /// Records that a call was answered. If its stop was recorded first, the call is charged
    /// now (see [`AccountingOutcome`]); a start after the charge changes nothing.
    pub async fn accounting_start(
        &self,
        start: &CallStart,
        now_ms: u64,
    ) -> Result<AccountingResult, Error> {
        validate_call_ref(&start.call_ref)?;
        let reply = self
            .run_accounting(
                &START,
                &start.call_ref,
                Some((&start.caller, &start.callee)),
                now_ms,
                |inv| {
                    inv.arg(&start.call_ref)
                        .arg(&start.caller)
                        .arg(&start.callee)
                        .arg(&start.caller_ingress_ip)
                        .arg(&start.callee_ingress_ip)
                        .arg(start.answered_ms);
                },
            )
            .await?;
        AccountingResult::parse(&start.call_ref, reply)
    }

    /// Records the end of a call and charges it, once: see [`AccountingOutcome`].
    pub async fn accounting_stop(
        &self,
        stop: &CallStop,
        now_ms: u64,
    ) -> Result<AccountingResult, Error> {
        validate_call_ref(&stop.call_ref)?;
        let reply = self
            .run_accounting(&STOP, &stop.call_ref, None, now_ms, |inv| {
                inv.arg(&stop.call_ref)
                    .arg(stop.ended_ms)
                    .arg(&stop.cause)
                    .arg(&stop.idempotency_key)
                    .arg(if stop.answered { "1" } else { "0" })
                    .arg(stop.status)
                    .arg(&stop.reason)
                    .arg(&stop.caller)
                    .arg(&stop.callee)
                    .arg(&stop.caller_ingress_ip);
            })
            .await?;
        AccountingResult::parse(&stop.call_ref, reply)
    }

    /// An answered call's start and stop at once, as processors send them: the same outcome
    /// as [`accounting_start`](Self::accounting_start) then
    /// [`accounting_stop`](Self::accounting_stop), in one script when billing has heard
    /// nothing of the call yet (the usual case), else by those two.
    pub async fn accounting_start_stop(
        &self,
        start: &CallStart,
        stop: &CallStop,
        now_ms: u64,
    ) -> Result<AccountingResult, Error> {
        validate_call_ref(&stop.call_ref)?;
        if start.call_ref != stop.call_ref {
            return Err(Error::InvalidInput {
                what: "start",
                reason: "the start and the stop name different calls".to_owned(),
            });
        }
        let known = Some((start.caller.as_str(), start.callee.as_str()));
        let reply = self
            .run_accounting(&START_STOP, &stop.call_ref, known, now_ms, |inv| {
                inv.arg(&stop.call_ref)
                    .arg(&start.caller)
                    .arg(&start.callee)
                    .arg(&start.caller_ingress_ip)
                    .arg(&start.callee_ingress_ip)
                    .arg(start.answered_ms)
                    .arg(stop.ended_ms)
                    .arg(&stop.cause)
                    .arg(&stop.idempotency_key);
            })
            .await?;
        if reply.0 == "separate" {
            self.accounting_start(start, now_ms).await?;
            return self.accounting_stop(stop, now_ms).await;
        }
        AccountingResult::parse(&stop.call_ref, reply)
    }

    /// Runs one of the accounting scripts (`start`, `stop`, `start_stop`) until it applies:
    /// they all take the call's own arguments (`args`), then the account the keys were chosen
    /// for and where that came from, the time, the tombstone and the cut-off grace, and a
    /// tariff when they asked for one. `known` is the caller and callee the request names; a
    /// stop names none, and they are read from the CDR. Returns the script's final reply
    /// (anything but `retry` and `need_tariff`).
    async fn run_accounting(
        &self,
        script: &redis::Script,
        call_ref: &str,
        known: Option<(&str, &str)>,
        now_ms: u64,
        args: impl Fn(&mut redis::ScriptInvocation<'_>),
    ) -> Result<(String, i64), Error> {
        let mut tariff: Option<Tariff> = None;
        for _ in 0..ATTEMPTS {
            let (owner, cdr_caller, cdr_callee): (Option<String>, Option<String>, Option<String>) =
                match known {
                    Some(_) => {
                        let owner = redis::cmd("HGET")
                            .arg(self.call_key(call_ref))
                            .arg("aor")
                            .query_async(&mut self.conn.clone())
                            .await?;
                        (owner, None, None)
                    }
                    None => {
                        redis::pipe()
                            .hget(self.call_key(call_ref), "aor")
                            .hget(self.cdr_key(call_ref), "caller")
                            .hget(self.cdr_key(call_ref), "callee")
                            .query_async(&mut self.conn.clone())
                            .await?
                    }
                };
            let (caller, callee) = match known {
                Some((caller, callee)) => (caller.to_owned(), callee.to_owned()),
                None => (cdr_caller.unwrap_or_default(), cdr_callee.unwrap_or_default()),
            };
            let owner = owner.map_or_else(|| Owner::Other(caller.clone()), Owner::CallRecord);
            let mut invocation = script.prepare_invoke();
            self.accounting_keys(&mut invocation, call_ref, owner.aor());
            args(&mut invocation);
            invocation
                .arg(owner.aor())
                .arg(owner.source())
                .arg(now_ms)
                .arg(TOMBSTONE_MS)
                .arg(CUTOFF_GRACE_MS);
            for a in tariff_args(tariff.as_ref()) {
                invocation.arg(a);
            }
            let reply: (String, i64) = invocation.invoke_async(&mut self.conn.clone()).await?;
            match reply.0.as_str() {
                "retry" => continue,
                "need_tariff" => {
                    tariff = Some(self.fallback_tariff(call_ref, &caller, &callee).await?);
                    continue;
                }
                _ => return Ok(reply),
            }
        }
        Err(Error::Contended { call_ref: call_ref.to_owned() })
    }

    fn accounting_keys(
        &self,
        invocation: &mut redis::ScriptInvocation<'_>,
        call_ref: &str,
        aor: &str,
    ) {
        invocation
            .key(self.cdr_key(call_ref))
            .key(self.cdrs_key())
            .key(self.call_key(call_ref))
            .key(self.account_key_str(aor))
            .key(self.reservations_key(aor));
    }

    /// The tariff of an answered call that has no call record: it was connected without
    /// authorization (the processor's `allow` policy during a billing outage), or its record
    /// lapsed. It is rated with the caller's current plan; a call that cannot be rated is
    /// charged nothing, and said so in the log.
    async fn fallback_tariff(
        &self,
        call_ref: &str,
        caller: &str,
        callee: &str,
    ) -> Result<Tariff, Error> {
        let account = match Aor::parse(caller) {
            Ok(aor) => self.get(&aor).await?,
            Err(_) => None,
        };
        let tariff = match &account {
            Some(a) => self.tariff(a, callee).await?,
            None => Tariff::Unrated,
        };
        match &tariff {
            Tariff::NoRate { plan } => {
                warn!(call_ref, caller, callee, plan, "unauthorized call has no rate: not charged");
            }
            Tariff::Unrated if account.is_none() => {
                warn!(call_ref, caller, "call without authorization or known account: not charged");
            }
            _ => {}
        }
        Ok(tariff)
    }
}
