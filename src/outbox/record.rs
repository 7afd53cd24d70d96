//! The write-back: each worked row's outcome, its customer's sync state and the attempt log,
//! in one statement per batch, guarded by the lease.

use std::time::Duration;

use chrono::{DateTime, Utc};

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
    pub outcome: &'static str,
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
                a_outcome.push(a.outcome);
                a_code.push(a.error_code.as_deref());
                a_message.push(a.error.as_deref());
            }
        }
        sqlx::query_as(RECORD_SQL)
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
            .await
    }
}
