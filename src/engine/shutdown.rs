//! Stopping and waiting: signals, and the backoff used while the database is away.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use super::Health;

/// The process's stop: cancelled by the first SIGTERM or SIGINT.
static STOP: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();

/// Installs the SIGTERM/SIGINT handling of the process, once (later calls return the same
/// token): the first signal cancels the token, a second exits at once with 130. Call it first
/// thing, inside a runtime: until it runs, a SIGTERM kills the process by the signal (143),
/// which a Job reads as neither done nor "run again". The handlers are registered before this
/// returns, so a signal that comes while the configuration loads is not lost.
pub fn install() -> CancellationToken {
    STOP.get_or_init(|| {
        use tokio::signal::unix::{SignalKind, signal};
        let token = CancellationToken::new();
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let stop = token.clone();
        tokio::spawn(async move {
            let mut next = async || {
                tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                }
            };
            let first = next().await;
            tracing::info!(
                signal = first,
                "stopping: no new rows are claimed; in-flight requests may finish"
            );
            stop.cancel();
            let second = next().await;
            tracing::warn!(
                signal = second,
                "second signal: exiting at once (claimed rows are rescued when their lease expires)"
            );
            std::process::exit(130);
        });
        token
    })
    .clone()
}

/// Cancels `token` on the first SIGTERM or SIGINT (at once if one already came); a second
/// signal exits at once.
pub fn on_signals(token: CancellationToken) {
    let process = install();
    if process.is_cancelled() {
        token.cancel();
        return;
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = process.cancelled() => token.cancel(),
            _ = token.cancelled() => {}
        }
    });
}

/// Waiting out a database that went away: growing, jittered delays (backon), one log line
/// per interval rather than one per try, and a line when it is back.
pub struct Backoff {
    what: &'static str,
    builder: ExponentialBuilder,
    delays: Option<backon::ExponentialBackoff>,
    last_log: Option<Instant>,
    failures: u64,
}

/// How often a continuing outage is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Backoff {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            builder: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
            delays: None,
            last_log: None,
            failures: 0,
        }
    }

    /// A failure: logs (at most once per interval) and returns how long to wait.
    pub fn failed(&mut self, error: &sqlx::Error, health: &Health) -> Duration {
        health
            .database_ok
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.failures += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::error!(
                error = %error,
                failures = self.failures,
                "database unavailable while {}; retrying with backoff",
                self.what
            );
            self.last_log = Some(Instant::now());
        }
        let builder = self.builder;
        self.delays
            .get_or_insert_with(|| builder.build())
            .next()
            .unwrap_or(Duration::from_secs(5))
    }

    /// A success: resets the delays; says so when an outage ends.
    pub fn succeeded(&mut self, health: &Health) {
        health
            .database_ok
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if self.failures > 0 {
            tracing::info!(
                failures = self.failures,
                "database available again while {}",
                self.what
            );
        }
        self.failures = 0;
        self.delays = None;
        self.last_log = None;
    }
}
