//! The label values of the daemon's counters: one enum per label, one string per variant,
//! and the one place each counter is incremented. Below the engine and the admin server,
//! which both use them.

/// What became of a row: the `outcome` label of `imprint_sync_rows_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    Synced,
    Failed,
    Superseded,
    /// A retryable failure, scheduled again.
    Retried,
    /// The row could not be mapped (`failed` / `invalid_profile`).
    Invalid,
}

impl RowOutcome {
    pub const ALL: [RowOutcome; 5] = [
        Self::Synced,
        Self::Failed,
        Self::Superseded,
        Self::Retried,
        Self::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synced => "synced",
            Self::Failed => "failed",
            Self::Superseded => "superseded",
            Self::Retried => "retried",
            Self::Invalid => "invalid",
        }
    }

    /// Counts `rows` rows with this outcome.
    pub fn count(self, rows: u64) {
        metrics::counter!("imprint_sync_rows_total", "outcome" => self.as_str()).increment(rows);
    }
}

/// The class of an answer: the `status` label of `imprint_sync_http_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpClass {
    Success,
    Redirect,
    ClientError,
    ServerError,
    RateLimited,
    Timeout,
    /// No answer other than a timeout: a connection error, a body cut short.
    Error,
}

impl HttpClass {
    pub const ALL: [HttpClass; 7] = [
        Self::Success,
        Self::Redirect,
        Self::ClientError,
        Self::ServerError,
        Self::RateLimited,
        Self::Timeout,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "2xx",
            Self::Redirect => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
            Self::RateLimited => "429",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }

    /// Counts `requests` requests of this class.
    pub fn count(self, requests: u64) {
        metrics::counter!("imprint_sync_http_requests_total", "status" => self.as_str())
            .increment(requests);
    }
}
