//! The live replicas: heartbeats, joins and leaves (each replica takes its share of the rate).

use chrono::{DateTime, Utc};

use super::store::Store;

/// A live replica, as `status` lists it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
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
        Ok(u32::try_from(live.max(1)).unwrap_or(u32::MAX))
    }

    /// Tells the other replicas that this one joined: they count the live replicas again.
    pub async fn announce(&self) -> sqlx::Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::outbox::WORKERS_CHANNEL)
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
        .bind(crate::outbox::WORKERS_CHANNEL)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
