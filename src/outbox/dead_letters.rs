//! Dead letters: the failed rows an operator lists (`imprint-sync failed`) and picks for a
//! replay. Only ids, codes, statuses and times leave this module; never a personal value.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

use crate::cli::FailedFilter;

/// One failed row, as `failed` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub customer_id: String,
    pub error_code: String,
    /// Names the field or the API's answer, never a value (see `worker` and `profile`).
    pub last_error: Option<String>,
    pub last_http_status: Option<i32>,
    pub attempts: i32,
    pub updated_at: DateTime<Utc>,
}

/// A page of dead letters: `total` counts every match, `rows` honours the limit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetters {
    pub total: i64,
    pub rows: Vec<DeadLetter>,
}

/// The filters as SQL binds: NULL means "not given", so one static statement serves every
/// combination and the planner sees no string-built SQL.
#[derive(Debug, Default)]
pub struct Binds {
    pub codes: Option<Vec<String>>,
    pub customers: Option<Vec<String>>,
    pub since_seconds: Option<f64>,
    pub ids: Option<Vec<i64>>,
}

impl Binds {
    pub fn new(filter: &FailedFilter, ids: &[i64]) -> Self {
        let some = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        Self {
            codes: some(&filter.codes),
            customers: some(&filter.customers),
            since_seconds: filter.since.map(|d| d.as_secs_f64()),
            ids: (!ids.is_empty()).then(|| ids.to_vec()),
        }
    }
}

/// The condition a failed row `o` must meet, binds $1..$4 in [`Binds`] order. A row with no
/// error code counts as `unknown`, as `status` shows it.
pub const MATCHES: &str = "($1::text[] IS NULL OR COALESCE(o.last_error_code, 'unknown') = ANY($1))
      AND ($2::text[] IS NULL OR o.customer_id = ANY($2))
      AND ($3::float8 IS NULL OR o.updated_at >= now() - $3 * interval '1 second')
      AND ($4::int8[] IS NULL OR o.id = ANY($4))";

/// Binds [`Binds`] to a statement that uses [`MATCHES`].
pub fn bind<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    b: &Binds,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    q.bind(b.codes.clone())
        .bind(b.customers.clone())
        .bind(b.since_seconds)
        .bind(b.ids.clone())
}

/// Failed rows matching `filter`, newest first, at most `limit`; read through the partial
/// index on failed rows, so the cost follows the dead letters, not the history.
pub async fn list(pool: &PgPool, filter: &FailedFilter, limit: u32) -> sqlx::Result<DeadLetters> {
    let sql = format!(
        "SELECT o.id, o.customer_id, COALESCE(o.last_error_code, 'unknown') AS error_code,
                o.last_error, o.last_http_status, o.attempts, o.updated_at,
                count(*) OVER () AS total
         FROM imprint_sync.customer_outbox o
         WHERE o.sync_status = 'failed' AND {MATCHES}
         ORDER BY o.updated_at DESC, o.id DESC
         LIMIT $5"
    );
    #[derive(FromRow)]
    struct Counted {
        #[sqlx(flatten)]
        row: DeadLetter,
        total: i64,
    }
    let found: Vec<Counted> = bind(
        sqlx::query_as(sqlx::AssertSqlSafe(sql)),
        &Binds::new(filter, &[]),
    )
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    let total = match found.first() {
        Some(c) => c.total,
        // The window count is lost with LIMIT 0 or past the last row: count alone.
        None if limit == 0 => count(pool, filter).await?,
        None => 0,
    };
    Ok(DeadLetters {
        total,
        rows: found.into_iter().map(|c| c.row).collect(),
    })
}

async fn count(pool: &PgPool, filter: &FailedFilter) -> sqlx::Result<i64> {
    let sql = format!(
        "SELECT count(*) FROM imprint_sync.customer_outbox o
         WHERE o.sync_status = 'failed' AND {MATCHES}"
    );
    let (n,): (i64,) = bind(
        sqlx::query_as(sqlx::AssertSqlSafe(sql)),
        &Binds::new(filter, &[]),
    )
    .fetch_one(pool)
    .await?;
    Ok(n)
}
