//! The outbox row as the daemon reads it.

use chrono::{DateTime, Utc};
use serde_json::Value;

/// A claimed outbox row: the partner-written profile columns plus what the engine needs.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub customer_id: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub preferred_language: Option<String>,
    pub street_line1: Option<String>,
    pub street_line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
    pub account_tenure: Option<i32>,
    pub ltv_amount: Option<i64>,
    pub ltv_currency: Option<String>,
    pub loyalty_tier: Option<String>,
    pub account_created_at: Option<DateTime<Utc>>,
    pub transaction_count: Option<i64>,
    pub metadata: Option<Value>,
    /// Retryable failures so far.
    pub attempts: i32,
    /// The claim's lease end: also the claim's token, so an outcome is written back only to
    /// the claim it belongs to (`None` for rows read without claiming).
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// A column that could not be read safely (too large, out of range, unparsable JSON):
    /// the row fails alone, naming it, instead of stopping the claim (G7).
    #[sqlx(skip)]
    pub defect: Option<Defect>,
}

/// Why a row's column could not be read (never its value).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Defect {
    pub column: &'static str,
    pub reason: String,
}

/// The row's sync state (`customer_outbox.sync_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStatus {
    Pending,
    InFlight,
    Synced,
    Failed,
    Superseded,
}

impl SyncStatus {
    pub const ALL: [SyncStatus; 5] = [
        Self::Pending,
        Self::InFlight,
        Self::Synced,
        Self::Failed,
        Self::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::Synced => "synced",
            Self::Failed => "failed",
            Self::Superseded => "superseded",
        }
    }
}
