//! A local emulator of Imprint's customer endpoints (docs/design.md §6), with injected faults
//! and an admin API that tells from outside what the daemon did: used by the tests, the demo,
//! the benchmark, and partners developing locally.
//!
//! Built to be a benchmark target: no lock is held across an await or for more than a few map
//! operations, counters are atomics, and the rate limit is a lock-free GCRA.

mod customer;
mod store;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

/// The faults injected into `/v2/customers` requests; changed live with `PUT /_sandbox/faults`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    /// Added before every answer.
    pub latency_ms: u64,
    /// Share of requests answered 500, from 0.0 to 1.0.
    pub fail_rate: f64,
    /// Requests per second (all customers together) beyond which the answer is 429.
    pub rate_limit: Option<f64>,
    /// Customer ids answered 404 `CUSTOMER_NOT_FOUND_ERROR`.
    pub not_found: HashSet<String>,
    /// Share of requests answered 400 `INVALID_REQUEST_ERROR` (after the body is journaled,
    /// like the 500s), from 0.0 to 1.0: rows that fail while newer ones are pending.
    #[serde(default)]
    pub reject_rate: f64,
}

impl Faults {
    /// Refuses values that cannot mean anything: a rate outside 0..=1, a limit not above 0.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err("fail_rate must be between 0.0 and 1.0".into());
        }
        if !(0.0..=1.0).contains(&self.reject_rate) {
            return Err("reject_rate must be between 0.0 and 1.0".into());
        }
        if let Some(rps) = self.rate_limit
            && !(rps.is_finite() && rps > 0.0)
        {
            return Err("rate_limit must be a number of requests per second above 0".into());
        }
        Ok(())
    }
}

/// What `GET /_sandbox/stats` answers: counts of `/v2/customers` requests since start or reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub requests_total: u64,
    /// Answers by HTTP status (JSON keys are the status as a string: `"200"`).
    pub by_status: BTreeMap<u16, u64>,
    /// The most requests ever in flight at once for one customer (G1 holds when it is 1).
    pub max_concurrent_per_customer: u64,
    /// Customers created by a POST.
    pub customers: u64,
    /// `GET /v2/customers/{id}` requests (reconciliation's reads), whatever the answer.
    #[serde(default)]
    pub reads: u64,
    /// Changes made "at Imprint" through `PATCH` / `DELETE /_sandbox/customers/{id}`.
    #[serde(default)]
    pub drift_injected: u64,
}

impl Stats {
    /// Answers with this status (0 when none).
    pub fn count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// A running sandbox. Dropping the handle stops it.
pub struct SandboxHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SandboxHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/`: the base URL to give a client.
    pub fn base_url(&self) -> Url {
        Url::parse(&format!("http://{}/", self.addr)).expect("a socket address makes a URL")
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The bodies received for a customer, oldest first (the last `store::JOURNAL_MAX`).
    pub fn journal(&self, customer_id: &str) -> Vec<Value> {
        self.shared.journal(customer_id)
    }

    /// The customer object as a GET would answer it.
    pub fn customer(&self, customer_id: &str) -> Option<Value> {
        self.shared.store.customer(customer_id).map(Value::Object)
    }

    pub fn faults(&self) -> Faults {
        self.shared.live().faults.clone()
    }

    /// Replaces the faults from the next request on.
    pub fn set_faults(&self, faults: Faults) -> anyhow::Result<()> {
        self.shared.set_faults(faults)
    }

    /// Forgets stats and journals (customers stay).
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops serving and waits for open requests to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        (&mut self.task)
            .await
            .context("the sandbox task panicked")?
            .context("serving the sandbox")
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves the sandbox on `listener` in a task of the current runtime.
pub async fn spawn(
    listener: TcpListener,
    api_key: String,
    faults: Faults,
) -> anyhow::Result<SandboxHandle> {
    let addr = listener
        .local_addr()
        .context("reading the sandbox's address")?;
    let shared = Arc::new(Shared {
        api_key,
        store: store::Store::new(),
        statuses: std::array::from_fn(|_| AtomicU64::new(0)),
        reads: AtomicU64::new(0),
        drift_injected: AtomicU64::new(0),
        live: RwLock::new(Arc::new(Live::new(faults)?)),
    });
    let stop = CancellationToken::new();
    let app = router(shared.clone());
    let task = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    Ok(SandboxHandle {
        addr,
        shared,
        stop,
        task,
    })
}

/// Serves the sandbox on a free port of 127.0.0.1 (for tests, the demo and the benchmark).
pub async fn spawn_local(api_key: &str, faults: Faults) -> anyhow::Result<SandboxHandle> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .context("listening on 127.0.0.1")?;
    spawn(listener, api_key.to_owned(), faults).await
}

/// What `imprint-sync sandbox` serves: where, the key it accepts, and the faults to start with.
pub struct Options {
    pub listen: SocketAddr,
    pub api_key: String,
    pub faults: Faults,
}

/// `imprint-sync sandbox`: serves until SIGINT or SIGTERM.
pub async fn serve(options: Options) -> anyhow::Result<()> {
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("listening on {}", options.listen))?;
    let handle = spawn(listener, options.api_key, options.faults).await?;
    // Never the key: only where to reach it.
    tracing::info!(listen = %handle.addr(), "sandbox listening");
    crate::signals::first().await;
    tracing::info!("sandbox stopping");
    handle.shutdown().await
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/v2/customers/{id}", post(post_customer).get(get_customer))
        .route("/_sandbox/stats", get(admin_stats))
        .route("/_sandbox/journal/{id}", get(admin_journal))
        .route("/_sandbox/faults", put(admin_put_faults).get(admin_faults))
        .route("/_sandbox/reset", post(admin_reset))
        .route(
            "/_sandbox/customers/{id}",
            patch(admin_patch_customer).delete(admin_delete_customer),
        )
        .with_state(shared)
}

/// The faults in force and the rate limiter built for them, swapped whole on a change.
struct Live {
    faults: Faults,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Live {
    fn new(faults: Faults) -> anyhow::Result<Self> {
        faults.check().map_err(anyhow::Error::msg)?;
        let limiter = faults.rate_limit.and_then(|rps| {
            // One second's worth of burst, at least one request.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "clamped to u32; float-to-int `as` saturates (a rate of 0 or less gives 0: no limiter)"
            )]
            let burst = rps.ceil().min(f64::from(u32::MAX)) as u32;
            let burst = NonZeroU32::new(burst)?;
            let period = Duration::try_from_secs_f64(1.0 / rps).ok()?;
            let quota = Quota::with_period(period.max(Duration::from_nanos(1)))?;
            Some(RateLimiter::direct(quota.allow_burst(burst)))
        });
        Ok(Self { faults, limiter })
    }
}

struct Shared {
    api_key: String,
    store: store::Store,
    /// Answers by status code, indexed by the code.
    statuses: [AtomicU64; 1000],
    reads: AtomicU64,
    drift_injected: AtomicU64,
    live: RwLock<Arc<Live>>,
}

impl Shared {
    fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_faults(&self, faults: Faults) -> anyhow::Result<()> {
        let live = Arc::new(Live::new(faults)?);
        *self.live.write().unwrap_or_else(PoisonError::into_inner) = live;
        Ok(())
    }

    fn stats(&self) -> Stats {
        let by_status: BTreeMap<u16, u64> = (0u16..)
            .zip(&self.statuses)
            .map(|(code, n)| (code, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        Stats {
            requests_total: by_status.values().sum(),
            by_status,
            max_concurrent_per_customer: self.store.max_concurrent(),
            customers: self.store.customers(),
            reads: self.reads.load(Ordering::Relaxed),
            drift_injected: self.drift_injected.load(Ordering::Relaxed),
        }
    }

    fn journal(&self, id: &str) -> Vec<Value> {
        self.store
            .journal(id)
            .iter()
            // A body that was not JSON is kept as its text, so the journal shows it too.
            .map(|b| {
                serde_json::from_slice(b)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
            })
            .collect()
    }

    fn reset(&self) {
        for n in self
            .statuses
            .iter()
            .chain([&self.reads, &self.drift_injected])
        {
            n.store(0, Ordering::Relaxed);
        }
        self.store.clear_journals();
    }

    /// What POST and GET share: the in-flight count, the faults, the key, the journal and the
    /// stats. `answer` runs only for a request that got past all of them.
    async fn customer_request(
        &self,
        id: &str,
        headers: &HeaderMap,
        body: Option<&Bytes>,
        answer: impl FnOnce() -> Response,
    ) -> Response {
        let _in_flight = self.store.enter(id);
        if body.is_none() {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        let response = match self.admit(id, headers, body).await {
            Ok(()) => answer(),
            Err(refused) => refused,
        };
        if let Some(n) = self.statuses.get(usize::from(response.status().as_u16())) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        response
    }

    async fn admit(
        &self,
        id: &str,
        headers: &HeaderMap,
        body: Option<&Bytes>,
    ) -> Result<(), Response> {
        let live = self.live();
        if live.faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(live.faults.latency_ms)).await;
        }
        if !self.authorized(headers) {
            return Err(error(
                StatusCode::UNAUTHORIZED,
                "AUTHENTICATION_ERROR",
                "missing or invalid API key (Authorization: Bearer <api_key>)",
                None,
            ));
        }
        if let Some(body) = body {
            self.store.record(id, body.clone());
        }
        if let Some(limiter) = &live.limiter
            && let Err(not_until) = limiter.check()
        {
            let wait = not_until.wait_time_from(limiter.clock().now());
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "whole seconds, at least 1; float-to-int `as` saturates"
            )]
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMIT_ERROR",
                "too many requests",
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return Err(response);
        }
        if live.faults.fail_rate > 0.0 && rand::random::<f64>() < live.faults.fail_rate {
            return Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "API_ERROR",
                "injected failure",
                None,
            ));
        }
        if live.faults.reject_rate > 0.0 && rand::random::<f64>() < live.faults.reject_rate {
            return Err(error(
                StatusCode::BAD_REQUEST,
                INVALID,
                "injected rejection",
                None,
            ));
        }
        // An id that could not be an Imprint id is not found either.
        if live.faults.not_found.contains(id) || crate::profile::check_customer_id(id).is_err() {
            return Err(not_found());
        }
        Ok(())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        // A plain comparison: this is a local emulator, not a place to guard against timing.
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|key| key == self.api_key)
    }

    fn update(&self, id: &str, body: &[u8]) -> Response {
        let value: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                let message = format!("the body is not valid JSON: {e}");
                return error(StatusCode::BAD_REQUEST, INVALID, &message, None);
            }
        };
        match customer::check_body(&value) {
            Ok(fields) => match self.store.update(id, fields, &now()) {
                Some(c) => Json(c).into_response(),
                None => not_found(),
            },
            Err(e) => error(
                StatusCode::BAD_REQUEST,
                INVALID,
                &e.message,
                e.param.as_deref(),
            ),
        }
    }

    fn show(&self, id: &str) -> Response {
        match self.store.customer(id) {
            Some(c) => Json(c).into_response(),
            None => not_found(),
        }
    }
}

const INVALID: &str = "INVALID_REQUEST_ERROR";

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The canonical error shape: `{"error":{"type","message","param"}}`.
fn error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    let mut e = json!({"type": kind, "message": message});
    if let Some(p) = param {
        e["param"] = Value::String(p.to_owned());
    }
    (status, Json(json!({ "error": e }))).into_response()
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "CUSTOMER_NOT_FOUND_ERROR",
        "no customer with this id",
        Some("customer_id"),
    )
}

async fn post_customer(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.customer_request(&id, &headers, Some(&body), || s.update(&id, &body))
        .await
}

async fn get_customer(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    s.customer_request(&id, &headers, None, || s.show(&id))
        .await
}

async fn admin_stats(State(s): State<Arc<Shared>>) -> Json<Stats> {
    Json(s.stats())
}

async fn admin_journal(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Json<Vec<Value>> {
    Json(s.journal(&id))
}

async fn admin_faults(State(s): State<Arc<Shared>>) -> Json<Faults> {
    Json(s.live().faults.clone())
}

/// A change of faults: absent keys stay as they are; `"rate_limit": null` clears the limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsPatch {
    latency_ms: Option<u64>,
    fail_rate: Option<f64>,
    #[serde(default, deserialize_with = "present_or_null")]
    rate_limit: Option<Option<f64>>,
    not_found: Option<HashSet<String>>,
    reject_rate: Option<f64>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent key (`None`, by `default`).
fn present_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

// Read from bytes rather than `Json`, so that `curl -d` without a content type works too.
async fn admin_put_faults(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: FaultsPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, INVALID, &e.to_string(), None),
    };
    let mut faults = s.live().faults.clone();
    faults.latency_ms = patch.latency_ms.unwrap_or(faults.latency_ms);
    faults.fail_rate = patch.fail_rate.unwrap_or(faults.fail_rate);
    faults.rate_limit = patch.rate_limit.unwrap_or(faults.rate_limit);
    faults.not_found = patch.not_found.unwrap_or(faults.not_found);
    faults.reject_rate = patch.reject_rate.unwrap_or(faults.reject_rate);
    match s.set_faults(faults) {
        Ok(()) => admin_faults(State(s)).await.into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, INVALID, &e.to_string(), None),
    }
}

async fn admin_reset(State(s): State<Arc<Shared>>) -> StatusCode {
    s.reset();
    StatusCode::NO_CONTENT
}

/// `PATCH /_sandbox/customers/{id}`: overwrites fields of the sandbox's copy as if changed at
/// Imprint (top-level fields; `address` and `statuses` key by key). Not validated as an update
/// body is: Imprint's copy may hold what a partner could not send.
async fn admin_patch_customer(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let fields: serde_json::Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            let message = format!("the body must be a JSON object of customer fields: {e}");
            return error(StatusCode::BAD_REQUEST, INVALID, &message, None);
        }
    };
    if fields.contains_key("id") {
        return error(
            StatusCode::BAD_REQUEST,
            INVALID,
            "id cannot be changed",
            Some("id"),
        );
    }
    for name in ["address", "statuses"] {
        if fields
            .get(name)
            .is_some_and(|v| !v.is_object() && !v.is_null())
        {
            let message = format!("{name} must be a JSON object");
            return error(StatusCode::BAD_REQUEST, INVALID, &message, Some(name));
        }
    }
    match s.store.patch(&id, &fields, &now()) {
        Some(c) => {
            s.drift_injected.fetch_add(1, Ordering::Relaxed);
            Json(c).into_response()
        }
        None => not_found(),
    }
}

/// `DELETE /_sandbox/customers/{id}`: removes the customer as if deleted at Imprint; GET and
/// POST answer 404 from then on.
async fn admin_delete_customer(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if s.store.delete(&id) {
        s.drift_injected.fetch_add(1, Ordering::Relaxed);
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found()
    }
}
