//! The outbox as one worker process sees it: the handle every statement goes through. The
//! statements live with their concern, each file holding its SQL and the Rust that binds it:
//! [`super::claim`] (which rows go next, under a lease), [`super::record`] (the write-back),
//! [`super::replay`], [`super::retention`], [`super::replicas`] and [`super::report`].

use sqlx::PgPool;

/// The outbox, seen by one worker process.
#[derive(Clone, Debug)]
pub struct Store {
    pub(super) pool: PgPool,
    pub(super) worker_id: String,
    pub(super) max_claims: u32,
}

/// `sync.max_claims` when not configured: claims of a row without an outcome before it is
/// set aside as `poison_row`.
pub const DEFAULT_MAX_CLAIMS: u32 = 3;

impl Store {
    pub fn new(pool: PgPool, worker_id: impl Into<String>) -> Self {
        Self {
            pool,
            worker_id: worker_id.into(),
            max_claims: DEFAULT_MAX_CLAIMS,
        }
    }

    /// Claims of a row without an outcome before it is set aside (`sync.max_claims`).
    pub fn with_max_claims(mut self, max_claims: u32) -> Self {
        self.max_claims = max_claims.max(1);
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }
}
