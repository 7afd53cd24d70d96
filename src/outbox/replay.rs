//! `run --replay-failed`: failed rows back to `pending`, with the dead-letter filters.

use super::dead_letters::{self, Binds, DeadLetter, MATCHES, PERSONAL};
use super::store::Store;

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

impl Store {
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
}
