//! The admin server: `GET /livez`, `GET /readyz`, `GET /metrics` (Prometheus text) and
//! `GET /status` (the JSON of `imprint-sync status --json`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine::Health;
use crate::labels::{HttpClass, RowOutcome};
use crate::outbox::store::Store;
use crate::traffic::{GateState, Traffic};

/// How often the outbox gauges are refreshed (one cheap query) and histograms folded.
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// The outbox gauges count the backlog through partial indexes, so their read costs in
/// proportion to it (~0.1 s with 100,000 rows pending): after a read that took `t`, the
/// next waits `t` times this, which keeps it to about 2 % of one database backend...
const GAUGES_IDLE_PER_BUSY: u32 = 49;
/// ...but never longer than this: the alerts on the backlog stay at most this late.
const GAUGES_MAX_GAP: Duration = Duration::from_secs(30);

/// How long after a read of the outbox gauges that took `took` the next one starts: at the
/// next tick as a rule, later when the read is costly.
fn gauges_gap(took: Duration) -> Duration {
    took.saturating_mul(GAUGES_IDLE_PER_BUSY + 1)
        .min(GAUGES_MAX_GAP)
}

/// When the outbox gauges may be read next.
struct GaugesPace {
    next_read: tokio::time::Instant,
}

impl GaugesPace {
    fn new() -> Self {
        Self {
            next_read: tokio::time::Instant::now(),
        }
    }

    /// Runs `read` unless the last read's gap has not passed yet (then `None`).
    async fn read<T, E>(
        &mut self,
        read: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<Result<T, E>> {
        let started = tokio::time::Instant::now();
        if started < self.next_read {
            return None;
        }
        let result = read.await;
        // Whatever came of it: a read that failed late (`statement_timeout` on a large
        // backlog) cost as much as one that succeeded.
        self.next_read = started + gauges_gap(started.elapsed());
        Some(result)
    }
}

/// The process-wide Prometheus recorder (installed once; later calls share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let lag = [
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("imprint_sync_http_request_duration_seconds".into()),
                    &latency,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("imprint_sync_sync_lag_seconds".into()),
                        &lag,
                    )
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder (a test harness) may already be installed; ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            register();
            crate::reconcile::register_metrics();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "imprint_sync_rows_total",
        "Rows finished, by outcome (synced, failed, superseded, retried, invalid)."
    );
    describe_counter!(
        "imprint_sync_claims_total",
        "Claim statements run (empty ones too): wake-ups of the claimer."
    );
    describe_counter!(
        "imprint_sync_http_requests_total",
        "Requests to the API, by answer class (2xx, 4xx, 5xx, 429, timeout, error)."
    );
    describe_histogram!(
        "imprint_sync_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Duration of one request to the API."
    );
    describe_histogram!(
        "imprint_sync_sync_lag_seconds",
        metrics::Unit::Seconds,
        "From enqueued to synced, per synced row."
    );
    describe_gauge!("imprint_sync_outbox_pending", "Rows pending.");
    describe_gauge!(
        "imprint_sync_outbox_failed",
        "Rows failed (replay them with run --replay-failed)."
    );
    describe_gauge!(
        "imprint_sync_outbox_oldest_pending_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest pending row."
    );
    describe_gauge!(
        "imprint_sync_rate_limit_effective_rps",
        "The request rate this replica allows itself now."
    );
    describe_gauge!(
        "imprint_sync_circuit_open",
        "1 while the circuit breaker holds sending back."
    );
    describe_gauge!(
        "imprint_sync_auth_paused",
        "1 while sending is paused because the API key was rejected."
    );
    describe_gauge!(
        "imprint_sync_replicas_live",
        "Live replicas sharing the rate limit."
    );
    describe_gauge!(
        "imprint_sync_rate_limit_configured_rps",
        "rate_limit.requests_per_second: the rate for the whole deployment."
    );
    describe_gauge!(
        "imprint_sync_build_info",
        "Always 1; the version label says which build runs."
    );
    process_collector().describe();
}

/// CPU, memory and open file descriptors of this process (`process_*`), read at each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Makes the counters (each label value, at 0) and the histograms appear from the first
/// scrape: a series that is absent until its first event leaves `increase(...)` alerts and
/// dashboards empty instead of 0. The gauges are set by their first refresh.
fn register() {
    for outcome in RowOutcome::ALL {
        outcome.count(0);
    }
    for class in HttpClass::ALL {
        class.count(0);
    }
    metrics::counter!("imprint_sync_claims_total").increment(0);
    let _ = metrics::histogram!("imprint_sync_http_request_duration_seconds");
    let _ = metrics::histogram!("imprint_sync_sync_lag_seconds");
    metrics::gauge!("imprint_sync_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

#[derive(Clone)]
struct AppState {
    store: Store,
    health: Arc<Health>,
    traffic: Arc<Traffic>,
    metrics: PrometheusHandle,
    /// The loop must have ticked within this long to be live / ready.
    live_within: Duration,
    ready_within: Duration,
}

/// Starts the admin server on `admin.listen`, and the gauge refresher; both stop with
/// `shutdown`. Returns the bound address.
pub async fn spawn(
    settings: &Settings,
    store: Store,
    health: Arc<Health>,
    traffic: Arc<Traffic>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let addr = settings.admin_listen()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin server to {addr} (admin.listen)"))?;
    let bound = listener.local_addr()?;
    let poll = Duration::from_millis(settings.sync.poll_interval_ms);
    let state = AppState {
        store: store.clone(),
        health,
        traffic,
        metrics: metrics_handle(),
        ready_within: poll
            + Duration::from_millis(settings.api.timeout_ms)
            + Duration::from_secs(5),
        live_within: poll + Duration::from_millis(settings.sync.lease_ms) * 2,
    };
    // After metrics_handle(): a gauge set before the recorder is installed is lost.
    metrics::gauge!("imprint_sync_rate_limit_configured_rps")
        .set(settings.rate_limit.requests_per_second);
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .with_state(state.clone());
    tracing::info!(
        admin = %bound,
        "admin server listening (/livez, /readyz, /metrics, /status)"
    );
    let handle = tokio::spawn(async move {
        let gauges = tokio::spawn(refresh_gauges(store, state, shutdown.clone()));
        let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin server stopped");
        }
        gauges.abort();
    });
    Ok((bound, handle))
}

async fn livez(State(s): State<AppState>) -> Response {
    let since = s.health.since_tick();
    if since <= s.live_within {
        (StatusCode::OK, Json(json!({"status": "live"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "stuck", "reason": format!("the loop has not ticked for {} s", since.as_secs())})),
        )
            .into_response()
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    if !s.health.database_ok.load(Ordering::Relaxed) {
        reasons.push("the database does not answer".to_owned());
    }
    let since = s.health.since_tick();
    if since > s.ready_within {
        reasons.push(format!(
            "the loop has not ticked for {} ms",
            since.as_millis()
        ));
    }
    if let Some(reason) = s.traffic.pause_reason() {
        reasons.push(reason.to_owned());
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reasons": reasons})),
        )
            .into_response()
    }
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    process_collector().collect();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// What `imprint-sync status --json` prints; 503 naming the error when the database fails.
async fn status_json(State(s): State<AppState>) -> Response {
    match s.store.status().await {
        Ok(report) => (StatusCode::OK, Json(report)).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("reading the outbox status: {e}")})),
        )
            .into_response(),
    }
}

/// The outbox gauges, from one cheap query every few seconds, and the traffic gauges.
async fn refresh_gauges(store: Store, state: AppState, stop: CancellationToken) {
    let mut every = tokio::time::interval(GAUGES_EVERY);
    let mut pace = GaugesPace::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        // Histogram samples pile up in the recorder until they are folded into buckets:
        // fold them here, or memory grows with every request when nobody scrapes.
        state.metrics.run_upkeep();
        let gate = state.traffic.gate.state();
        metrics::gauge!("imprint_sync_circuit_open")
            .set(f64::from(u8::from(gate == GateState::CircuitOpen)));
        metrics::gauge!("imprint_sync_auth_paused")
            .set(f64::from(u8::from(gate == GateState::AuthPaused)));
        metrics::gauge!("imprint_sync_rate_limit_effective_rps")
            .set(state.traffic.rate.effective());
        match pace.read(store.gauges()).await {
            None => {}
            Some(Ok(g)) => {
                metrics::gauge!("imprint_sync_outbox_pending").set(g.pending as f64);
                metrics::gauge!("imprint_sync_outbox_failed").set(g.failed as f64);
                metrics::gauge!("imprint_sync_outbox_oldest_pending_age_seconds")
                    .set(g.oldest_pending_age_seconds.unwrap_or(0.0));
            }
            Some(Err(e)) => tracing::debug!(error = %e, "could not refresh the outbox gauges"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_costly_gauges_read_is_spaced_out_within_a_bound() {
        let ms = Duration::from_millis;
        assert!(
            gauges_gap(ms(2)) < GAUGES_EVERY,
            "a cheap read waits for the next tick"
        );
        assert_eq!(gauges_gap(ms(100)), ms(5_000), "2 % of a backend");
        assert_eq!(gauges_gap(Duration::from_secs(5)), GAUGES_MAX_GAP);
        assert_eq!(gauges_gap(Duration::MAX), GAUGES_MAX_GAP);
    }

    /// A read that fails after a long wait (`statement_timeout` on a huge backlog, a pool
    /// exhausted) costs as much as one that succeeds: it is spaced out all the same, or the
    /// daemon would spend a database backend on the gauges back to back (adversarial review).
    #[tokio::test(start_paused = true)]
    async fn a_costly_failed_gauges_read_is_spaced_out_too() {
        let mut pace = GaugesPace::new();
        let mut reads = 0;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < end {
            let slow_failure = async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Err::<(), &str>("canceling statement due to statement timeout")
            };
            if pace.read(slow_failure).await.is_some() {
                reads += 1;
            }
            tokio::time::sleep(GAUGES_EVERY).await;
        }
        assert!(reads <= 3, "{reads} reads of 5 s each in 60 s");
    }
}
