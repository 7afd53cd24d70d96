//! What the outbox looks like from outside: `/metrics` gauges, `status`, and what `run --once`
//! still waits for.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::replicas::{REPLICA_TTL_SECONDS, Replica};
use super::store::Store;

/// What `run --once` still waits for.
#[derive(Debug, Clone, Copy)]
pub struct Remaining {
    pub in_flight: u64,
    /// `None` when no row is pending.
    pub next_due_in: Option<Duration>,
}

impl Remaining {
    pub fn is_empty(&self) -> bool {
        self.in_flight == 0 && self.next_due_in.is_none()
    }
}

/// The outbox gauges for `/metrics`.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub struct Gauges {
    pub pending: i64,
    pub failed: i64,
    pub oldest_pending_age_seconds: Option<f64>,
}

/// What `imprint-sync status` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusReport {
    pub counts: std::collections::BTreeMap<String, i64>,
    pub oldest_pending_age_seconds: Option<f64>,
    pub failed_by_error_code: std::collections::BTreeMap<String, i64>,
    pub last_synced_at: Option<DateTime<Utc>>,
    pub replicas: Vec<Replica>,
    /// Reconciliation: the last pass, customers verified in the period, drifted and missing now.
    pub reconcile: super::reconcile::ReconcileStatus,
}

impl Store {
    /// Pending and failed counts and the oldest pending age; each read through a partial
    /// index, so the cost follows the backlog, not the history.
    pub async fn gauges(&self) -> sqlx::Result<Gauges> {
        sqlx::query_as(
            "SELECT
               (SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'pending') AS pending,
               (SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'failed') AS failed,
               (SELECT extract(epoch FROM now() - min(enqueued_at))::float8
                  FROM imprint_sync.customer_outbox WHERE sync_status = 'pending')
                 AS oldest_pending_age_seconds",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Everything `status` prints.
    pub async fn status(&self) -> sqlx::Result<StatusReport> {
        let mut counts: std::collections::BTreeMap<String, i64> = super::model::SyncStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT sync_status, count(*) FROM imprint_sync.customer_outbox GROUP BY sync_status",
        )
        .fetch_all(&self.pool)
        .await?;
        counts.extend(rows);
        let failed_by_error_code = sqlx::query_as::<_, (String, i64)>(
            "SELECT COALESCE(last_error_code, 'unknown') AS code, count(*) AS n
             FROM imprint_sync.customer_outbox WHERE sync_status = 'failed'
             GROUP BY 1 ORDER BY n DESC, code LIMIT 10",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let last_synced_at: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(last_synced_at) FROM imprint_sync.customer_sync_state")
                .fetch_one(&self.pool)
                .await?;
        let replicas: Vec<Replica> = sqlx::query_as(
            "SELECT worker_id, hostname, version, started_at, heartbeat_at FROM imprint_sync.workers
             WHERE heartbeat_at >= now() - $1 * interval '1 second' ORDER BY started_at",
        )
        .bind(REPLICA_TTL_SECONDS)
        .fetch_all(&self.pool)
        .await?;
        Ok(StatusReport {
            counts,
            oldest_pending_age_seconds: self.gauges().await?.oldest_pending_age_seconds,
            failed_by_error_code,
            last_synced_at,
            replicas,
            reconcile: super::reconcile::ReconcileStore::new(self.pool.clone())
                .status(super::reconcile::DEFAULT_PERIOD)
                .await?,
        })
    }
}

impl Store {
    /// Whether anything is left for `run --once`: rows pending or in flight, and how long
    /// until the next pending row comes due (zero when one is due now).
    pub async fn remaining(&self) -> sqlx::Result<Remaining> {
        let row = sqlx::query(
            "SELECT
               (SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'in_flight') AS in_flight,
               (SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
                  FROM imprint_sync.customer_outbox
                  -- (IS NOT NULL: the due index's predicate; min() skips NULLs anyway)
                  WHERE sync_status = 'pending' AND next_attempt_at IS NOT NULL) AS next_due_in",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Remaining {
            in_flight: u64::try_from(row.try_get::<i64, _>("in_flight")?).unwrap_or(0),
            next_due_in: row
                .try_get::<Option<f64>, _>("next_due_in")?
                // Not GREATEST(0, …) in SQL: it ignores NULL, and NULL means "none pending".
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }
}
