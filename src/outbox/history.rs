//! One customer's story (`imprint-sync history`): its outbox rows, its attempts and its
//! sync state. Ids, states, codes and timings only: no personal column is ever selected.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool};

/// One outbox row of the customer, without its profile values.
#[derive(Debug, Clone, serde::Serialize, FromRow)]
pub struct HistoryRow {
    pub id: i64,
    pub status: String,
    pub enqueued_at: DateTime<Utc>,
    pub synced_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub error_code: Option<String>,
    pub superseded_by: Option<i64>,
}

/// One HTTP attempt for the customer.
#[derive(Debug, Clone, serde::Serialize, FromRow)]
pub struct Attempt {
    pub outbox_id: i64,
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i32,
    pub http_status: Option<i32>,
    pub outcome: String,
    pub error_code: Option<String>,
}

/// The customer's row of `customer_sync_state`, without the stored response (it holds
/// personal values).
#[derive(Debug, Clone, serde::Serialize, FromRow)]
pub struct SyncState {
    pub last_synced_outbox_id: i64,
    pub last_synced_at: DateTime<Utc>,
    pub imprint_updated_at: Option<DateTime<Utc>>,
    /// Card program -> OPEN/CLOSED, as Imprint answered.
    pub statuses: Option<serde_json::Value>,
    /// The fields whose returned value differed from what was sent (names only).
    pub drift: Option<serde_json::Value>,
}

/// Everything `history` shows, in the JSON shape it prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct History {
    pub customer_id: String,
    pub sync_state: Option<SyncState>,
    /// Every outbox row of the customer; `rows` holds the newest `--limit` of them.
    pub rows_total: i64,
    pub rows: Vec<HistoryRow>,
    pub attempts: Vec<Attempt>,
}

/// The states a row can be in, each matching the predicate of a partial index by customer
/// (no index holds every row).
const BY_STATE: [&str; 4] = [
    "sync_status = 'pending'",
    "sync_status = 'in_flight'",
    "sync_status = 'failed'",
    "sync_status IN ('synced', 'superseded')",
];

/// `SELECT {select} … WHERE customer_id = $1 AND <state> {rest}` for every state, joined by
/// `UNION ALL`.
fn each_state(select: &str, rest: &str) -> String {
    BY_STATE
        .iter()
        .map(|state| {
            format!(
                "(SELECT {select} FROM imprint_sync.customer_outbox
                  WHERE customer_id = $1 AND {state} {rest})"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// Reads a customer's newest `limit` rows and their attempts, oldest first; each read goes
/// through a per-customer index (or the attempts' outbox-id index, driven by those rows), so
/// a customer with a long history costs no more than `limit` rows per state.
pub async fn load(pool: &PgPool, customer_id: &str, limit: u32) -> sqlx::Result<History> {
    let newest = format!(
        "SELECT * FROM ({}) r ORDER BY id DESC LIMIT $2",
        each_state(
            "id, sync_status AS status, enqueued_at, synced_at, attempts,
             last_error_code AS error_code, superseded_by",
            "ORDER BY id DESC LIMIT $2"
        )
    );
    let mut rows: Vec<HistoryRow> = sqlx::query_as(sqlx::AssertSqlSafe(newest))
        .bind(customer_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.reverse();
    let count = format!(
        "SELECT sum(n)::int8 FROM ({}) c",
        each_state("count(*) AS n", "")
    );
    let rows_total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count))
        .bind(customer_id)
        .fetch_one(pool)
        .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    // By outbox id (indexed) and customer: attempts of rows already pruned are gone anyway.
    let attempts: Vec<Attempt> = sqlx::query_as(
        "SELECT outbox_id, attempt, started_at, duration_ms, http_status, outcome, error_code
         FROM imprint_sync.sync_attempts
         WHERE outbox_id = ANY($1) AND customer_id = $2
         ORDER BY started_at, id",
    )
    .bind(&ids)
    .bind(customer_id)
    .fetch_all(pool)
    .await?;
    // `drift` is the field names only: stored as an object of field -> something, or a list.
    let sync_state: Option<SyncState> = sqlx::query_as(
        "SELECT last_synced_outbox_id, last_synced_at, imprint_updated_at, statuses,
                CASE jsonb_typeof(drift)
                    WHEN 'object' THEN (SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(drift) k)
                    ELSE drift END AS drift
         FROM imprint_sync.customer_sync_state WHERE customer_id = $1",
    )
    .bind(customer_id)
    .fetch_optional(pool)
    .await?;
    Ok(History {
        customer_id: customer_id.to_owned(),
        sync_state,
        rows_total,
        rows,
        attempts,
    })
}
