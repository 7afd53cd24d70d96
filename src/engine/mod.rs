//! The engine: claim -> send -> record, until told to stop.
//!
//! One claimer claims batches while there is room in the window; each claimed row is worked
//! by a task of its own (at most `sync.concurrency` requests at once); outcomes flow to one
//! recorder that writes them back in batches. Rows move one way: outbox row -> profile
//! mapping -> request -> client -> answer -> record.

pub mod backoff;
pub mod fate;
mod maintenance;
mod recorder;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Settings;
use crate::imprint::Client;
use crate::labels::RowOutcome;
use crate::outbox::outcome::ErrorCode;
use crate::outbox::store::Store;
use crate::telemetry;
use crate::traffic::Traffic;

/// The engine's knobs, from `sync.*` and friends.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub batch_size: u32,
    pub concurrency: u32,
    pub poll_interval: Duration,
    pub lease: Duration,
    pub request_timeout: Duration,
    pub max_attempts: u32,
    pub max_claims: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub shutdown_grace: Duration,
    pub keep_sensitive: bool,
    pub synced_days: u32,
    pub attempts_days: u32,
    /// The deadline of one database call of the engine (see `db::call_deadline`).
    pub db_deadline: Duration,
}

impl EngineSettings {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            batch_size: s.sync.batch_size,
            concurrency: s.sync.concurrency,
            poll_interval: Duration::from_millis(s.sync.poll_interval_ms),
            lease: Duration::from_millis(s.sync.lease_ms),
            request_timeout: Duration::from_millis(s.api.timeout_ms),
            max_attempts: s.sync.max_attempts,
            max_claims: s.sync.max_claims,
            backoff_base: Duration::from_millis(s.sync.backoff_base_ms),
            backoff_max: Duration::from_millis(s.sync.backoff_max_ms),
            shutdown_grace: Duration::from_millis(s.sync.shutdown_grace_ms),
            keep_sensitive: s.privacy.store_sensitive_response_fields,
            synced_days: s.retention.synced_days,
            attempts_days: s.retention.attempts_days,
            db_deadline: crate::db::call_deadline(&s.database),
        }
    }
}

/// How the engine runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunMode {
    /// Stop once nothing is pending or in flight.
    pub once: bool,
}

/// What a run did (rows, by outcome). Also feeds `/readyz`.
#[derive(Debug, Default)]
pub struct RunStats {
    pub synced: AtomicU64,
    pub failed: AtomicU64,
    pub superseded: AtomicU64,
    pub retried: AtomicU64,
    pub rate_limited: AtomicU64,
    pub released: AtomicU64,
    /// The key was rejected at least once (401/403).
    pub auth_rejected: AtomicBool,
    /// The API answered with a redirect at least once (3xx: a wrong `api.base_url`).
    pub redirected: AtomicBool,
    /// `--once` found nothing left to do (rather than being stopped).
    pub drained: AtomicBool,
}

/// A plain copy of [`RunStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub synced: u64,
    pub failed: u64,
    pub superseded: u64,
    pub retried: u64,
    pub rate_limited: u64,
    pub auth_rejected: bool,
    pub redirected: bool,
    pub drained: bool,
}

impl RunStats {
    pub fn summary(&self) -> Summary {
        Summary {
            synced: self.synced.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            superseded: self.superseded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            auth_rejected: self.auth_rejected.load(Ordering::Relaxed),
            redirected: self.redirected.load(Ordering::Relaxed),
            drained: self.drained.load(Ordering::Relaxed),
        }
    }
}

/// Liveness and readiness, as the admin server reports them.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the loop's last tick.
    last_tick_ms: AtomicU64,
    /// The database answered the last statement.
    pub database_ok: AtomicBool,
    /// Live replicas, from the last heartbeat.
    pub replicas: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
            database_ok: AtomicBool::new(false),
            replicas: AtomicU64::new(1),
        }
    }
}

impl Health {
    pub fn tick(&self) {
        self.last_tick_ms
            .store(telemetry::ms(self.started.elapsed()), Ordering::Relaxed);
    }

    /// Time since the loop last ticked.
    pub fn since_tick(&self) -> Duration {
        let now = telemetry::ms(self.started.elapsed());
        Duration::from_millis(now.saturating_sub(self.last_tick_ms.load(Ordering::Relaxed)))
    }
}

/// Everything a worker task needs, shared.
pub(crate) struct Shared {
    pub store: Store,
    pub client: Client,
    pub traffic: Arc<Traffic>,
    pub settings: EngineSettings,
    pub stats: Arc<RunStats>,
    pub health: Arc<Health>,
    /// Requests in flight at once.
    pub send_slots: Semaphore,
    /// Stop claiming; workers not yet sending give their rows back.
    pub stop: CancellationToken,
    /// The grace is over: requests still in flight are cut off and their rows given back.
    pub hard_stop: CancellationToken,
    pub mode: RunMode,
    /// A claim took rows: the NOTIFY that woke it was a real insert, so the next one is
    /// passed on at once (see `maintenance::coalesce`).
    pub took_rows: Notify,
}

impl Shared {
    /// A database call of the engine, with its deadline: a black-holed connection is given
    /// up as a transient error instead of stalling the engine until the OS notices.
    pub async fn db<T>(&self, call: impl Future<Output = sqlx::Result<T>>) -> sqlx::Result<T> {
        crate::db::within(self.settings.db_deadline, call).await
    }
}

/// The sync engine of one process.
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    pub fn with_mode(
        pool: PgPool,
        client: Client,
        traffic: Arc<Traffic>,
        settings: EngineSettings,
        worker_id: String,
        mode: RunMode,
    ) -> Self {
        let concurrency = settings.concurrency as usize;
        Self {
            shared: Arc::new(Shared {
                store: Store::new(pool, worker_id).with_max_claims(settings.max_claims),
                client,
                traffic,
                settings,
                stats: Arc::default(),
                health: Arc::default(),
                send_slots: Semaphore::new(concurrency),
                stop: CancellationToken::new(),
                hard_stop: CancellationToken::new(),
                took_rows: Notify::new(),
                mode,
            }),
        }
    }

    pub fn health(&self) -> Arc<Health> {
        self.shared.health.clone()
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Runs until `shutdown` is cancelled (or, with `once`, until drained or the key is
    /// rejected). In-flight requests get `sync.shutdown_grace_ms` to finish; rows claimed but
    /// not sent go back to `pending`.
    pub async fn run(&self, shutdown: CancellationToken) -> Summary {
        let shared = &self.shared;
        let s = &shared.settings;
        // Room for a batch beyond the requests in flight, so the next batch is claimed while
        // the current one is still being sent.
        let window = Arc::new(Semaphore::new((s.concurrency + s.batch_size) as usize));
        let (tx, rx) = tokio::sync::mpsc::channel(window.available_permits());
        let wake = Arc::new(Notify::new());
        let tasks = TaskTracker::new();
        let background = CancellationToken::new();

        let recorder = tokio::spawn(recorder::run(shared.clone(), rx, wake.clone()));
        let maintenance = tokio::spawn(maintenance::run(
            shared.clone(),
            wake.clone(),
            background.clone(),
        ));

        // Stop claiming when asked to stop, or when --once decides it is done.
        let stop = shared.stop.clone();
        let forward = {
            let stop = stop.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                stop.cancel();
            })
        };

        // Stopped before it started (a signal while starting): claim nothing.
        if shutdown.is_cancelled() {
            stop.cancel();
        }
        claimer(shared, &window, &tx, &wake, &tasks).await;

        // Shutting down: workers not yet sending release their rows now; requests in flight
        // get the grace period, then are cut off and their rows released too.
        stop.cancel();
        tasks.close();
        if tokio::time::timeout(s.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = telemetry::ms(s.shutdown_grace),
                "requests still in flight after the shutdown grace; cutting them off"
            );
            shared.hard_stop.cancel();
            tasks.wait().await;
        }
        // Every worker is done: the recorder writes what it holds, or gives up if the
        // database is away, instead of holding the process.
        shared.hard_stop.cancel();
        drop(tx);
        let _ = recorder.await;
        background.cancel();
        let _ = maintenance.await;
        forward.abort();
        if let Err(e) = shared.store.leave().await {
            tracing::debug!(error = %e, "could not remove this worker from the live replicas");
        }
        shared.stats.summary()
    }
}

/// The claim loop: claims while there is room, waits for a wake-up when nothing is due.
async fn claimer(
    shared: &Arc<Shared>,
    window: &Arc<Semaphore>,
    tx: &tokio::sync::mpsc::Sender<worker::Done>,
    wake: &Notify,
    tasks: &TaskTracker,
) {
    let s = &shared.settings;
    let capacity = window.available_permits();
    let mut db_errors = backoff::Backoff::new("claiming due rows");
    loop {
        shared.health.tick();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        if shared.stop.is_cancelled() {
            return;
        }
        let in_hand = capacity - window.available_permits();
        // While the gate is shut, hold no more rows than a probe needs.
        let limit = match shared.traffic.paused_for() {
            Some(d) if !d.is_zero() => {
                wait(shared, wake, d.min(s.poll_interval)).await;
                continue;
            }
            Some(_) if in_hand > 0 => {
                wait(shared, wake, s.poll_interval).await;
                continue;
            }
            Some(_) => 1,
            None => (s.batch_size as usize).min(window.available_permits()),
        };
        // While the senders have plenty in hand, wait until half a batch of room is free:
        // a few large claims cost far less than many small ones.
        let low_water = (s.batch_size as usize / 2).max(1);
        if limit == 0 || (limit < low_water && in_hand >= s.concurrency as usize) {
            // At most half a batch: within u32, like `sync.batch_size`.
            let want = u32::try_from(low_water.min(capacity)).unwrap_or(s.batch_size);
            tokio::select! {
                _ = shared.stop.cancelled() => return,
                p = window.clone().acquire_many_owned(want) => drop(p),
                // Slow requests may hold the window for long: keep ticking (watchdog, /livez).
                _ = tokio::time::sleep(s.poll_interval) => {}
            }
            continue;
        }
        // At most `sync.batch_size`: within u32.
        let limit_n = u32::try_from(limit).unwrap_or(s.batch_size);
        let permits = window
            .clone()
            .try_acquire_many_owned(limit_n)
            .expect("limit is within the free permits");
        // A suspect row (claimed before, never written back) is taken only while this
        // process holds nothing else: if it kills the process, only it is blamed.
        let claim = match shared
            .db(shared.store.claim_batch(limit_n, s.lease, in_hand == 0))
            .await
        {
            Ok(c) => {
                db_errors.succeeded(&shared.health);
                metrics::counter!("imprint_sync_claims_total").increment(1);
                c
            }
            Err(e) => {
                drop(permits);
                if e.as_database_error()
                    .is_some_and(|d| d.is_unique_violation())
                {
                    // Another replica claimed a row of the same customer at the same moment;
                    // the unique index refused the second (G1). Just claim again.
                    continue;
                }
                if !crate::db::is_transient(&e) {
                    // Not an outage: a claim the database refused (or could not answer
                    // readably). Say so; the next claim starts over.
                    tracing::error!(error = %e, "claiming due rows failed; claiming again shortly");
                    wait(shared, wake, s.poll_interval).await;
                    continue;
                }
                let delay = db_errors.failed(&e, &shared.health);
                wait(shared, wake, delay).await;
                continue;
            }
        };
        // The lease's start as the database's clock has it (not when the answer arrived).
        let claimed_at = claim.lease_started;
        for (id, customer_id) in &claim.failed {
            shared.stats.failed.fetch_add(1, Ordering::Relaxed);
            RowOutcome::Failed.count(1);
            // Only an id that passed validation is logged (the partner writes it).
            let customer_id = if crate::profile::check_customer_id(customer_id).is_ok() {
                customer_id.as_str()
            } else {
                "-"
            };
            tracing::warn!(
                outbox_id = id,
                customer_id,
                "row set aside by the claim ({} or an unusable customer id); marked failed",
                ErrorCode::PoisonRow
            );
        }
        if claim.superseded > 0 {
            shared
                .stats
                .superseded
                .fetch_add(claim.superseded, Ordering::Relaxed);
            RowOutcome::Superseded.count(claim.superseded);
        }
        let got = claim.rows.len();
        if got > 0 {
            shared.took_rows.notify_one();
        }
        // A span per batch that holds rows (an idle poll makes none): each row's span is its
        // child, so a trace shows the batch and everything sent for it.
        let batch = if got > 0 {
            tracing::info_span!("batch", rows = got, lease_ms = telemetry::ms(s.lease))
        } else {
            tracing::Span::none()
        };
        let mut permits = permits;
        for row in claim.rows {
            let permit = permits.split(1).expect("one permit per claimed row");
            let job = worker::Job {
                row,
                claimed_at,
                permit,
            };
            tasks.spawn(worker::work(shared.clone(), job, tx.clone()).instrument(batch.clone()));
        }
        drop(permits);
        if got < limit && !claim.more {
            if shared.mode.once && drained(shared, window, capacity, wake).await {
                shared.stats.drained.store(true, Ordering::Relaxed);
                return;
            }
            if !shared.mode.once {
                wait(shared, wake, s.poll_interval).await;
            }
        }
    }
}

/// `--once`: whether the outbox is drained; if not, waits a little for what is left.
async fn drained(shared: &Shared, window: &Semaphore, capacity: usize, wake: &Notify) -> bool {
    if window.available_permits() < capacity {
        tracing::trace!(
            in_hand = capacity - window.available_permits(),
            "once: rows in hand"
        );
        // Our own rows are still being worked; their outcomes wake us.
        wait(shared, wake, Duration::from_millis(50)).await;
        return false;
    }
    let remaining = shared.db(shared.store.remaining()).await;
    tracing::trace!(?remaining, "once: what is left");
    match remaining {
        Ok(r) if r.is_empty() => true,
        Ok(r) => {
            // Due rows that could not be claimed wait for a customer's row in flight elsewhere:
            // no point asking again at once.
            let nap = r
                .next_due_in
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_millis(100))
                .clamp(Duration::from_millis(5), shared.settings.poll_interval);
            wait(shared, wake, nap).await;
            false
        }
        Err(_) => {
            wait(shared, wake, shared.settings.poll_interval).await;
            false
        }
    }
}

/// Sleeps until woken (NOTIFY, a freed slot), the timeout, or the stop.
async fn wait(shared: &Shared, wake: &Notify, timeout: Duration) {
    tokio::select! {
        _ = shared.stop.cancelled() => {}
        _ = wake.notified() => {}
        _ = tokio::time::sleep(timeout) => {}
    }
}

/// A process-unique worker id: host, pid and a random suffix.
pub fn worker_id() -> String {
    format!(
        "{}-{}-{:04x}",
        hostname(),
        std::process::id(),
        rand::random::<u16>()
    )
}

pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
