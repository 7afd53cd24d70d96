//! Every SQL statement that works the outbox. Times come from the database clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::dead_letters::{self, Binds, DeadLetter, MATCHES, PERSONAL};
use super::model::OutboxRow;

/// The outbox, seen by one worker process.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    worker_id: String,
    max_claims: u32,
}

pub use super::claim::Claim;

/// `sync.max_claims` when not configured: claims of a row without an outcome before it is
/// set aside as `poison_row`.
pub const DEFAULT_MAX_CLAIMS: u32 = 3;

/// The final or intermediate state a worked row is written back with.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// `synced`, with Imprint's view of the customer.
    Synced {
        imprint_updated_at: Option<DateTime<Utc>>,
        /// JSON texts, serialized once by the worker (no clones on the way to the database).
        statuses: Option<String>,
        /// None for an accepted answer that could not be read (`unverified_response`).
        response: Option<String>,
        drift: Option<String>,
        /// The request's columns (`UpdateCustomerRequest::fields`), merged into
        /// `customer_sync_state.accepted`.
        accepted: String,
    },
    /// Back to `pending`, due again after `delay`; `counts` says whether an attempt is spent.
    Retry { delay: Duration, counts: bool },
    /// `failed`: final until replayed.
    Failed { counts: bool },
    /// Back to `pending` untouched (claimed but never sent).
    Release,
}

/// One row's outcome, ready to write.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: i64,
    pub customer_id: String,
    pub disposition: Disposition,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    /// The claim this outcome belongs to (its `lease_expires_at`): a row rescued and claimed
    /// again since is a different claim, and this outcome is not written onto it.
    pub claim: Option<DateTime<Utc>>,
    /// A quiet period for the customer: the request may still be applied (a timeout, a
    /// broken connection), so nothing newer is sent before it has passed.
    pub hold: Option<Duration>,
    /// The HTTP attempts made for this outcome, for `sync_attempts`.
    pub attempts: Vec<AttemptLog>,
}

/// One HTTP attempt, as `sync_attempts` keeps it.
#[derive(Debug, Clone)]
pub struct AttemptLog {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub http_status: Option<u16>,
    pub outcome: super::outcome::AttemptOutcome,
    pub error_code: Option<String>,
    pub error: Option<String>,
}

/// A row whose write-back was applied (the lease was still ours).
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    pub id: i64,
    /// Enqueued -> now, for rows that became `synced`.
    pub lag_seconds: Option<f64>,
}

/// Counts of `replay_failed`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub replayed: u64,
}

/// The failed rows a replay takes (binds: [`dead_letters::MATCHES`]), locked.
fn replay_scope() -> String {
    format!(
        r#"
WITH back AS (
    SELECT o.id FROM imprint_sync.customer_outbox o
    WHERE o.sync_status = 'failed' AND {MATCHES}
    FOR UPDATE SKIP LOCKED
)"#
    )
}

/// The write-back of a batch of outcomes, guarded by the lease owner: a row whose lease was
/// lost (rescued by another worker) is left alone. The attempt log is written regardless.
const RECORD_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[], $5::int[],
                         $6::text[], $7::text[], $23::timestamptz[], $26::bigint[])
        AS t(id, status, attempt_inc, delay_ms, http_status, error_code, error, claim, hold_ms)
),
done AS (
    UPDATE imprint_sync.customer_outbox o
    SET sync_status = i.status,
        attempts = o.attempts + i.attempt_inc,
        next_attempt_at = CASE WHEN i.delay_ms IS NULL THEN o.next_attempt_at
                               ELSE now() + i.delay_ms * interval '1 millisecond' END,
        lease_expires_at = NULL,
        leased_by = NULL,
        last_http_status = COALESCE(i.http_status, o.last_http_status),
        last_error_code = CASE WHEN i.status = 'synced' THEN i.error_code
                               ELSE COALESCE(i.error_code, o.last_error_code) END,
        last_error = CASE WHEN i.status = 'synced' THEN i.error
                          ELSE COALESCE(i.error, o.last_error) END,
        synced_at = CASE WHEN i.status = 'synced' THEN now() ELSE o.synced_at END,
        -- An outcome came back: the row's claims did not die (see `poison_row`).
        claims = 0,
        updated_at = now()
    FROM input i
    WHERE o.id = i.id AND o.sync_status = 'in_flight' AND o.leased_by = $8
      AND o.lease_expires_at = i.claim
    RETURNING o.id, o.customer_id, o.sync_status, o.enqueued_at, i.claim, i.hold_ms
),
-- The quiet period (G2): after a timeout or a broken connection the request may still be
-- applied, so nothing newer is claimed for the customer before it has surely ended.
held AS (
    UPDATE imprint_sync.customer_claims c
    SET hold_until = GREATEST(c.hold_until, now() + d.hold_ms * interval '1 millisecond')
    FROM done d
    WHERE c.customer_id = d.customer_id AND d.hold_ms IS NOT NULL
),
state AS (
    INSERT INTO imprint_sync.customer_sync_state AS s
        (customer_id, last_synced_outbox_id, last_synced_at, imprint_updated_at, statuses,
         response, drift, accepted)
    SELECT d.customer_id, d.id, now(), x.imprint_updated_at, x.statuses::jsonb,
           x.response::jsonb, x.drift::jsonb, x.accepted::jsonb
    FROM unnest($9::bigint[], $10::timestamptz[], $11::text[], $12::text[], $13::text[],
                $24::timestamptz[], $25::text[])
        AS x(id, imprint_updated_at, statuses, response, drift, claim, accepted)
    JOIN done d ON d.id = x.id AND d.claim = x.claim
    -- Requests of a customer go one at a time (G1) and carry no column older than one already
    -- sent (G2), so each synced answer is the newest: a late row's answer too, whose columns
    -- no newer row had set.
    ON CONFLICT (customer_id) DO UPDATE
    SET last_synced_outbox_id = GREATEST(s.last_synced_outbox_id, EXCLUDED.last_synced_outbox_id),
        last_synced_at = EXCLUDED.last_synced_at,
        imprint_updated_at = EXCLUDED.imprint_updated_at,
        statuses = EXCLUDED.statuses,
        response = EXCLUDED.response,
        drift = EXCLUDED.drift,
        accepted = COALESCE(s.accepted, '{}'::jsonb) || EXCLUDED.accepted
),
log AS (
    INSERT INTO imprint_sync.sync_attempts
        (outbox_id, customer_id, attempt, started_at, duration_ms, http_status, outcome,
         error_code, error_message, worker_id)
    SELECT a.outbox_id, a.customer_id, a.attempt, a.started_at, a.duration_ms, a.http_status,
           a.outcome, a.error_code, a.error_message, $8
    FROM unnest($14::bigint[], $15::text[], $16::int[], $17::timestamptz[], $18::int[],
                $19::int[], $20::text[], $21::text[], $22::text[])
        AS a(outbox_id, customer_id, attempt, started_at, duration_ms, http_status, outcome,
             error_code, error_message)
)
SELECT id,
       CASE WHEN sync_status = 'synced'
            THEN extract(epoch FROM now() - enqueued_at)::float8 END AS lag_seconds
FROM done
"#;

impl Store {
    pub fn new(pool: PgPool, worker_id: impl Into<String>) -> Self {
        Self {
            pool,
            worker_id: worker_id.into(),
            max_claims: DEFAULT_MAX_CLAIMS,
        }
    }

    /// Claims of a row without an outcome before it is set aside (`sync.max_claims`).
    pub fn with_max_claims(mut self, max_claims: u32) -> Self {
        self.max_claims = max_claims.max(1);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Claims up to `limit` due rows under a lease of `lease` (see [`super::claim`]).
    pub async fn claim(&self, limit: u32, lease: Duration) -> sqlx::Result<Claim> {
        self.claim_batch(limit, lease, true).await
    }

    /// The claim; `suspects_ok` lets it take a suspect row (claimed before, never written
    /// back), alone: only when this process holds nothing else.
    pub async fn claim_batch(
        &self,
        limit: u32,
        lease: Duration,
        suspects_ok: bool,
    ) -> sqlx::Result<Claim> {
        let (claim, _) = super::claim::claim(
            &self.pool,
            &self.worker_id,
            limit,
            lease,
            self.max_claims,
            suspects_ok,
            false,
        )
        .await?;
        Ok(claim)
    }

    /// The claim, each statement also run under `EXPLAIN ANALYZE`: returns the claim and the
    /// work of its plans (rows produced and removed, times loops), for tests and the benchmark.
    pub async fn claim_measured(&self, limit: u32, lease: Duration) -> sqlx::Result<(Claim, f64)> {
        super::claim::claim(
            &self.pool,
            &self.worker_id,
            limit,
            lease,
            self.max_claims,
            true,
            true,
        )
        .await
    }

    /// Writes a batch of outcomes in one statement; returns the rows it applied to.
    pub async fn record(&self, records: &[Record]) -> sqlx::Result<Vec<Applied>> {
        let n = records.len();
        let mut ids = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut attempt_inc = Vec::with_capacity(n);
        let mut delay_ms: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut http_status: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut error_code: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut error: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut claims = Vec::with_capacity(n);
        let mut holds: Vec<Option<i64>> = Vec::with_capacity(n);
        let (mut s_ids, mut s_updated, mut s_statuses, mut s_response, mut s_drift) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut s_claims, mut s_accepted) = (vec![], vec![]);
        let (mut a_ids, mut a_customer, mut a_attempt, mut a_started, mut a_duration) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut a_status, mut a_outcome, mut a_code, mut a_message) =
            (vec![], vec![], vec![], vec![]);
        for r in records {
            let (status, inc, delay) = match &r.disposition {
                Disposition::Synced {
                    imprint_updated_at,
                    statuses,
                    response,
                    drift,
                    accepted,
                } => {
                    s_accepted.push(accepted.as_str());
                    s_ids.push(r.id);
                    s_updated.push(*imprint_updated_at);
                    s_statuses.push(statuses.as_deref());
                    s_response.push(response.as_deref());
                    s_drift.push(drift.as_deref());
                    s_claims.push(r.claim);
                    ("synced", 1, None)
                }
                Disposition::Retry { delay, counts } => (
                    "pending",
                    i32::from(*counts),
                    Some(delay.as_millis() as i64),
                ),
                Disposition::Failed { counts } => ("failed", i32::from(*counts), None),
                Disposition::Release => ("pending", 0, None),
            };
            ids.push(r.id);
            claims.push(r.claim);
            holds.push(
                r.hold
                    .map(|h| i64::try_from(h.as_millis()).unwrap_or(i64::MAX)),
            );
            statuses.push(status);
            attempt_inc.push(inc);
            delay_ms.push(delay);
            http_status.push(r.http_status.map(i32::from));
            error_code.push(r.error_code.as_deref());
            error.push(r.error.as_deref());
            for a in &r.attempts {
                a_ids.push(r.id);
                a_customer.push(r.customer_id.as_str());
                a_attempt.push(a.attempt);
                a_started.push(a.started_at);
                a_duration.push(a.duration.as_millis().min(i32::MAX as u128) as i32);
                a_status.push(a.http_status.map(i32::from));
                a_outcome.push(a.outcome.as_str());
                a_code.push(a.error_code.as_deref());
                a_message.push(a.error.as_deref());
            }
        }
        let rows = sqlx::query(RECORD_SQL)
            .bind(&ids)
            .bind(&statuses)
            .bind(&attempt_inc)
            .bind(&delay_ms)
            .bind(&http_status)
            .bind(&error_code)
            .bind(&error)
            .bind(&self.worker_id)
            .bind(&s_ids)
            .bind(&s_updated)
            .bind(&s_statuses)
            .bind(&s_response)
            .bind(&s_drift)
            .bind(&a_ids)
            .bind(&a_customer)
            .bind(&a_attempt)
            .bind(&a_started)
            .bind(&a_duration)
            .bind(&a_status)
            .bind(&a_outcome)
            .bind(&a_code)
            .bind(&a_message)
            .bind(&claims)
            .bind(&s_claims)
            .bind(&s_accepted)
            .bind(&holds)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Applied {
                    id: row.try_get("id")?,
                    lag_seconds: row.try_get("lag_seconds")?,
                })
            })
            .collect()
    }

    /// Puts rows whose lease expired (their worker died) back to `pending` (G4).
    pub async fn rescue_expired(&self) -> sqlx::Result<u64> {
        let done = sqlx::query(
            "UPDATE imprint_sync.customer_outbox
             SET sync_status = 'pending', lease_expires_at = NULL, leased_by = NULL,
                 updated_at = now()
             WHERE sync_status = 'in_flight' AND lease_expires_at < now()",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// `run --replay-failed`: the failed rows that match go back to `pending` (attempts and
    /// claims reset; `sync_attempts` keeps the history). The claim then merges a customer's
    /// rows per column (G3) and leaves out every column a newer row already sent (G2), so a
    /// replay never moves a field backwards, and an older failed row's e-mail change is not
    /// lost to a newer row that only changed the phone. Without filters, every failed row.
    pub async fn replay_failed(&self, filter: &Binds) -> sqlx::Result<Replay> {
        let scope = replay_scope();
        let sql = format!(
            r#"{scope}
UPDATE imprint_sync.customer_outbox o
SET sync_status = 'pending', attempts = 0, claims = 0, next_attempt_at = now(),
    updated_at = now()
FROM back b WHERE o.id = b.id
RETURNING o.id
"#
        );
        let ids: Vec<(i64,)> = dead_letters::bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
            .fetch_all(&self.pool)
            .await?;
        Ok(Replay {
            replayed: ids.len() as u64,
        })
    }

    /// `run --replay-failed --dry-run`: the rows [`Store::replay_failed`] would put back;
    /// changes nothing (the locks end with the statement).
    pub async fn replay_plan(&self, filter: &Binds) -> sqlx::Result<Vec<DeadLetter>> {
        let scope = replay_scope();
        let sql = format!(
            r#"{scope}
SELECT o.id, o.customer_id, COALESCE(o.last_error_code, 'unknown') AS error_code,
       o.last_error, o.last_http_status, o.attempts, o.updated_at, {PERSONAL}
FROM imprint_sync.customer_outbox o JOIN back b ON b.id = o.id
ORDER BY o.id
"#
        );
        dead_letters::bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
            .fetch_all(&self.pool)
            .await
    }

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
            in_flight: row.try_get::<i64, _>("in_flight")? as u64,
            next_due_in: row
                .try_get::<Option<f64>, _>("next_due_in")?
                // Not GREATEST(0, …) in SQL: it ignores NULL, and NULL means "none pending".
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        })
    }

    /// Due pending rows, newest per customer, read without locking (for `run --dry-run`).
    pub async fn peek_due(&self, limit: u32) -> sqlx::Result<(Vec<OutboxRow>, u64)> {
        let rows = sqlx::query(super::claim::peek_sql())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let total = match rows.first() {
            Some(r) => r.try_get::<i64, _>("due_total")? as u64,
            None => 0,
        };
        let rows = rows
            .iter()
            .map(super::claim::decode)
            .collect::<sqlx::Result<_>>()?;
        Ok((rows, total))
    }

    /// Retention: deletes up to `batch` finished rows and attempts older than their limits.
    /// Never touches `failed`, `pending` or `in_flight` rows. Returns rows deleted.
    pub async fn prune(
        &self,
        synced_days: u32,
        attempts_days: u32,
        batch: i64,
    ) -> sqlx::Result<u64> {
        let outbox = sqlx::query(
            "DELETE FROM imprint_sync.customer_outbox WHERE id IN (
                SELECT id FROM imprint_sync.customer_outbox
                WHERE sync_status IN ('synced', 'superseded')
                  AND updated_at < now() - $1 * interval '1 day'
                LIMIT $2)",
        )
        .bind(i64::from(synced_days))
        .bind(batch)
        .execute(&self.pool)
        .await?;
        let attempts = sqlx::query(
            "DELETE FROM imprint_sync.sync_attempts WHERE id IN (
                SELECT id FROM imprint_sync.sync_attempts
                WHERE started_at < now() - $1 * interval '1 day'
                LIMIT $2)",
        )
        .bind(i64::from(attempts_days))
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(outbox.rows_affected() + attempts.rows_affected())
    }
}

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

/// A live replica, as `status` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replica {
    pub worker_id: String,
    pub hostname: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
}

/// Seconds without a heartbeat after which a replica is dead (replicas beat every second).
pub const REPLICA_TTL_SECONDS: i64 = 6;

impl Store {
    /// Records this process as live, forgets dead ones, and returns how many are live.
    pub async fn heartbeat(&self, hostname: &str) -> sqlx::Result<u32> {
        let live: i64 = sqlx::query_scalar(
            "WITH me AS (
                INSERT INTO imprint_sync.workers (worker_id, hostname, version)
                VALUES ($1, $2, $3)
                ON CONFLICT (worker_id) DO UPDATE SET heartbeat_at = now()
             ),
             gone AS (
                DELETE FROM imprint_sync.workers
                WHERE heartbeat_at < now() - $4 * interval '1 second' AND worker_id <> $1
             )
             SELECT 1 + count(*) FROM imprint_sync.workers
             WHERE worker_id <> $1 AND heartbeat_at >= now() - $4 * interval '1 second'",
        )
        .bind(&self.worker_id)
        .bind(hostname)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(REPLICA_TTL_SECONDS)
        .fetch_one(&self.pool)
        .await?;
        Ok(live.clamp(1, i64::from(u32::MAX)) as u32)
    }

    /// Tells the other replicas that this one joined: they count the live replicas again.
    pub async fn announce(&self) -> sqlx::Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::engine::WORKERS_CHANNEL)
            .bind(&self.worker_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes this process from the live replicas (graceful stop), and tells the others.
    pub async fn leave(&self) -> sqlx::Result<()> {
        sqlx::query(
            "WITH gone AS (
                DELETE FROM imprint_sync.workers WHERE worker_id = $1 RETURNING 1
             )
             SELECT pg_notify($2, $1) FROM gone",
        )
        .bind(&self.worker_id)
        .bind(crate::engine::WORKERS_CHANNEL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// The outbox gauges for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
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
        let row = sqlx::query(
            "SELECT
               (SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'pending') AS pending,
               (SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'failed') AS failed,
               (SELECT extract(epoch FROM now() - min(enqueued_at))::float8
                  FROM imprint_sync.customer_outbox WHERE sync_status = 'pending') AS oldest",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Gauges {
            pending: row.try_get("pending")?,
            failed: row.try_get("failed")?,
            oldest_pending_age_seconds: row.try_get("oldest")?,
        })
    }

    /// Everything `status` prints.
    pub async fn status(&self) -> sqlx::Result<StatusReport> {
        let mut counts: std::collections::BTreeMap<String, i64> = super::model::SyncStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        let rows = sqlx::query(
            "SELECT sync_status, count(*) AS n FROM imprint_sync.customer_outbox GROUP BY sync_status",
        )
        .fetch_all(&self.pool)
        .await?;
        for r in rows {
            counts.insert(r.try_get("sync_status")?, r.try_get("n")?);
        }
        let failed = sqlx::query(
            "SELECT COALESCE(last_error_code, 'unknown') AS code, count(*) AS n
             FROM imprint_sync.customer_outbox WHERE sync_status = 'failed'
             GROUP BY 1 ORDER BY n DESC, code LIMIT 10",
        )
        .fetch_all(&self.pool)
        .await?;
        let failed_by_error_code = failed
            .iter()
            .map(|r| Ok((r.try_get("code")?, r.try_get("n")?)))
            .collect::<sqlx::Result<_>>()?;
        let last_synced_at: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(last_synced_at) FROM imprint_sync.customer_sync_state")
                .fetch_one(&self.pool)
                .await?;
        let replicas = sqlx::query(
            "SELECT worker_id, hostname, version, started_at, heartbeat_at FROM imprint_sync.workers
             WHERE heartbeat_at >= now() - $1 * interval '1 second' ORDER BY started_at",
        )
        .bind(REPLICA_TTL_SECONDS)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(Replica {
                worker_id: r.try_get("worker_id")?,
                hostname: r.try_get("hostname")?,
                version: r.try_get("version")?,
                started_at: r.try_get("started_at")?,
                heartbeat_at: r.try_get("heartbeat_at")?,
            })
        })
        .collect::<sqlx::Result<_>>()?;
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
