//! Traffic control: the rate limit (shared by the deployment), 429 pauses with AIMD, the
//! circuit breaker and the auth pause. Workers ask [`Traffic::admit`] before each request
//! and tell [`Traffic::report`] what came back.

pub mod circuit;
pub mod rate;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::imprint::error::Answer;
pub use circuit::{Gate, GateState, Refusal};
pub use rate::AdaptiveRate;

/// May this request go?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Send it.
    Go,
    /// Send it as the one probe of an open circuit or an auth pause.
    Probe,
    /// The row's lease would run out before the request could finish: give the row back.
    GiveUp,
}

/// All traffic control of one process.
#[derive(Debug)]
pub struct Traffic {
    pub rate: AdaptiveRate,
    pub gate: Gate,
}

/// The rate of the whole deployment (`rate_limit.*`), shared by the live replicas.
/// `Settings::traffic` builds it from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct TrafficSettings {
    pub requests_per_second: f64,
    pub burst: u32,
}

impl Traffic {
    pub fn new(settings: TrafficSettings) -> Arc<Self> {
        Arc::new(Self {
            rate: AdaptiveRate::new(settings.requests_per_second, settings.burst),
            gate: Gate::new(circuit::GateSettings::default()),
        })
    }

    /// Waits until a request may be sent, or gives up at `deadline`.
    pub async fn admit(&self, deadline: Instant) -> Admit {
        loop {
            let admit = match self.gate.enter(deadline).await {
                Some(a) => a,
                None => return Admit::GiveUp,
            };
            if !self.rate.until_ready(deadline).await {
                if admit == Admit::Probe {
                    self.gate.probe_abandoned();
                }
                return Admit::GiveUp;
            }
            // The gate may have shut while this request waited for its token (an outage or a
            // rejected key met by others): then it waits at the gate again, and the rows
            // queued for tokens do not all go out into the outage.
            if admit == Admit::Probe || self.gate.is_open() {
                return admit;
            }
        }
    }

    /// Learns from an answer: 429 slows the sender; failures feed the circuit.
    pub fn report(&self, answer: &Answer, probe: bool) {
        match answer {
            Answer::RateLimited { retry_after } => {
                self.rate.on_rate_limited(*retry_after);
                self.gate.on_rate_limited(*retry_after, probe);
            }
            // An answer that cannot be verified is still an answer: the API is up.
            Answer::Synced { .. } | Answer::Accepted { .. } | Answer::Failed { .. } => {
                self.rate.on_success();
                self.gate.on_success(probe);
            }
            Answer::Retry { .. } => self.gate.on_failure(probe),
            Answer::AuthRejected { status, .. } => {
                self.gate.on_refused(Refusal::Key, *status, probe)
            }
            Answer::Redirected { status, .. } => {
                self.gate.on_refused(Refusal::Redirect, *status, probe)
            }
        }
    }

    /// Why sending is paused for the operator to fix (for `/readyz`), if it is.
    pub fn pause_reason(&self) -> Option<&'static str> {
        self.gate.refusal().map(Refusal::reason)
    }

    /// A pause (429, open circuit, auth) is in force: claiming more rows would only hold them.
    pub fn paused_for(&self) -> Option<Duration> {
        let gate = self.gate.blocked_for();
        let rate = self.rate.paused_for();
        match (gate, rate) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imprint::error::ApiError;

    fn traffic() -> Traffic {
        Traffic {
            rate: AdaptiveRate::new(100.0, 10),
            gate: Gate::new(circuit::GateSettings::default()),
        }
    }

    /// An accepted answer that cannot be read says the API is up: it never opens the circuit,
    /// as the same number of failures would.
    #[tokio::test(start_paused = true)]
    async fn unverifiable_answers_never_open_the_circuit() {
        let t = traffic();
        let accepted = Answer::Accepted {
            status: 204,
            error: ApiError::new("unverified_response", "HTTP 204 with an empty body"),
        };
        for _ in 0..20 {
            t.report(&accepted, false);
        }
        assert_eq!(t.gate.state(), GateState::Closed);
        let failed = Answer::Retry {
            status: Some(500),
            error: ApiError::new("http_500", "HTTP 500"),
        };
        for _ in 0..5 {
            t.report(&failed, false);
        }
        assert_eq!(t.gate.state(), GateState::CircuitOpen, "the control case");
    }

    /// A redirect pauses sending like a rejected key, and the reason names `api.base_url`.
    #[tokio::test(start_paused = true)]
    async fn a_redirect_pauses_sending_naming_the_base_url() {
        let t = traffic();
        assert_eq!(t.pause_reason(), None);
        let redirected = Answer::Redirected {
            status: 302,
            error: ApiError::new("http_302", "HTTP 302"),
        };
        t.report(&redirected, true);
        assert_eq!(t.gate.state(), GateState::AuthPaused);
        assert!(t.paused_for().is_some());
        assert!(t.pause_reason().is_some_and(|r| r.contains("api.base_url")));
        let rejected = Answer::AuthRejected {
            status: 401,
            error: ApiError::new("http_401", "HTTP 401"),
        };
        t.report(&rejected, true);
        assert!(t.pause_reason().is_some_and(|r| r.contains("api.key")));
    }
}
