//! sipalias reference billing service.
//!
//! Processors call billing over gRPC (`proto/proto/billing.proto`) to check digest
//! credentials, to authorize calls and to record accounting. This crate keeps accounts (digest
//! HA1s per realm, never passwords; prepaid balances or postpaid credit limits), rate plans,
//! reservations of calls in progress and call detail records in Redis, serves the contract
//! with tonic, and provides the `sipalias-billing` CLI to run the service and manage accounts,
//! rates and CDRs.
//!
//! - [`config`]: `[billing]` table of the cluster TOML file, with env overrides.
//! - [`account`]: AORs, account status, kind and settings, and the pure digest check.
//! - [`money`]: amounts as integer micro-units and their decimal form.
//! - [`rating`]: rate plans' prefix match, call pricing and the funds check, without I/O.
//! - [`store`]: the Redis layout and its operations (atomic Lua scripts for money).
//! - [`service`]: the gRPC service and [`service::serve`].
//! - [`cli`]: the command line.
//!
//! See `docs/billing.md` for the operator's view.

pub mod account;
pub mod cli;
pub mod config;
pub mod error;
pub mod import;
pub mod money;
pub mod rating;
pub mod service;
pub mod store;

pub use config::BillingConfig;
pub use error::Error;
pub use service::{BillingService, serve};
pub use store::Store;
