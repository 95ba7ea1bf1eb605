//! Billing against a real `redis-server` (one per test, on a unix socket): the store, its Lua
//! scripts, the gRPC service and the command line. One test binary, one module per subject.

mod accounts;
mod calls;
mod cli;
mod pricing;

use std::future::Future;
use std::time::Duration;

use sipalias_billing::account::{AccountSettings, Aor, Kind};
use sipalias_billing::rating::Rate;
use sipalias_billing::store::{CallStart, CallStop};
use sipalias_billing::{BillingConfig, Store};
use sipalias_proto::billing::billing_client::BillingClient;
use sipalias_tests::redis::RedisServer;
use tempfile::TempDir;
use tonic::transport::Channel;

/// Key prefix of every test, so the documented layout is checked with a non-default prefix.
pub const PREFIX: &str = "t:";
/// 0.10, in micro-units.
pub const TEN_CENTS: i64 = 100_000;
/// 1.00, in micro-units.
pub const ONE: i64 = 1_000_000;

/// A redis-server and a store on it. Dropping it stops the server.
pub struct Env {
    /// Holds the socket, and files a test writes.
    pub dir: TempDir,
    /// The server.
    pub redis: RedisServer,
    /// Billing's configuration for it.
    pub config: BillingConfig,
    /// A store on it.
    pub store: Store,
}

/// Starts redis-server and connects a store configured with the `[billing]` keys in `extra`
/// (TOML lines, e.g. `default_max_duration_secs = 60`).
pub async fn env(extra: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = RedisServer::start(dir.path()).expect("redis-server");
    let toml = format!(
        "[processor]\nignored = true\n[billing]\nredis_url = {:?}\nkey_prefix = {PREFIX:?}\n{extra}\n",
        redis.url()
    );
    let config = BillingConfig::from_toml_str(&toml).expect("config");
    let store = Store::connect(&config).await.expect("connect");
    Env { dir, redis, config, store }
}

impl Env {
    /// A plain connection for reading keys as documented.
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.redis.url()).expect("client");
        client.get_multiplexed_async_connection().await.expect("raw connection")
    }

    /// Creates `user@example.com` with the given billing settings.
    pub async fn account(
        &self,
        user: &str,
        settings: AccountSettings,
        balance: Option<i64>,
    ) -> Aor {
        let aor = Aor::parse(&format!("{user}@example.com")).expect("aor");
        self.store
            .add_account(&aor, "pw", &[], false, &settings, balance)
            .await
            .expect("add account");
        aor
    }

    /// A prepaid account with `balance` on rate plan `plan`.
    pub async fn prepaid(&self, user: &str, balance: i64, plan: &str) -> Aor {
        let settings = AccountSettings {
            kind: Some(Kind::Prepaid),
            rate_plan: Some(Some(plan.to_owned())),
            ..AccountSettings::default()
        };
        self.account(user, settings, Some(balance)).await
    }

    /// The account's balance.
    pub async fn balance(&self, aor: &Aor) -> i64 {
        self.store.get(aor).await.expect("get").expect("account exists").balance_micros
    }

    /// Calls in progress of `aor` and what they hold.
    pub async fn held(&self, aor: &Aor) -> (usize, i64) {
        let usage = self.store.account_usage(aor).await.expect("usage").expect("account exists");
        (usage.reservations.len(), usage.reserved_micros())
    }

    /// Runs the gRPC service on a free port; the returned guard shuts it down when dropped.
    pub async fn serve(&self) -> (BillingClient<Channel>, Server) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task =
            tokio::spawn(sipalias_billing::serve(self.config.clone(), listener, async move {
                let _ = stop_rx.await;
            }));
        let client = BillingClient::connect(format!("http://{addr}")).await.expect("grpc connect");
        (client, Server { stop: Some(stop_tx), task: Some(task) })
    }
}

/// A running gRPC service.
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), sipalias_billing::Error>>>,
}

impl Server {
    /// Stops the service and checks that it shut down cleanly.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("task");
        let served = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(matches!(served, Ok(Ok(Ok(())))), "server shut down cleanly: {served:?}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A rate.
pub fn rate(per_minute: i64, fee: i64, first: u32, next: u32) -> Rate {
    Rate {
        rate_micros_per_minute: per_minute,
        connection_fee_micros: fee,
        first_increment_secs: first,
        next_increment_secs: next,
    }
}

/// The start of call `call_ref` from `caller` answered at `answered_ms`.
pub fn start(call_ref: &str, caller: &Aor, callee: &str, answered_ms: u64) -> CallStart {
    CallStart {
        call_ref: call_ref.to_owned(),
        caller: caller.to_string(),
        callee: callee.to_owned(),
        caller_ingress_ip: "192.0.2.1".to_owned(),
        callee_ingress_ip: "192.0.2.2".to_owned(),
        answered_ms,
    }
}

/// An answered stop with idempotency key `{call_ref};stop`.
pub fn stop(call_ref: &str, ended_ms: u64) -> CallStop {
    CallStop {
        call_ref: call_ref.to_owned(),
        ended_ms,
        cause: "caller-bye".to_owned(),
        idempotency_key: format!("{call_ref};stop"),
        answered: true,
        status: 0,
        reason: String::new(),
        caller: String::new(),
        callee: String::new(),
        caller_ingress_ip: String::new(),
    }
}

/// A stop of a call that was never answered.
pub fn unanswered(call_ref: &str, ended_ms: u64) -> CallStop {
    CallStop { answered: false, cause: "cancelled".to_owned(), ..stop(call_ref, ended_ms) }
}

/// Wall-clock ms, as the service uses.
pub fn now() -> u64 {
    sipalias_billing::store::now_ms()
}

/// Runs `futures` concurrently on the runtime's worker threads and collects their outputs in
/// order.
pub async fn all<F, T>(futures: Vec<F>) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}
