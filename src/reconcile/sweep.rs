//! The continuous sweep inside `run` (`reconcile.interval_ms` > 0): every tick it takes the
//! customers least recently checked and checks them, so every customer is checked about once
//! per `reconcile.period_hours`. The order lives in the database (`checked_at`), so a restart
//! goes on where the walk stopped, and replicas share the walk instead of repeating it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{Reader, Reconciler};
use crate::config::{ReconcileSettings, Settings};
use crate::engine::Health;
use crate::imprint::Client;
use crate::outbox::reconcile::{ReconcileStore, Window};
use crate::traffic::Traffic;

/// How often the customer count (which sets the amount per tick) is read again.
const RECOUNT_EVERY: Duration = Duration::from_secs(30);
/// Ticks' worth of checks the sweep may owe before it drops the rest (and says the period is
/// too short for the share).
const MAX_OWED_TICKS: f64 = 4.0;

/// How many customers a tick takes.
#[derive(Debug, Clone)]
pub struct Pace {
    interval: Duration,
    period: Duration,
    fixed: u32,
    /// Customers owed to the period, carried from tick to tick (fractions included).
    owed: f64,
    warned: bool,
}

impl Pace {
    pub fn new(s: &ReconcileSettings) -> Self {
        Self {
            interval: Duration::from_millis(s.interval_ms),
            period: s.period(),
            fixed: s.customers_per_tick,
            owed: 0.0,
            warned: false,
        }
    }

    /// Customers to take now, `elapsed` after the last tick, with `customers` in all shared
    /// by `replicas`, and reads limited to `reads_per_second`. The amount follows the time
    /// that really passed, so slow ticks are caught up, up to what the share allows.
    pub fn next(
        &mut self,
        elapsed: Duration,
        customers: u64,
        replicas: u32,
        reads_per_second: f64,
    ) -> u32 {
        let cap = (reads_per_second * self.interval.as_secs_f64()).max(1.0);
        if self.fixed > 0 {
            return self.fixed;
        }
        self.owed += customers as f64 * elapsed.as_secs_f64()
            / self.period.as_secs_f64()
            / f64::from(replicas.max(1));
        if self.owed > cap * MAX_OWED_TICKS {
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    customers,
                    period_hours = self.period.as_secs_f64() / 3_600.0,
                    reads_per_second,
                    "reconcile.period_hours is too short for reconcile.max_share of the rate: a full pass takes longer than the period"
                );
            }
            self.owed = cap * MAX_OWED_TICKS;
        }
        let n = self.owed.floor().min(cap.ceil());
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a whole number of customers, at most one tick's reads; float-to-int `as` saturates"
        )]
        let customers = n as u32;
        self.owed -= n;
        customers
    }
}

/// Starts the sweep when `reconcile.interval_ms` is set; it stops with `stop`.
pub fn spawn(
    settings: &Settings,
    pool: PgPool,
    client: Client,
    traffic: Arc<Traffic>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let s = &settings.reconcile;
    if s.interval_ms == 0 {
        return None;
    }
    let reconciler = Arc::new(Reconciler {
        reader: Reader::new(settings, client, traffic),
        store: ReconcileStore::new(pool),
        repair: false,
    });
    tracing::info!(
        interval_ms = s.interval_ms,
        period_hours = s.period_hours,
        max_share = s.max_share,
        "reconciliation sweep on"
    );
    Some(tokio::spawn(run(reconciler, Pace::new(s), health, stop)))
}

async fn run(
    reconciler: Arc<Reconciler>,
    mut pace: Pace,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(pace.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut counted: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let elapsed = last.elapsed();
        last = Instant::now();
        let replicas =
            u32::try_from(health.replicas.load(Ordering::Relaxed).max(1)).unwrap_or(u32::MAX);
        reconciler.reader.set_replicas(replicas);
        // While the gate holds every request back, taking customers would only hold them; when
        // it lets a probe through, one customer is taken (the engine may have no row to probe
        // with, and the gate would stay shut for ever).
        let probe_only = match reconciler.reader.paused_for() {
            Some(wait) if !wait.is_zero() => continue,
            Some(_) => true,
            None => false,
        };
        let customers = match counted {
            Some((n, at)) if n > 0 && at.elapsed() < RECOUNT_EVERY => n,
            _ => match reconciler.store.customers().await {
                Ok(n) => {
                    counted = Some((n, Instant::now()));
                    n
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not count the customers; the sweep waits");
                    continue;
                }
            },
        };
        let mut n = pace.next(elapsed, customers, replicas, reconciler.reader.rate());
        if probe_only {
            n = n.min(1);
        }
        if n == 0 {
            continue;
        }
        let targets = match reconciler.store.take(n, Window::default()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "could not take customers to check; the sweep waits");
                continue;
            }
        };
        // A rejected key stops this tick's checks only; the gate then holds the sweep.
        let tick = stop.child_token();
        reconciler.check_all(targets, &tick).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(interval_ms: u64, period_hours: f64, fixed: u32) -> ReconcileSettings {
        ReconcileSettings {
            interval_ms,
            period_hours,
            customers_per_tick: fixed,
            max_share: 0.2,
        }
    }

    #[test]
    fn the_amount_per_tick_covers_every_customer_once_per_period() {
        // 3,600 customers over an hour at one tick a second: one per tick, 3,600 per period.
        let mut pace = Pace::new(&settings(1_000, 1.0, 0));
        let total: u32 = (0..3_600)
            .map(|_| pace.next(Duration::from_secs(1), 3_600, 1, 10.0))
            .sum();
        assert_eq!(total, 3_600);
        // Two replicas share the walk: half each.
        let mut pace = Pace::new(&settings(1_000, 1.0, 0));
        let total: u32 = (0..3_600)
            .map(|_| pace.next(Duration::from_secs(1), 3_600, 2, 10.0))
            .sum();
        assert_eq!(total, 1_800);
    }

    #[test]
    fn a_slow_tick_is_caught_up_but_never_beyond_the_share() {
        let mut pace = Pace::new(&settings(1_000, 1.0, 0));
        // Ten seconds passed since the last tick: ten customers are owed, the share allows 5
        // per tick: 5 now, 5 next.
        assert_eq!(pace.next(Duration::from_secs(10), 3_600, 1, 5.0), 5);
        assert_eq!(pace.next(Duration::ZERO, 3_600, 1, 5.0), 5);
        assert_eq!(pace.next(Duration::ZERO, 3_600, 1, 5.0), 0);
        // A period far too short: the debt is capped, not carried for ever.
        let mut pace = Pace::new(&settings(1_000, 0.001, 0));
        for _ in 0..100 {
            assert!(pace.next(Duration::from_secs(1), 1_000_000, 1, 5.0) <= 5);
        }
        assert!(pace.owed <= 5.0 * MAX_OWED_TICKS);
    }

    #[test]
    fn a_fixed_amount_wins_over_the_period() {
        let mut pace = Pace::new(&settings(1_000, 24.0, 7));
        assert_eq!(pace.next(Duration::from_secs(1), 10, 1, 1.0), 7);
    }
}
