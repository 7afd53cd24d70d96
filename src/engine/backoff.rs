//! The backoff used while the database is away.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

use super::Health;

/// The target these log lines have always had (this was `engine::shutdown`): log filters
/// and queries name it.
const TARGET: &str = "imprint_sync::engine::shutdown";

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
                target: TARGET,
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
                target: TARGET,
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
