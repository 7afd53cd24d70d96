//! The claim: which rows are sent next, merged per column, under a lease (G1, G2, G3, G6,
//! G7, G9). Several short statements in one transaction, each an index look-up driven by the
//! batch (arrays, `= ANY`), committed before any HTTP call:
//!
//! 1. **scan** due pending rows in order through the due index, a page at a time;
//! 2. **gate** each candidate customer: a transaction-scoped advisory lock makes claimers
//!    take turns per customer (so no row of a customer is skipped by `SKIP LOCKED` because
//!    another claimer was looking at it), and a customer with a row in flight or in its quiet
//!    period waits;
//! 3. **defer** the rows of waiting customers, so the next claims do not scan them again;
//! 4. **merge and claim**: per customer, the newest pending row carries, for every column,
//!    the value of the newest row that set it and is not below the customer's mark for that
//!    column (a newer row's value of that column was already claimed, maybe sent); the older
//!    rows become `superseded`; the carrier goes `in_flight` and the marks move up.
//!
//! Values are read bounded: an oversize text or `metadata` is not loaded, a timestamp out of
//! the range Imprint (and chrono) can hold is not decoded; such a row fails alone, naming the
//! column. Statistics cannot change the plans' shape: the transaction turns off sequential
//! scans and hash or merge joins, and every step is driven by arrays.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row};
use tokio::time::Instant;

use super::model::{Defect, OutboxRow};
use super::outcome::ErrorCode;
use super::store::Store;
use crate::limits;

/// What one claim did.
#[derive(Debug)]
pub struct Claim {
    /// Rows now `in_flight` under this worker's lease; one per customer at most.
    pub rows: Vec<OutboxRow>,
    /// Rows retired as `superseded` without a request of their own.
    pub superseded: u64,
    /// Rows set aside as `failed` by the claim itself (`poison_row`, an unusable customer id).
    pub failed: Vec<(i64, String)>,
    /// The claim stopped short of the limit on purpose (a suspect row is claimed alone):
    /// claim again at once rather than waiting for the poll interval.
    pub more: bool,
    /// The local instant at which the lease began, at the latest: the lease runs out no
    /// earlier than this plus the lease length, read from the database's clock.
    pub lease_started: Instant,
}

impl Default for Claim {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            superseded: 0,
            failed: Vec::new(),
            more: false,
            lease_started: Instant::now(),
        }
    }
}

/// How a profile column is read without trusting its content.
#[derive(Clone, Copy)]
enum Kind {
    /// Loaded only up to this many bytes (four per character of the mapping's limit).
    Text(usize),
    Int,
    /// Decoded only within years 1..=9999 (beyond, chrono or the API cannot hold it).
    Time,
    /// Read as text (parsed per row, so a nesting or number no parser takes fails that row
    /// alone), and only up to this many bytes.
    Json(usize),
}

const TEXT_BYTES: usize = limits::TEXT_MAX * 4;

/// The partner-written profile columns, in the table's order.
const COLUMNS: [(&str, Kind); 18] = [
    ("email", Kind::Text(TEXT_BYTES)),
    ("phone", Kind::Text(TEXT_BYTES)),
    ("first_name", Kind::Text(TEXT_BYTES)),
    ("last_name", Kind::Text(TEXT_BYTES)),
    ("preferred_language", Kind::Text(TEXT_BYTES)),
    ("street_line1", Kind::Text(TEXT_BYTES)),
    ("street_line2", Kind::Text(TEXT_BYTES)),
    ("city", Kind::Text(TEXT_BYTES)),
    ("state", Kind::Text(TEXT_BYTES)),
    ("postal_code", Kind::Text(TEXT_BYTES)),
    ("country", Kind::Text(TEXT_BYTES)),
    ("account_tenure", Kind::Int),
    ("ltv_amount", Kind::Int),
    ("ltv_currency", Kind::Text(TEXT_BYTES)),
    ("loyalty_tier", Kind::Text(TEXT_BYTES)),
    ("account_created_at", Kind::Time),
    ("transaction_count", Kind::Int),
    ("metadata", Kind::Json(limits::METADATA_MAX_BYTES * 2)),
];

const TIME_RANGE: &str =
    "BETWEEN '0001-01-01 00:00:00+00'::timestamptz AND '9999-12-31 23:59:59+00'::timestamptz";
/// The advisory-lock namespace of the per-customer claim lock (the first key of the pair).
const LOCK_NAMESPACE: i32 = 0x1A5C_0001;
/// How long a row of a customer with a row in flight waits before it is looked at again.
const BUSY_DEFER_MS: i64 = 1_000;
/// Pages of the due index scanned per claim, each of `limit` rows.
const SCAN_PAGES: usize = 8;

/// The bounded read of `o`'s profile columns. With `only_if`, a column is returned only where
/// `p.<column>_from` says the merge keeps it (the carrier's stale columns stay unsent).
fn bounded_columns(only_if: bool) -> String {
    let mut s = String::new();
    let mut defects = Vec::new();
    for (c, kind) in COLUMNS {
        let keep = if only_if {
            format!("p.{c}_from IS NOT NULL AND ")
        } else {
            String::new()
        };
        let (value, bad) = match kind {
            Kind::Text(max) => (
                format!("CASE WHEN {keep}octet_length(o.{c}) <= {max} THEN o.{c} END"),
                format!("{keep}octet_length(o.{c}) > {max}"),
            ),
            Kind::Int => (
                format!("CASE WHEN {keep}true THEN o.{c} END"),
                String::new(),
            ),
            Kind::Time => (
                format!("CASE WHEN {keep}o.{c} {TIME_RANGE} THEN o.{c} END"),
                format!("{keep}NOT (o.{c} {TIME_RANGE})"),
            ),
            Kind::Json(max) => (
                format!("CASE WHEN {keep}octet_length(o.{c}::text) <= {max} THEN o.{c}::text END"),
                format!("{keep}octet_length(o.{c}::text) > {max}"),
            ),
        };
        let _ = write!(s, "{value} AS {c}, ");
        if !bad.is_empty() {
            defects.push(format!("CASE WHEN {bad} THEN '{c}' END"));
        }
    }
    let _ = write!(
        s,
        "array_remove(ARRAY[{}], NULL) AS defects, \
         o.id, o.customer_id, o.attempts, o.claims, o.lease_expires_at",
        defects.join(", ")
    );
    s
}

/// Statement 1: a page of due pending rows, in order, through the due index. The position is
/// carried as text, so no timestamp a writer could put there has to fit a Rust type; a
/// customer id too long to be an Imprint id (over 256 bytes) is not read.
const SCAN_SQL: &str = "
SELECT id, next_attempt_at::text AS position,
       CASE WHEN octet_length(customer_id) <= 256 THEN customer_id END AS customer_id
FROM imprint_sync.customer_outbox
WHERE sync_status = 'pending' AND next_attempt_at <= now()
  AND (next_attempt_at, id) > ($1::text::timestamptz, $2)
ORDER BY next_attempt_at, id
LIMIT $3";

/// Statement 2: per candidate customer, in order: the claim lock, a row in flight, a quiet
/// period, a suspect row (claimed before and never written back; any pending row of the
/// customer, since the merge carries every one). `LIMIT 1` sub-selects,
/// not `EXISTS`: the planner may turn an `EXISTS` into a hashed scan of every pending row.
const GATE_SQL: &str = "
SELECT c.customer_id,
       pg_try_advisory_xact_lock($2, hashtext(c.customer_id)) AS locked,
       (SELECT true FROM imprint_sync.customer_outbox f
         WHERE f.customer_id = c.customer_id AND f.sync_status = 'in_flight'
         LIMIT 1) IS NOT NULL AS busy,
       (SELECT s.hold_until FROM imprint_sync.customer_claims s
         WHERE s.customer_id = c.customer_id AND s.hold_until > now()) AS held_until,
       (SELECT true FROM imprint_sync.customer_outbox p
         WHERE p.customer_id = c.customer_id AND p.sync_status = 'pending' AND p.claims > 0
         LIMIT 1) IS NOT NULL AS suspect
FROM unnest($1::text[]) WITH ORDINALITY AS c(customer_id, n)
ORDER BY c.n";

/// Statement 3: rows of waiting customers come due again later (at the end of the quiet
/// period, or shortly for a customer with a row in flight). No status test: the rows were
/// pending a moment ago and their customers' claim locks are ours; and a status in the
/// WHERE would let the planner scan a partial index whole instead of probing the key.
const DEFER_SQL: &str = "
UPDATE imprint_sync.customer_outbox o
SET next_attempt_at = COALESCE(d.until, now() + $3 * interval '1 millisecond')
FROM unnest($1::bigint[], $2::timestamptz[]) AS d(id, until)
WHERE o.id = d.id";

/// Rows whose customer id is too long to read fail at once (the mapping would refuse it):
/// `$3` is [`ErrorCode::InvalidProfile`].
const BAD_ID_SQL: &str = "
UPDATE imprint_sync.customer_outbox
SET sync_status = 'failed', last_error_code = $3,
    last_error = format('outbox row %s: customer_id: is longer than %s characters', id, $2::int),
    updated_at = now()
WHERE id = ANY($1) AND sync_status = 'pending'";

/// A row id read from the JSON value `json` (a mark, an origin): a number, clamped to the
/// range of ids, else NULL. Never an error, whatever was written there by hand.
fn number(json: &str) -> String {
    format!(
        "CASE WHEN jsonb_typeof({json}) = 'number'
              THEN LEAST(GREATEST(({json})::text::numeric, 0), 9223372036854775807)::bigint END"
    )
}

/// Statement 4, built once from [`COLUMNS`]: merge per column, supersede, claim, move marks.
/// Binds: the customers, the lease (ms), the worker, `sync.max_claims`, and
/// [`ErrorCode::PoisonRow`].
fn merge_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let cols: Vec<&str> = COLUMNS.iter().map(|(c, _)| *c).collect();
        let list = |f: &dyn Fn(&str) -> String, sep: &str| {
            cols.iter().map(|c| f(c)).collect::<Vec<_>>().join(sep)
        };
        // A row's value of a column is as old as the row it came from: its own, or the one
        // a merge carried it from (`origins`), so a carried value never passes for newer than
        // it is (and never newer than the row holding it, whatever `origins` says). It counts
        // when set and not below the customer's mark for the column. Only
        // ages are aggregated (no value is loaded here, however large), and the newest wins.
        let aggregates = list(
            &|c| {
                let pick = format!(
                    "max(ARRAY[r.{c}_age, r.id]) FILTER (WHERE r.{c}_age >= COALESCE({}, 0))",
                    number(&format!("k.marks->'{c}'"))
                );
                format!("({pick})[1] AS {c}_from, ({pick})[2] AS {c}_row")
            },
            ",\n               ",
        );
        let ages = list(
            &|c| {
                format!(
                    "CASE WHEN o.{c} IS NOT NULL THEN LEAST(COALESCE({}, o.id), o.id) END AS {c}_age",
                    number(&format!("o.origins->'{c}'"))
                )
            },
            ", ",
        );
        let anything = list(&|c| format!("m.{c}_from IS NOT NULL"), " OR ");
        // The winning value is copied into the carrier from its row (one key look-up each).
        let fill = list(
            &|c| {
                format!(
                    "{c} = CASE WHEN p.fate = 'superseded' OR p.{c}_row IS NULL OR p.{c}_row = o.id
                     THEN o.{c}
                     ELSE (SELECT x.{c} FROM imprint_sync.customer_outbox x WHERE x.id = p.{c}_row) END"
                )
            },
            ",\n    ",
        );
        let marks = list(&|c| format!("'{c}', p.{c}_from"), ", ");
        // A carried value's age, kept only where it is older than the carrier row: a value
        // the row set itself is as old as the row, which is the default (so the common claim
        // of a single row writes no `origins` at all).
        let carried_ages = list(
            &|c| format!("'{c}', CASE WHEN p.{c}_from < o.id THEN p.{c}_from END"),
            ", ",
        );
        let newest = number("e.v");
        let returned = bounded_columns(true);
        format!(
            r#"
-- Per customer (one index look-up each): its marks, then its pending rows, locked (a row
-- someone else holds locked is left for a later claim: the marks keep it from overtaking),
-- folded into the merged profile.
WITH m AS MATERIALIZED (
    SELECT c.customer_id, k.marks, x.*
    FROM unnest($1::text[]) AS c(customer_id)
    -- OFFSET 0 keeps this look-up one per customer: pulled up, it would be repeated in
    -- every column's filter below.
    CROSS JOIN LATERAL (
        -- Marks that are not an object (edited by hand) count as none: one customer's
        -- unreadable record must not fail the claim of every customer.
        SELECT COALESCE((SELECT s.marks FROM imprint_sync.customer_claims s
                          WHERE s.customer_id = c.customer_id
                            AND jsonb_typeof(s.marks) = 'object'), '{{}}'::jsonb) AS marks
        OFFSET 0
    ) k
    CROSS JOIN LATERAL (
        SELECT max(r.id) AS carrier,
               (array_agg(r.id ORDER BY r.id DESC))[2:] AS older_ids,
               (array_agg(r.due ORDER BY r.id DESC))[1] AS due,
               -- The merge carries every row's values, so also the count of any row whose
               -- claims kept dying: a newer row does not launder a suspect one.
               max(r.claims) AS claims,
               {aggregates}
        FROM (
            SELECT o.id, o.claims, o.next_attempt_at <= now() AS due, {ages}
            FROM imprint_sync.customer_outbox o
            WHERE o.customer_id = c.customer_id AND o.sync_status = 'pending'
            ORDER BY o.id
            FOR UPDATE SKIP LOCKED
        ) r
    ) x
),
-- What becomes of each carrier: nothing left to send (every column it and the older rows set
-- is below its mark) → superseded by the newest claimed row; not due yet → stays pending
-- (a retry's backoff); claimed too often without an outcome → failed as poison; else claimed.
p AS MATERIALIZED (
    SELECT m.*,
           CASE WHEN NOT ({anything}) THEN 'superseded'
                WHEN NOT m.due THEN 'pending'
                WHEN m.claims >= $4 THEN 'poison'
                ELSE 'claim' END AS fate
    FROM m WHERE m.carrier IS NOT NULL
),
q AS MATERIALIZED (
    SELECT p.*,
           CASE WHEN p.fate = 'superseded'
                THEN (SELECT max({newest}) FROM jsonb_each(p.marks) AS e(k, v)) END
               AS newest_mark
    FROM p
),
older AS (
    UPDATE imprint_sync.customer_outbox o
    SET sync_status = 'superseded', updated_at = now(),
        superseded_by = CASE WHEN q.fate = 'superseded' THEN q.newest_mark ELSE q.carrier END
    FROM q
    WHERE o.id = ANY(q.older_ids)
),
marked AS (
    INSERT INTO imprint_sync.customer_claims AS s (customer_id, marks)
    SELECT p.customer_id, jsonb_strip_nulls(jsonb_build_object({marks}))
    FROM q AS p WHERE p.fate = 'claim'
    ON CONFLICT (customer_id) DO UPDATE
    SET marks = CASE WHEN jsonb_typeof(s.marks) = 'object' THEN s.marks ELSE '{{}}' END
                || EXCLUDED.marks
),
carried AS (
    UPDATE imprint_sync.customer_outbox o
    SET {fill},
        origins = CASE WHEN p.fate = 'superseded' THEN o.origins
                       ELSE NULLIF(COALESCE(CASE WHEN jsonb_typeof(o.origins) = 'object'
                                                 THEN o.origins END, '{{}}')
                                   || jsonb_strip_nulls(jsonb_build_object({carried_ages})),
                                   '{{}}') END,
        sync_status = CASE p.fate WHEN 'claim' THEN 'in_flight' WHEN 'poison' THEN 'failed'
                                  WHEN 'superseded' THEN 'superseded' ELSE 'pending' END,
        superseded_by = CASE WHEN p.fate = 'superseded' THEN p.newest_mark END,
        claims = p.claims + (p.fate = 'claim')::int,
        lease_expires_at = CASE WHEN p.fate = 'claim'
                                THEN now() + $2 * interval '1 millisecond' END,
        leased_by = CASE WHEN p.fate = 'claim' THEN $3 END,
        last_error_code = CASE WHEN p.fate = 'poison' THEN $5::text ELSE o.last_error_code END,
        last_error = CASE WHEN p.fate = 'poison'
            THEN format('outbox row %s: claimed %s times without an outcome (the process died or lost the lease while working it); set aside', o.id, p.claims)
            ELSE o.last_error END,
        updated_at = now()
    FROM q AS p
    WHERE o.id = p.carrier
    RETURNING o.sync_status, {returned},
              extract(epoch FROM o.lease_expires_at - clock_timestamp())::float8 AS lease_left
)
SELECT (SELECT sum(cardinality(older_ids)) FROM q)::int8 AS older, c.* FROM carried c
"#,
        )
    })
}

/// The bounded row read for `run --dry-run` (no claim).
pub(super) fn peek_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "WITH due AS (
                SELECT * FROM imprint_sync.customer_outbox
                WHERE sync_status = 'pending' AND next_attempt_at <= now()
             )
             SELECT {cols}, (SELECT count(*) FROM due) AS due_total
             FROM (SELECT DISTINCT ON (customer_id) * FROM due ORDER BY customer_id, id DESC) o
             ORDER BY o.id
             LIMIT $1",
            cols = bounded_columns(false)
        )
    })
}

/// A transaction whose statements can also be measured: with `work` set, every statement is
/// first run under `EXPLAIN (ANALYZE, FORMAT JSON)` inside a savepoint that is rolled back,
/// and its plan's work (see [`super::plan::work`]) added up.
struct Tx {
    tx: sqlx::Transaction<'static, Postgres>,
    work: Option<f64>,
}

type Query = super::plan::Query<'static>;

impl Tx {
    async fn fetch(
        &mut self,
        sql: &'static str,
        bind: impl Fn(Query) -> Query,
    ) -> sqlx::Result<Vec<PgRow>> {
        if let Some(work) = self.work.as_mut() {
            *work += super::plan::measure(&mut self.tx, sql, &bind).await?;
        }
        bind(sqlx::query(sql)).fetch_all(&mut *self.tx).await
    }
}

/// A candidate customer, in claim order, with the due rows the scan saw.
struct Candidate {
    customer_id: String,
    rows: Vec<i64>,
}

/// The claim; with `measure`, also the work of its statements (for tests and the benchmark).
pub(super) async fn claim(
    pool: &PgPool,
    worker_id: &str,
    limit: u32,
    lease: Duration,
    max_claims: u32,
    suspects_ok: bool,
    measure: bool,
) -> sqlx::Result<(Claim, f64)> {
    let mut tx = Tx {
        tx: pool.begin().await?,
        work: measure.then_some(0.0),
    };
    // The plans must not depend on statistics (see `INDEXES_ONLY`).
    sqlx::raw_sql(super::plan::INDEXES_ONLY)
        .execute(&mut *tx.tx)
        .await?;
    let limit_n = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut claim = Claim::default();

    // 1. Scan due rows a page at a time; 2. gate each page's new customers; until the batch
    // is full. Customers that wait do not use up the batch.
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut take: Vec<String> = Vec::new();
    let mut bad_ids: Vec<i64> = Vec::new();
    let (mut defer_ids, mut defer_until) = (Vec::new(), Vec::new());
    let mut after: (String, i64) = ("-infinity".to_owned(), 0);
    'pages: for _ in 0..SCAN_PAGES {
        let page = i64::from(limit);
        let rows = tx
            .fetch(SCAN_SQL, |q| {
                q.bind(after.0.clone()).bind(after.1).bind(page)
            })
            .await?;
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for r in &rows {
            let id: i64 = r.try_get("id")?;
            after = (r.try_get("position")?, id);
            match r.try_get::<Option<String>, _>("customer_id")? {
                None => bad_ids.push(id),
                Some(c) => match index.get(&c) {
                    Some(&k) => candidates[k].rows.push(id),
                    None if !seen.contains(&c) => {
                        seen.insert(c.clone());
                        index.insert(c.clone(), candidates.len());
                        candidates.push(Candidate {
                            customer_id: c,
                            rows: vec![id],
                        });
                    }
                    None => {}
                },
            }
        }
        let customers: Vec<String> = candidates.iter().map(|c| c.customer_id.clone()).collect();
        if !customers.is_empty() {
            let gate = tx
                .fetch(GATE_SQL, move |q| {
                    q.bind(customers.clone()).bind(LOCK_NAMESPACE)
                })
                .await?;
            for (g, cand) in gate.iter().zip(candidates) {
                if take.len() >= limit_n {
                    break 'pages;
                }
                if !g.try_get::<bool, _>("locked")? {
                    continue; // another claimer has this customer right now
                }
                let held: Option<DateTime<Utc>> = g.try_get("held_until")?;
                if held.is_some() || g.try_get::<bool, _>("busy")? {
                    for id in cand.rows {
                        defer_ids.push(id);
                        defer_until.push(held);
                    }
                    continue;
                }
                if g.try_get::<bool, _>("suspect")? {
                    // A row claimed before whose outcome never came back may be what killed
                    // that process: it goes alone, and only when this process holds nothing
                    // else, so its next death counts against it and no other row.
                    if take.is_empty() && suspects_ok {
                        take.push(cand.customer_id);
                        claim.more = true;
                        break 'pages;
                    }
                    continue;
                }
                take.push(cand.customer_id);
            }
        }
        if rows.len() < limit_n || take.len() >= limit_n {
            break;
        }
    }
    if !bad_ids.is_empty() {
        let ids = bad_ids.clone();
        tx.fetch(BAD_ID_SQL, move |q| {
            q.bind(ids.clone())
                .bind(i32::try_from(limits::CUSTOMER_ID_MAX).unwrap_or(i32::MAX))
                .bind(ErrorCode::InvalidProfile.as_str())
        })
        .await?;
        claim.failed = bad_ids.into_iter().map(|id| (id, String::new())).collect();
    }

    // 3. Defer the rows of customers that wait.
    if !defer_ids.is_empty() {
        tx.fetch(DEFER_SQL, move |q| {
            q.bind(defer_ids.clone())
                .bind(defer_until.clone())
                .bind(BUSY_DEFER_MS)
        })
        .await?;
    }

    // 4. Merge and claim.
    let before = Instant::now();
    let rows = if take.is_empty() {
        Vec::new()
    } else {
        let worker = worker_id.to_owned();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        tx.fetch(merge_sql(), move |q| {
            q.bind(take.clone())
                .bind(lease_ms)
                .bind(worker.clone())
                .bind(i32::try_from(max_claims).unwrap_or(i32::MAX))
                .bind(ErrorCode::PoisonRow.as_str())
        })
        .await?
    };
    tx.tx.commit().await?;

    let mut lease_left = lease;
    if let Some(r) = rows.first() {
        claim.superseded = u64::try_from(r.try_get::<i64, _>("older")?).unwrap_or(0);
    }
    for r in &rows {
        match r.try_get::<&str, _>("sync_status")? {
            "in_flight" => {
                if let Some(s) = r.try_get::<Option<f64>, _>("lease_left")? {
                    lease_left = lease_left.min(Duration::from_secs_f64(s.max(0.0)));
                }
                claim.rows.push(decode(r)?);
            }
            "superseded" => claim.superseded += 1,
            "failed" => claim
                .failed
                .push((r.try_get("id")?, r.try_get("customer_id")?)),
            _ => {}
        }
    }
    claim.lease_started = before
        .checked_sub(lease.saturating_sub(lease_left))
        .unwrap_or(before);
    Ok((claim, tx.work.unwrap_or(0.0)))
}

/// One row from the bounded read. Nothing here can fail on the row's content: what cannot
/// be used becomes the row's [`Defect`], and the row fails alone when it is mapped.
pub(super) fn decode(r: &PgRow) -> sqlx::Result<OutboxRow> {
    let text = |c: &str| r.try_get::<Option<String>, _>(c);
    let mut trouble = r
        .try_get::<Vec<String>, _>("defects")?
        .first()
        .map(|c| defect(c, "is too large or out of range to be read"));
    let metadata = match text("metadata")? {
        None => None,
        Some(s) => match serde_json::from_str::<Value>(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                trouble.get_or_insert_with(|| {
                    // serde_json's message names a line and column, never the value.
                    defect("metadata", &format!("cannot be read as JSON: {e}"))
                });
                None
            }
        },
    };
    Ok(OutboxRow {
        id: r.try_get("id")?,
        customer_id: r.try_get("customer_id")?,
        email: text("email")?,
        phone: text("phone")?,
        first_name: text("first_name")?,
        last_name: text("last_name")?,
        preferred_language: text("preferred_language")?,
        street_line1: text("street_line1")?,
        street_line2: text("street_line2")?,
        city: text("city")?,
        state: text("state")?,
        postal_code: text("postal_code")?,
        country: text("country")?,
        account_tenure: r.try_get("account_tenure")?,
        ltv_amount: r.try_get("ltv_amount")?,
        ltv_currency: text("ltv_currency")?,
        loyalty_tier: text("loyalty_tier")?,
        account_created_at: r.try_get("account_created_at")?,
        transaction_count: r.try_get("transaction_count")?,
        metadata,
        attempts: r.try_get("attempts")?,
        lease_expires_at: r.try_get("lease_expires_at")?,
        defect: trouble,
    })
}

/// A defect of `column` (one of [`COLUMNS`]).
fn defect(column: &str, reason: &str) -> Defect {
    Defect {
        column: COLUMNS
            .iter()
            .map(|(c, _)| *c)
            .find(|c| *c == column)
            .unwrap_or("row"),
        reason: reason.to_owned(),
    }
}

impl Store {
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
        let (claim, _) = claim(
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
        claim(
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

    /// Due pending rows, newest per customer, read without locking (for `run --dry-run`).
    pub async fn peek_due(&self, limit: u32) -> sqlx::Result<(Vec<OutboxRow>, u64)> {
        let rows = sqlx::query(peek_sql())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let total = match rows.first() {
            Some(r) => u64::try_from(r.try_get::<i64, _>("due_total")?).unwrap_or(0),
            None => 0,
        };
        let rows = rows.iter().map(decode).collect::<sqlx::Result<_>>()?;
        Ok((rows, total))
    }

    /// Puts rows whose lease expired (their worker died) back to `pending` (G4).
    pub async fn rescue_expired(&self) -> sqlx::Result<u64> {
        Ok(self.rescue(false).await?.0)
    }

    /// The rescue, also run under `EXPLAIN ANALYZE` first: returns the rows rescued and the
    /// work of its plan (for tests).
    pub async fn rescue_expired_measured(&self) -> sqlx::Result<(u64, f64)> {
        self.rescue(true).await
    }

    async fn rescue(&self, measure: bool) -> sqlx::Result<(u64, f64)> {
        let (rows, work) =
            super::plan::fetch_on_indexes(&self.pool, RESCUE_SQL, |q| q, measure).await?;
        Ok((u64::try_from(rows.len()).unwrap_or(u64::MAX), work))
    }
}

/// Rows whose lease expired go back to `pending`. Read through
/// `customer_outbox_one_in_flight_idx`: the rows in flight are few (a batch per worker), so
/// the lease needs no index of its own, which every claim would write (0009). A plain index
/// scan, not a bitmap (`INDEXES_ONLY`): until the outbox is vacuumed the index keeps an entry
/// for every row that went through `in_flight`; an index scan marks them dead as it passes,
/// a bitmap scan fetches them all again on every rescue.
const RESCUE_SQL: &str = "
UPDATE imprint_sync.customer_outbox
SET sync_status = 'pending', lease_expires_at = NULL, leased_by = NULL, updated_at = now()
WHERE sync_status = 'in_flight' AND lease_expires_at < now()
RETURNING id";
