//! What becomes of a row after an answer: one pure function of the answer, the attempt and
//! the retry policy, so the engine's whole policy reads as one table (`tests/fate.rs`).
//! `classify` says what an answer means; this says what the row does about it.

use std::time::Duration;

use super::EngineSettings;
use crate::imprint::error::Answer;
use crate::outbox::outcome::AttemptOutcome;
use crate::traffic::retry;

/// The settings a row's fate depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts (retryable failures included) before a row fails (`sync.max_attempts`).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// The quiet period after a request that got no answer (`api.timeout_ms`, G2).
    pub request_timeout: Duration,
}

impl Policy {
    pub fn from_settings(s: &EngineSettings) -> Self {
        Self {
            max_attempts: s.max_attempts,
            backoff_base: s.backoff_base,
            backoff_max: s.backoff_max,
            request_timeout: s.request_timeout,
        }
    }
}

/// What becomes of a row after one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// `synced`: final (an accepted answer that could not be read too).
    Synced,
    /// A 429: no attempt is spent; the row waits inside its lease for the gate and is sent
    /// again.
    SendAgain,
    /// Back to `pending` untouched, and sending pauses: no row gets past this answer (a
    /// rejected key, a redirect).
    Release,
    /// Back to `pending`, an attempt spent, due again after a delay drawn uniformly in
    /// `[0, up_to]` (full jitter). `hold`: the customer's quiet period (G2).
    Retry {
        up_to: Duration,
        hold: Option<Duration>,
    },
    /// `failed`, an attempt spent, final until replayed. `gave_up`: retryable failures ran
    /// out (`max_attempts_exceeded`) rather than the API refusing the row.
    Failed {
        gave_up: bool,
        hold: Option<Duration>,
    },
}

/// The fate of a row whose `attempt`-th request (1 for the first) got `answer`.
pub fn decide(answer: &Answer, attempt: u32, policy: &Policy) -> Fate {
    match answer {
        Answer::Synced { .. } | Answer::Accepted { .. } => Fate::Synced,
        Answer::RateLimited { .. } => Fate::SendAgain,
        Answer::AuthRejected { .. } | Answer::Redirected { .. } => Fate::Release,
        Answer::Failed { .. } => Fate::Failed {
            gave_up: false,
            hold: None,
        },
        Answer::Retry { status, .. } => {
            // No answer (a timeout, a broken connection): the request may still be applied,
            // so the customer gets a quiet period before anything newer (G2).
            let hold = status.is_none().then_some(policy.request_timeout);
            if attempt >= policy.max_attempts {
                Fate::Failed {
                    gave_up: true,
                    hold,
                }
            } else {
                Fate::Retry {
                    up_to: retry::ceiling(attempt, policy.backoff_base, policy.backoff_max),
                    hold,
                }
            }
        }
    }
}

/// How an attempt that got `answer` is logged in `sync_attempts`.
pub fn logged_as(answer: &Answer) -> AttemptOutcome {
    match answer {
        Answer::Synced { .. } | Answer::Accepted { .. } => AttemptOutcome::Synced,
        Answer::RateLimited { .. } => AttemptOutcome::RateLimited,
        Answer::Redirected { .. } => AttemptOutcome::Redirected,
        Answer::AuthRejected { .. } => AttemptOutcome::AuthRejected,
        Answer::Retry { .. } => AttemptOutcome::Retry,
        Answer::Failed { .. } => AttemptOutcome::Failed,
    }
}
