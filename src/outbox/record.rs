//! The write-back: each worked row's outcome, its customer's sync state and the attempt log,
//! in one statement per batch, guarded by the lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::FromRow;

use super::plan::Query;
use super::store::Store;

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
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct Applied {
    pub id: i64,
    /// Enqueued -> now, for rows that became `synced`.
    pub lag_seconds: Option<f64>,
}

/// The write-back of a batch of outcomes, guarded by the lease owner: a row whose lease was
/// lost (rescued by another worker) is left alone. The attempt log is written regardless.
/// Every step is driven by the batch: the outbox rows by primary key, the sync state from
/// the written rows themselves (its columns travel with them), never a join of one batch-sized
/// set against another.
const RECORD_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::bigint[], $5::int[],
                         $6::text[], $7::text[], $9::timestamptz[], $10::bigint[],
                         $11::timestamptz[], $12::text[], $13::text[], $14::text[], $15::text[])
        AS t(id, status, attempt_inc, delay_ms, http_status, error_code, error, claim, hold_ms,
             imprint_updated_at, statuses, response, drift, accepted)
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
    -- `IS NOT DISTINCT FROM` (the same as `=` here: the column is NOT NULL) implies no
    -- partial index's predicate: the rows are found by primary key from the batch, never by
    -- reading the index of the rows in flight, whose size the statistics may get wrong.
    WHERE o.id = i.id AND o.sync_status IS NOT DISTINCT FROM 'in_flight'
      AND o.leased_by = $8 AND o.lease_expires_at = i.claim
    RETURNING o.id, o.customer_id, o.sync_status, o.enqueued_at, i.hold_ms,
              i.imprint_updated_at, i.statuses, i.response, i.drift, i.accepted
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
    SELECT d.customer_id, d.id, now(), d.imprint_updated_at, d.statuses::jsonb,
           d.response::jsonb, d.drift::jsonb, d.accepted::jsonb
    FROM done d
    WHERE d.sync_status = 'synced'
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
    FROM unnest($16::bigint[], $17::text[], $18::int[], $19::timestamptz[], $20::int[],
                $21::int[], $22::text[], $23::text[], $24::text[])
        AS a(outbox_id, customer_id, attempt, started_at, duration_ms, http_status, outcome,
             error_code, error_message)
),
-- The write-back commits without waiting for its WAL to reach disk (flushed within
-- 3 x wal_writer_delay). A database crash in that window loses the outcome, never the row:
-- it is still in flight under its lease, is rescued when the lease expires and sent again,
-- an idempotent update (docs/design.md, "Durability of the write-back"). Not so a quiet
-- period: lost, it would end with the lease, up to api.timeout_ms too early (G2); a batch
-- that starts one waits for the disk. One row whatever the batch, so no row is dropped;
-- MATERIALIZED, so it is worked out once, not once per written row over every written row.
quick_commit AS MATERIALIZED (
    SELECT CASE WHEN bool_or(h.hold_ms IS NOT NULL) IS NOT TRUE
                THEN set_config('synchronous_commit', 'off', true) END
    FROM done h
)
SELECT d.id,
       CASE WHEN d.sync_status = 'synced'
            THEN extract(epoch FROM now() - d.enqueued_at)::float8 END AS lag_seconds
FROM done d CROSS JOIN quick_commit
"#;

/// A batch of outcomes as the write-back's columns, one array per bound parameter (`$n` in
/// [`RECORD_SQL`]): the outbox rows, the sync state of the synced ones, the attempt log.
#[derive(Default)]
struct Columns<'a> {
    // The outbox rows.
    id: Vec<i64>,
    status: Vec<&'static str>,
    attempt_inc: Vec<i32>,
    delay_ms: Vec<Option<i64>>,
    http_status: Vec<Option<i32>>,
    error_code: Vec<Option<&'a str>>,
    error: Vec<Option<&'a str>>,
    claim: Vec<Option<DateTime<Utc>>>,
    hold_ms: Vec<Option<i64>>,
    // The synced rows' sync state, row for row with the above (NULL for the others).
    imprint_updated_at: Vec<Option<DateTime<Utc>>>,
    statuses: Vec<Option<&'a str>>,
    response: Vec<Option<&'a str>>,
    drift: Vec<Option<&'a str>>,
    accepted: Vec<Option<&'a str>>,
    // The attempt log.
    log_id: Vec<i64>,
    log_customer: Vec<&'a str>,
    log_attempt: Vec<i32>,
    log_started: Vec<DateTime<Utc>>,
    log_duration_ms: Vec<i32>,
    log_http_status: Vec<Option<i32>>,
    log_outcome: Vec<&'static str>,
    log_error_code: Vec<Option<&'a str>>,
    log_error: Vec<Option<&'a str>>,
}

/// Milliseconds, saturated to what a `bigint` holds.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<'a> Columns<'a> {
    fn of(records: &'a [Record]) -> Self {
        let mut c = Columns::default();
        for r in records {
            let (status, inc, delay) = match &r.disposition {
                Disposition::Synced {
                    imprint_updated_at,
                    statuses,
                    response,
                    drift,
                    accepted,
                } => {
                    c.imprint_updated_at.push(*imprint_updated_at);
                    c.statuses.push(statuses.as_deref());
                    c.response.push(response.as_deref());
                    c.drift.push(drift.as_deref());
                    c.accepted.push(Some(accepted.as_str()));
                    ("synced", 1, None)
                }
                Disposition::Retry { delay, counts } => {
                    ("pending", i32::from(*counts), Some(millis(*delay)))
                }
                Disposition::Failed { counts } => ("failed", i32::from(*counts), None),
                Disposition::Release => ("pending", 0, None),
            };
            if status != "synced" {
                c.imprint_updated_at.push(None);
                c.statuses.push(None);
                c.response.push(None);
                c.drift.push(None);
                c.accepted.push(None);
            }
            c.id.push(r.id);
            c.status.push(status);
            c.attempt_inc.push(inc);
            c.delay_ms.push(delay);
            c.http_status.push(r.http_status.map(i32::from));
            c.error_code.push(r.error_code.as_deref());
            c.error.push(r.error.as_deref());
            c.claim.push(r.claim);
            c.hold_ms.push(r.hold.map(millis));
            for a in &r.attempts {
                c.log_id.push(r.id);
                c.log_customer.push(r.customer_id.as_str());
                c.log_attempt.push(a.attempt);
                c.log_started.push(a.started_at);
                c.log_duration_ms
                    .push(i32::try_from(a.duration.as_millis()).unwrap_or(i32::MAX));
                c.log_http_status.push(a.http_status.map(i32::from));
                c.log_outcome.push(a.outcome.as_str());
                c.log_error_code.push(a.error_code.as_deref());
                c.log_error.push(a.error.as_deref());
            }
        }
        c
    }
}

impl Columns<'_> {
    /// Binds the columns to [`RECORD_SQL`]'s parameters, in order.
    fn bind<'q>(&'q self, q: Query<'q>, worker_id: &'q str) -> Query<'q> {
        q.bind(&self.id)
            .bind(&self.status)
            .bind(&self.attempt_inc)
            .bind(&self.delay_ms)
            .bind(&self.http_status)
            .bind(&self.error_code)
            .bind(&self.error)
            .bind(worker_id)
            .bind(&self.claim)
            .bind(&self.hold_ms)
            .bind(&self.imprint_updated_at)
            .bind(&self.statuses)
            .bind(&self.response)
            .bind(&self.drift)
            .bind(&self.accepted)
            .bind(&self.log_id)
            .bind(&self.log_customer)
            .bind(&self.log_attempt)
            .bind(&self.log_started)
            .bind(&self.log_duration_ms)
            .bind(&self.log_http_status)
            .bind(&self.log_outcome)
            .bind(&self.log_error_code)
            .bind(&self.log_error)
    }
}

fn applied(rows: &[sqlx::postgres::PgRow]) -> sqlx::Result<Vec<Applied>> {
    rows.iter().map(Applied::from_row).collect()
}

impl Store {
    /// Writes a batch of outcomes in one statement; returns the rows it applied to.
    pub async fn record(&self, records: &[Record]) -> sqlx::Result<Vec<Applied>> {
        Ok(self.write_back(records, false).await?.0)
    }

    /// The write-back, first run under `EXPLAIN (ANALYZE, FORMAT JSON)` with a generic plan and
    /// rolled back: returns what it applied and the work of its plan (rows produced and
    /// removed, times loops: [`super::plan::work`]), for tests and the benchmark.
    pub async fn record_measured(&self, records: &[Record]) -> sqlx::Result<(Vec<Applied>, f64)> {
        self.write_back(records, true).await
    }

    async fn write_back(
        &self,
        records: &[Record],
        measure: bool,
    ) -> sqlx::Result<(Vec<Applied>, f64)> {
        let c = Columns::of(records);
        let (rows, work) = super::plan::fetch_on_indexes(
            &self.pool,
            RECORD_SQL,
            |q| c.bind(q, &self.worker_id),
            measure,
        )
        .await?;
        Ok((applied(&rows)?, work))
    }
}
