//! The codes and outcomes the daemon itself writes: `customer_outbox.last_error_code` and
//! `sync_attempts.error_code` / `outcome`. Each string is a contract (operators filter on it
//! with `failed --code`, docs/operations.md lists it), so each lives in exactly one `as_str`.
//! The API's own codes (`INVALID_REQUEST_ERROR`, `http_503`, `timeout`) pass through as text.

use std::fmt;

/// An error code of the daemon's own, as `last_error_code` and `sync_attempts.error_code`
/// hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The row cannot be mapped to a request; `last_error` names the field. No request.
    InvalidProfile,
    /// Retryable failures ran out (`sync.max_attempts`).
    MaxAttemptsExceeded,
    /// Claimed `sync.max_claims` times without an outcome: set aside by the claim (G4).
    PoisonRow,
    /// A 429, in the attempt log only (it spends no attempt).
    RateLimited,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 4] = [
        Self::InvalidProfile,
        Self::MaxAttemptsExceeded,
        Self::PoisonRow,
        Self::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidProfile => "invalid_profile",
            Self::MaxAttemptsExceeded => "max_attempts_exceeded",
            Self::PoisonRow => "poison_row",
            Self::RateLimited => "rate_limited",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one HTTP attempt came to, as `sync_attempts.outcome` holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx, read or not.
    Synced,
    /// A 429: sent again within the lease.
    RateLimited,
    /// A 3xx (a wrong `api.base_url`): the row went back untouched.
    Redirected,
    /// A 401/403: the row went back untouched.
    AuthRejected,
    /// A retryable failure (5xx, 408, 409, a timeout, a broken connection).
    Retry,
    /// A final refusal (400, 404, 422, other 4xx).
    Failed,
}

impl AttemptOutcome {
    pub const ALL: [AttemptOutcome; 6] = [
        Self::Synced,
        Self::RateLimited,
        Self::Redirected,
        Self::AuthRejected,
        Self::Retry,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Synced => "synced",
            Self::RateLimited => "rate_limited",
            Self::Redirected => "redirected",
            Self::AuthRejected => "auth_rejected",
            Self::Retry => "retry",
            Self::Failed => "failed",
        }
    }
}
