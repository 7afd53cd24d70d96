//! Every SQL statement of reconciliation: which customers to check, what a check found, the
//! repair row, and the summary `status` shows. Times come from the database clock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgPool, Row};

/// The period `status` counts verifications over when it is not told the configured one
/// (the default of `reconcile.period_hours`).
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(24 * 3_600);

/// A customer to check: the partner's newest synced profile, as the write-back left it.
#[derive(Debug, Clone, FromRow)]
pub struct Target {
    pub customer_id: String,
    /// `customer_sync_state.accepted`: per outbox column, the newest value Imprint accepted.
    /// `None` for a customer named on the command line that was never synced.
    pub accepted: Option<Value>,
    /// The sync state the comparison is made against; `None` when there is none.
    pub last_synced_outbox_id: Option<i64>,
    /// `checked_at` before this take, so a take that is never checked can be given back.
    pub previous_check: Option<DateTime<Utc>>,
}

/// Which customers a take may return.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// Only customers not checked since this moment (database time): one pass of the command
    /// takes each customer once.
    pub not_checked_since: Option<DateTime<Utc>>,
    /// Only customers synced within this long.
    pub synced_within: Option<Duration>,
}

/// What a check found, as it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding<'a> {
    InStep,
    /// The names of the drifted fields.
    Drifted(&'a [&'static str]),
    Missing,
}

impl Finding<'_> {
    pub fn as_str(&self) -> &'static str {
        match self {
            Finding::InStep => "in_step",
            Finding::Drifted(_) => "drifted",
            Finding::Missing => "missing",
        }
    }
}

/// The summary of one `imprint-sync reconcile` run, as `reconcile_runs` keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, FromRow)]
pub struct Counts {
    pub checked: i64,
    pub in_step: i64,
    pub drifted: i64,
    pub missing: i64,
    pub errors: i64,
    pub repaired: i64,
}

/// The last `reconcile` run, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastPass {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub repair: bool,
    #[serde(flatten)]
    pub counts: Counts,
}

/// The `reconcile` object of `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReconcileStatus {
    /// The last `imprint-sync reconcile` run, if any.
    pub last_pass: Option<LastPass>,
    /// The last time any customer was checked (the command or the sweep).
    pub last_checked_at: Option<DateTime<Utc>>,
    /// The period `verified_in_period` counts over (`reconcile.period_hours`).
    pub period_hours: f64,
    /// Customers whose copy at Imprint was verified within the period.
    pub verified_in_period: i64,
    /// Customers whose last check found drift.
    pub drifted_now: i64,
    /// Customers whose last check found them missing at Imprint (404).
    pub missing_now: i64,
}

/// Takes up to `limit` customers, least recently checked first, and marks them checked now,
/// so that another replica's sweep (or a concurrent `reconcile`) takes others. One statement.
const TAKE_SQL: &str = r#"
WITH pick AS (
    SELECT customer_id, checked_at AS previous_check
    FROM imprint_sync.customer_sync_state
    WHERE ($2::timestamptz IS NULL OR checked_at IS NULL OR checked_at < $2)
      AND ($3::float8 IS NULL OR last_synced_at >= now() - $3 * interval '1 second')
    ORDER BY checked_at NULLS FIRST, customer_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE imprint_sync.customer_sync_state s
SET checked_at = now()
FROM pick
WHERE s.customer_id = pick.customer_id
RETURNING s.customer_id, s.accepted, s.last_synced_outbox_id, pick.previous_check
"#;

/// Named customers, in the order given; those never synced come back without a profile.
const NAMED_SQL: &str = r#"
SELECT u.id AS customer_id, s.accepted, s.last_synced_outbox_id, s.checked_at AS previous_check
FROM unnest($1::text[]) WITH ORDINALITY AS u(id, n)
LEFT JOIN imprint_sync.customer_sync_state s ON s.customer_id = u.id
WHERE $2::float8 IS NULL OR s.last_synced_at >= now() - $2 * interval '1 second'
ORDER BY u.n
"#;

/// Writes a finding, only if the customer was not synced since the profile was read (else the
/// comparison is stale, and the caller checks again).
const FINDING_SQL: &str = r#"
UPDATE imprint_sync.customer_sync_state
SET checked_at = now(),
    verified_at = now(),
    reconcile_result = $2,
    drift = $3::jsonb,
    statuses = COALESCE($4::jsonb, statuses)
WHERE customer_id = $1 AND last_synced_outbox_id = $5
"#;

/// The repair: a fresh outbox row holding the accepted profile, mapped back to the outbox
/// columns, for the engine to send with all its guarantees. Only while the state is still the
/// one compared, and only when no newer change of the customer is pending, in flight or
/// failed: that change is newer than the accepted profile, and a repair row behind it would
/// carry older values over it.
const REPAIR_SQL: &str = r#"
INSERT INTO imprint_sync.customer_outbox
    (customer_id, email, phone, first_name, last_name, preferred_language, street_line1,
     street_line2, city, state, postal_code, country, account_tenure, ltv_amount, ltv_currency,
     loyalty_tier, account_created_at, transaction_count, metadata)
SELECT s.customer_id, p.email, p.phone, p.first_name, p.last_name, p.preferred_language,
       p.street_line1, p.street_line2, p.city, p.state, p.postal_code, p.country,
       p.account_tenure, p.ltv_amount, p.ltv_currency, p.loyalty_tier, p.account_created_at,
       p.transaction_count, p.metadata
FROM imprint_sync.customer_sync_state s
CROSS JOIN LATERAL jsonb_populate_record(NULL::imprint_sync.customer_outbox,
                                         COALESCE(s.accepted, '{}'::jsonb)) p
WHERE s.customer_id = $1 AND s.last_synced_outbox_id = $2
  -- One look-up per state, each through the partial index of that state by customer.
  AND NOT EXISTS (
      SELECT 1 FROM imprint_sync.customer_outbox o
      WHERE o.customer_id = s.customer_id AND o.id > s.last_synced_outbox_id
        AND o.sync_status = 'pending')
  AND NOT EXISTS (
      SELECT 1 FROM imprint_sync.customer_outbox o
      WHERE o.customer_id = s.customer_id AND o.id > s.last_synced_outbox_id
        AND o.sync_status = 'in_flight')
  AND NOT EXISTS (
      SELECT 1 FROM imprint_sync.customer_outbox o
      WHERE o.customer_id = s.customer_id AND o.id > s.last_synced_outbox_id
        AND o.sync_status = 'failed')
RETURNING id
"#;

/// Reconciliation's statements, on the daemon's pool.
#[derive(Clone, Debug)]
pub struct ReconcileStore {
    pool: PgPool,
}

impl ReconcileStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The database's clock now (a pass's start, for [`Window::not_checked_since`]).
    pub async fn now(&self) -> sqlx::Result<DateTime<Utc>> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.pool)
            .await
    }

    /// Takes the next `limit` customers (least recently checked first) within `window`.
    pub async fn take(&self, limit: u32, window: Window) -> sqlx::Result<Vec<Target>> {
        sqlx::query_as(TAKE_SQL)
            .bind(i64::from(limit))
            .bind(window.not_checked_since)
            .bind(window.synced_within.map(|d| d.as_secs_f64()))
            .fetch_all(&self.pool)
            .await
    }

    /// The named customers, in the order given.
    pub async fn named(
        &self,
        customers: &[String],
        synced_within: Option<Duration>,
    ) -> sqlx::Result<Vec<Target>> {
        sqlx::query_as(NAMED_SQL)
            .bind(customers)
            .bind(synced_within.map(|d| d.as_secs_f64()))
            .fetch_all(&self.pool)
            .await
    }

    /// Gives back customers taken but never checked (a stop in mid-tick): they keep their
    /// place in the walk.
    pub async fn give_back(&self, targets: &[&Target]) -> sqlx::Result<()> {
        let ids: Vec<&str> = targets.iter().map(|t| t.customer_id.as_str()).collect();
        let previous: Vec<Option<DateTime<Utc>>> =
            targets.iter().map(|t| t.previous_check).collect();
        sqlx::query(
            "UPDATE imprint_sync.customer_sync_state s SET checked_at = g.previous
             FROM unnest($1::text[], $2::timestamptz[]) AS g(id, previous)
             WHERE s.customer_id = g.id",
        )
        .bind(&ids)
        .bind(&previous)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Writes what a check found; false when the customer was synced since `target` was read
    /// (or is not in `customer_sync_state`), and nothing was written.
    pub async fn write(
        &self,
        target: &Target,
        finding: &Finding<'_>,
        statuses: Option<&str>,
    ) -> sqlx::Result<bool> {
        let Some(last) = target.last_synced_outbox_id else {
            return Ok(false);
        };
        let drift = match finding {
            Finding::Drifted(fields) => Some(serde_json::to_string(fields).unwrap_or_default()),
            _ => None,
        };
        let done = sqlx::query(FINDING_SQL)
            .bind(&target.customer_id)
            .bind(finding.as_str())
            .bind(drift)
            .bind(statuses)
            .bind(last)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A check that failed (after retries): only `checked_at` moves, so the customer goes to
    /// the end of the walk; the last finding stays as it was.
    pub async fn checked(&self, customer_id: &str) -> sqlx::Result<()> {
        sqlx::query(
            "UPDATE imprint_sync.customer_sync_state SET checked_at = now() WHERE customer_id = $1",
        )
        .bind(customer_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Enqueues the repair row of a drifted customer; its outbox id, or `None` when the
    /// customer changed since the check or a newer change of it is pending, in flight or failed.
    pub async fn repair(&self, target: &Target) -> sqlx::Result<Option<i64>> {
        let Some(last) = target.last_synced_outbox_id else {
            return Ok(None);
        };
        sqlx::query_scalar(REPAIR_SQL)
            .bind(&target.customer_id)
            .bind(last)
            .fetch_optional(&self.pool)
            .await
    }

    /// Customers in `customer_sync_state`: the exact count while it is cheap, else the
    /// planner's estimate (the sweep only needs the order of magnitude).
    pub async fn customers(&self) -> sqlx::Result<u64> {
        let estimate: f64 = sqlx::query_scalar(
            "SELECT COALESCE(reltuples, -1)::float8 FROM pg_class
             WHERE oid = 'imprint_sync.customer_sync_state'::regclass",
        )
        .fetch_one(&self.pool)
        .await?;
        if estimate >= 1_000_000.0 {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a positive estimate; float-to-int `as` saturates, and the fraction means nothing"
            )]
            return Ok(estimate as u64);
        }
        let exact: i64 =
            sqlx::query_scalar("SELECT count(*) FROM imprint_sync.customer_sync_state")
                .fetch_one(&self.pool)
                .await?;
        Ok(u64::try_from(exact).unwrap_or(0))
    }

    /// Keeps the summary of a `reconcile` run.
    pub async fn record_run(
        &self,
        started_at: DateTime<Utc>,
        repair: bool,
        c: &Counts,
    ) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO imprint_sync.reconcile_runs
                (started_at, repair, checked, in_step, drifted, missing, errors, repaired)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(started_at)
        .bind(repair)
        .bind(c.checked)
        .bind(c.in_step)
        .bind(c.drifted)
        .bind(c.missing)
        .bind(c.errors)
        .bind(c.repaired)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The `reconcile` object of `status`, counting verifications within `period`.
    pub async fn status(&self, period: Duration) -> sqlx::Result<ReconcileStatus> {
        let last = sqlx::query(
            "SELECT started_at, finished_at, repair, checked, in_step, drifted, missing, errors,
                    repaired
             FROM imprint_sync.reconcile_runs ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let last_pass = match last {
            Some(r) => Some(LastPass {
                started_at: r.try_get("started_at")?,
                finished_at: r.try_get("finished_at")?,
                repair: r.try_get("repair")?,
                counts: Counts::from_row(&r)?,
            }),
            None => None,
        };
        let row = sqlx::query(
            "SELECT
               (SELECT max(checked_at) FROM imprint_sync.customer_sync_state) AS last_checked_at,
               (SELECT count(*) FROM imprint_sync.customer_sync_state
                 WHERE verified_at >= now() - $1 * interval '1 second') AS verified,
               (SELECT count(*) FROM imprint_sync.customer_sync_state
                 WHERE reconcile_result = 'drifted') AS drifted,
               (SELECT count(*) FROM imprint_sync.customer_sync_state
                 WHERE reconcile_result = 'missing') AS missing",
        )
        .bind(period.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        Ok(ReconcileStatus {
            last_pass,
            last_checked_at: row.try_get("last_checked_at")?,
            period_hours: period.as_secs_f64() / 3_600.0,
            verified_in_period: row.try_get("verified")?,
            drifted_now: row.try_get("drifted")?,
            missing_now: row.try_get("missing")?,
        })
    }
}
