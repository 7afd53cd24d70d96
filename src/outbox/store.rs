//! Every SQL statement that works the outbox. Times come from the database clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::dead_letters::{self, Binds, DeadLetter, MATCHES};
use super::model::OutboxRow;

/// The outbox, seen by one worker process.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    worker_id: String,
}

/// What one claim did.
#[derive(Debug, Default)]
pub struct Claim {
    /// Rows now `in_flight` under this worker's lease; one per customer at most.
    pub rows: Vec<OutboxRow>,
    /// Older rows of the same customers retired as `superseded` without a request.
    pub superseded: u64,
}

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
    pub outcome: &'static str,
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
    pub superseded: u64,
}

const ROW_COLUMNS: &str = "id, customer_id, email, phone, first_name, last_name, \
    preferred_language, street_line1, street_line2, city, state, postal_code, country, \
    account_tenure, ltv_amount, ltv_currency, loyalty_tier, account_created_at, \
    transaction_count, metadata, enqueued_at, attempts, lease_expires_at";

/// Which rows a replay touches (binds: [`dead_letters::MATCHES`]): `back`, the newest failed
/// row of each customer, when it matches and no newer row exists; `gone`, the other matching
/// failed rows of a customer whose newest row is not a failed row left out by the filter,
/// with that newest row as `head`.
fn replay_scope() -> String {
    format!(
        r#"
WITH failed AS (
    SELECT o.id, o.customer_id FROM imprint_sync.customer_outbox o
    WHERE o.sync_status = 'failed' AND {MATCHES}
    FOR UPDATE SKIP LOCKED
),
head AS (
    SELECT f.customer_id, n.id, n.sync_status
    FROM (SELECT DISTINCT customer_id FROM failed) f
    CROSS JOIN LATERAL (
        SELECT o.id, o.sync_status FROM imprint_sync.customer_outbox o
        WHERE o.customer_id = f.customer_id
          AND o.sync_status IN ('failed', 'pending', 'in_flight', 'synced')
        ORDER BY o.id DESC LIMIT 1) n
),
back AS (
    SELECT h.id FROM head h JOIN failed f ON f.id = h.id
),
gone AS (
    SELECT f.id, h.id AS head FROM failed f JOIN head h ON h.customer_id = f.customer_id
    WHERE f.id <> h.id AND (h.sync_status <> 'failed' OR h.id IN (SELECT id FROM back))
)"#
    )
}

/// The claim (G1, G2, G3, G6): due rows, oldest first, locked with SKIP LOCKED; per
/// customer only the newest pending row is taken, and only when no row of that customer is
/// in flight anywhere; older pending rows, and a newest row at or below the customer's last
/// synced row, become `superseded`. One statement; it commits before any HTTP call.
const CLAIM_SQL: &str = r#"
WITH cand AS (
    SELECT id, customer_id
    FROM imprint_sync.customer_outbox
    WHERE sync_status = 'pending' AND next_attempt_at <= now()
      -- Customers with a row in flight wait; they must not fill the window (G1).
      AND NOT EXISTS (SELECT 1 FROM imprint_sync.customer_outbox f
                       WHERE f.customer_id = customer_outbox.customer_id
                         AND f.sync_status = 'in_flight')
    ORDER BY next_attempt_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
newest AS (
    SELECT c.customer_id,
           (SELECT max(o.id) FROM imprint_sync.customer_outbox o
             WHERE o.customer_id = c.customer_id AND o.sync_status = 'pending') AS id,
           COALESCE((SELECT s.last_synced_outbox_id FROM imprint_sync.customer_sync_state s
                      WHERE s.customer_id = c.customer_id), 0) AS last_synced
    FROM (SELECT DISTINCT customer_id FROM cand) c
    WHERE NOT EXISTS (SELECT 1 FROM imprint_sync.customer_outbox f
                       WHERE f.customer_id = c.customer_id AND f.sync_status = 'in_flight')
),
-- `= ANY(ARRAY(...))` keeps these look-ups on the indexes whatever the planner guesses
-- of the CTEs' sizes (a hash join would scan the whole history).
target AS (
    SELECT o.id, o.customer_id, o.next_attempt_at <= now() AS due, n.last_synced
    FROM imprint_sync.customer_outbox o
    JOIN newest n ON o.id = n.id
    WHERE o.id = ANY(ARRAY(SELECT id FROM newest WHERE id IS NOT NULL))
      AND o.sync_status = 'pending'
    FOR UPDATE OF o SKIP LOCKED
),
older AS (
    SELECT o.id, GREATEST(t.id, t.last_synced) AS by
    FROM imprint_sync.customer_outbox o
    JOIN target t ON o.customer_id = t.customer_id
    WHERE o.sync_status = 'pending' AND o.id < t.id
    FOR UPDATE OF o SKIP LOCKED
),
retire AS (
    SELECT id, by FROM older
    UNION ALL
    SELECT id, last_synced FROM target WHERE id <= last_synced
),
superseded AS (
    UPDATE imprint_sync.customer_outbox o
    SET sync_status = 'superseded', superseded_by = r.by, updated_at = now()
    FROM retire r
    WHERE o.id = r.id
    RETURNING o.id
),
claimed AS (
    UPDATE imprint_sync.customer_outbox o
    SET sync_status = 'in_flight',
        lease_expires_at = now() + $2 * interval '1 millisecond',
        leased_by = $3,
        updated_at = now()
    FROM target t
    WHERE o.id = t.id AND t.due AND t.id > t.last_synced
    RETURNING o.*
)
SELECT s.n AS superseded_count, c.*
FROM (SELECT count(*) AS n FROM superseded) s
LEFT JOIN claimed c ON true
"#;

/// The write-back of a batch of outcomes, guarded by the lease owner: a row whose lease was
/// lost (rescued by another worker) is left alone. The attempt log is written regardless.
const RECORD_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[], $5::int[],
                         $6::text[], $7::text[], $23::timestamptz[])
        AS t(id, status, attempt_inc, delay_ms, http_status, error_code, error, claim)
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
        updated_at = now()
    FROM input i
    WHERE o.id = i.id AND o.sync_status = 'in_flight' AND o.leased_by = $8
      AND o.lease_expires_at = i.claim
    RETURNING o.id, o.customer_id, o.sync_status, o.enqueued_at, i.claim
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
    ON CONFLICT (customer_id) DO UPDATE
    SET last_synced_outbox_id = EXCLUDED.last_synced_outbox_id,
        last_synced_at = EXCLUDED.last_synced_at,
        imprint_updated_at = EXCLUDED.imprint_updated_at,
        statuses = EXCLUDED.statuses,
        response = EXCLUDED.response,
        drift = EXCLUDED.drift,
        accepted = COALESCE(s.accepted, '{}'::jsonb) || EXCLUDED.accepted
    WHERE s.last_synced_outbox_id < EXCLUDED.last_synced_outbox_id
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
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Claims up to `limit` due rows under a lease of `lease`.
    pub async fn claim(&self, limit: u32, lease: Duration) -> sqlx::Result<Claim> {
        let rows = sqlx::query(CLAIM_SQL)
            .bind(i64::from(limit))
            .bind(lease.as_millis() as i64)
            .bind(&self.worker_id)
            .fetch_all(&self.pool)
            .await?;
        let mut claim = Claim::default();
        for row in rows {
            claim.superseded = row.try_get::<i64, _>("superseded_count")? as u64;
            if row.try_get::<Option<i64>, _>("id")?.is_some() {
                claim.rows.push(row_from(&row)?);
            }
        }
        Ok(claim)
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
                a_outcome.push(a.outcome);
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

    /// `run --replay-failed`: per customer, the newest failed row goes back to `pending`
    /// (attempts reset) unless a newer row of that customer exists; every other failed row of
    /// that customer becomes `superseded`. `sync_attempts` keeps the history. With filters,
    /// only the failed rows that match take part, and a customer whose newest row is a
    /// failed row outside the filter is left alone (that row decides what is sent next).
    pub async fn replay_failed(&self, filter: &Binds) -> sqlx::Result<Replay> {
        let scope = replay_scope();
        let sql = format!(
            r#"{scope},
replayed AS (
    UPDATE imprint_sync.customer_outbox o
    SET sync_status = 'pending', attempts = 0, next_attempt_at = now(), updated_at = now()
    FROM back b WHERE o.id = b.id
    RETURNING o.id
),
superseded AS (
    UPDATE imprint_sync.customer_outbox o
    SET sync_status = 'superseded', superseded_by = g.head, updated_at = now()
    FROM gone g WHERE o.id = g.id
    RETURNING o.id
)
SELECT (SELECT count(*) FROM replayed) AS replayed, (SELECT count(*) FROM superseded) AS superseded
"#
        );
        let (replayed, superseded): (i64, i64) =
            dead_letters::bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
                .fetch_one(&self.pool)
                .await?;
        Ok(Replay {
            replayed: replayed as u64,
            superseded: superseded as u64,
        })
    }

    /// `run --replay-failed --dry-run`: the rows [`Store::replay_failed`] would put back, and
    /// how many it would supersede; changes nothing.
    pub async fn replay_plan(&self, filter: &Binds) -> sqlx::Result<(Vec<DeadLetter>, u64)> {
        let scope = replay_scope();
        let sql = format!(
            r#"{scope}
SELECT o.id, o.customer_id, COALESCE(o.last_error_code, 'unknown') AS error_code,
       o.last_error, o.last_http_status, o.attempts, o.updated_at,
       (SELECT count(*) FROM gone) AS superseded
FROM imprint_sync.customer_outbox o JOIN back b ON b.id = o.id
ORDER BY o.id
"#
        );
        #[derive(sqlx::FromRow)]
        struct Planned {
            #[sqlx(flatten)]
            row: DeadLetter,
            superseded: i64,
        }
        let rows: Vec<Planned> =
            dead_letters::bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
                .fetch_all(&self.pool)
                .await?;
        let superseded = match rows.first() {
            Some(p) => p.superseded as u64,
            None => {
                let sql = format!("{scope} SELECT count(*) FROM gone");
                let (n,): (i64,) =
                    dead_letters::bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)), filter)
                        .fetch_one(&self.pool)
                        .await?;
                n as u64
            }
        };
        Ok((rows.into_iter().map(|p| p.row).collect(), superseded))
    }

    /// Whether anything is left for `run --once`: rows pending or in flight, and how long
    /// until the next pending row comes due (zero when one is due now).
    pub async fn remaining(&self) -> sqlx::Result<Remaining> {
        let row = sqlx::query(
            "SELECT
               (SELECT count(*) FROM imprint_sync.customer_outbox WHERE sync_status = 'in_flight') AS in_flight,
               (SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
                  FROM imprint_sync.customer_outbox WHERE sync_status = 'pending') AS next_due_in",
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
        let sql = format!(
            "WITH due AS (
                SELECT * FROM imprint_sync.customer_outbox
                WHERE sync_status = 'pending' AND next_attempt_at <= now()
             )
             SELECT {ROW_COLUMNS}, (SELECT count(*) FROM due) AS due_total
             FROM (SELECT DISTINCT ON (customer_id) * FROM due ORDER BY customer_id, id DESC) d
             ORDER BY id
             LIMIT $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let total = match rows.first() {
            Some(r) => r.try_get::<i64, _>("due_total")? as u64,
            None => 0,
        };
        let rows = rows.iter().map(row_from).collect::<sqlx::Result<_>>()?;
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

fn row_from(row: &sqlx::postgres::PgRow) -> sqlx::Result<OutboxRow> {
    Ok(OutboxRow {
        id: row.try_get("id")?,
        customer_id: row.try_get("customer_id")?,
        email: row.try_get("email")?,
        phone: row.try_get("phone")?,
        first_name: row.try_get("first_name")?,
        last_name: row.try_get("last_name")?,
        preferred_language: row.try_get("preferred_language")?,
        street_line1: row.try_get("street_line1")?,
        street_line2: row.try_get("street_line2")?,
        city: row.try_get("city")?,
        state: row.try_get("state")?,
        postal_code: row.try_get("postal_code")?,
        country: row.try_get("country")?,
        account_tenure: row.try_get("account_tenure")?,
        ltv_amount: row.try_get("ltv_amount")?,
        ltv_currency: row.try_get("ltv_currency")?,
        loyalty_tier: row.try_get("loyalty_tier")?,
        account_created_at: row.try_get("account_created_at")?,
        transaction_count: row.try_get("transaction_count")?,
        metadata: row.try_get("metadata")?,
        enqueued_at: row.try_get("enqueued_at")?,
        attempts: row.try_get("attempts")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
    })
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
