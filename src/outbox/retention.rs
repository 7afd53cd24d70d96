//! Retention: finished rows and old attempts are deleted in bounded batches.

use super::store::Store;

impl Store {
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
