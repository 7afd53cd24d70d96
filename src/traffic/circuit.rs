//! The gate in front of the API: a circuit breaker for outages and a pause for a rejected
//! key. While it is shut, one probe at a time goes through; rows held back spend no attempt.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Admit;

#[derive(Debug, Clone, Copy)]
pub struct GateSettings {
    /// Consecutive retryable failures that open the circuit.
    pub failure_threshold: u32,
    /// First cool-down; doubles while probes fail, up to `max_cooldown`.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    /// How often a rejected key is tried again.
    pub auth_probe_interval: Duration,
}

impl Default for GateSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(30),
            auth_probe_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    Closed,
    /// Outage: shut until the cool-down ends, then one probe.
    CircuitOpen,
    /// 401/403: shut until the next auth probe.
    AuthPaused,
}

#[derive(Debug)]
pub struct Gate {
    settings: GateSettings,
    inner: Mutex<Inner>,
    changed: Notify,
}

#[derive(Debug)]
struct Inner {
    state: GateState,
    consecutive_failures: u32,
    reopen_at: Instant,
    cooldown: Duration,
    probe_in_flight: bool,
}

impl Gate {
    pub fn new(settings: GateSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: GateState::Closed,
                consecutive_failures: 0,
                reopen_at: Instant::now(),
                cooldown: settings.cooldown,
                probe_in_flight: false,
            }),
            changed: Notify::new(),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> GateState {
        self.inner().state
    }

    /// Waits until the gate lets a request through: `Go`, `Probe`, or `None` at `deadline`.
    pub async fn enter(&self, deadline: Instant) -> Option<Admit> {
        loop {
            let wait_until = {
                let mut g = self.inner();
                match g.state {
                    GateState::Closed => return Some(Admit::Go),
                    _ if !g.probe_in_flight && Instant::now() >= g.reopen_at => {
                        g.probe_in_flight = true;
                        return Some(Admit::Probe);
                    }
                    _ if g.probe_in_flight => deadline,
                    _ => g.reopen_at.min(deadline),
                }
            };
            if Instant::now() >= deadline {
                return None;
            }
            let notified = self.changed.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    /// A probe was never sent (its row gave up): let another one try.
    pub fn probe_abandoned(&self) {
        self.inner().probe_in_flight = false;
        self.changed.notify_waiters();
    }

    pub fn on_success(&self, probe: bool) {
        let mut g = self.inner();
        g.consecutive_failures = 0;
        if g.state != GateState::Closed && (probe || !g.probe_in_flight) {
            match g.state {
                GateState::AuthPaused => {
                    tracing::info!("the API key is accepted again; sending resumes")
                }
                _ => tracing::info!("the API answers again; circuit closed"),
            }
            g.state = GateState::Closed;
            g.cooldown = self.settings.cooldown;
            g.probe_in_flight = false;
            drop(g);
            self.changed.notify_waiters();
        }
    }

    pub fn on_failure(&self, probe: bool) {
        let mut g = self.inner();
        g.consecutive_failures += 1;
        let now = Instant::now();
        if probe {
            g.probe_in_flight = false;
            if g.state == GateState::CircuitOpen {
                g.cooldown = (g.cooldown * 2).min(self.settings.max_cooldown);
                g.reopen_at = now + g.cooldown;
            }
        } else if g.state == GateState::Closed
            && g.consecutive_failures >= self.settings.failure_threshold
        {
            g.state = GateState::CircuitOpen;
            g.cooldown = self.settings.cooldown;
            g.reopen_at = now + g.cooldown;
            tracing::warn!(
                consecutive_failures = g.consecutive_failures,
                cooldown_ms = g.cooldown.as_millis() as u64,
                "the API keeps failing; circuit open, sending paused"
            );
        }
    }

    /// A 429 answered the probe: not a failure, but wait as told before the next probe.
    pub fn on_rate_limited(&self, retry_after: Duration, probe: bool) {
        if probe {
            let mut g = self.inner();
            g.probe_in_flight = false;
            g.reopen_at = Instant::now() + retry_after;
        }
    }

    /// 401/403: pause everything; one error line per probe interval says why.
    pub fn on_auth_rejected(&self, status: u16, probe: bool) {
        let mut g = self.inner();
        let entering = g.state != GateState::AuthPaused;
        if !entering && !probe {
            return; // a request admitted before the pause: already reported
        }
        g.state = GateState::AuthPaused;
        g.probe_in_flight = false;
        g.reopen_at = Instant::now() + self.settings.auth_probe_interval;
        tracing::error!(
            http_status = status,
            probe_again_in_s = self.settings.auth_probe_interval.as_secs(),
            "the API key was rejected; check api.key (or api.key_file). Sending is paused; no row changes"
        );
    }

    /// Time until the gate may open (for the claimer, which waits instead of claiming).
    pub fn blocked_for(&self) -> Option<Duration> {
        let g = self.inner();
        if g.state == GateState::Closed {
            return None;
        }
        let now = Instant::now();
        Some(if g.reopen_at > now {
            g.reopen_at - now
        } else {
            Duration::ZERO
        })
    }
}
