//! The gate in front of the API: a circuit breaker for outages and a pause for a rejected
//! key. While it is shut, one probe at a time goes through; rows held back spend no attempt.
//! Until an answer shows that the key is accepted (at start, and after an auth pause), requests
//! also go one at a time, so a wrong key costs one request, not a burst.

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
    /// 401/403 or a redirect ([`Refusal`]): shut until the next probe.
    AuthPaused,
}

/// An answer that no row can get past, for the operator to fix: sending pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401/403: the key was rejected.
    Key,
    /// 3xx: `api.base_url` does not point at the API.
    Redirect,
}

impl Refusal {
    /// What is wrong and which key to fix.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Key => {
                "the API key was rejected (401/403): check api.key (or api.key_file); sending is paused"
            }
            Refusal::Redirect => {
                "the API answered with a redirect (3xx): check api.base_url; sending is paused"
            }
        }
    }
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
    /// An answer has shown that the key is accepted; until then requests go one at a time.
    verified: bool,
    /// Why the gate is `AuthPaused`.
    refusal: Refusal,
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
                verified: false,
                refusal: Refusal::Key,
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

    /// Requests may go without waiting: closed, and the key known to be accepted.
    pub fn is_open(&self) -> bool {
        let g = self.inner();
        g.state == GateState::Closed && g.verified
    }

    /// Waits until the gate lets a request through: `Go`, `Probe`, or `None` at `deadline`.
    pub async fn enter(&self, deadline: Instant) -> Option<Admit> {
        loop {
            // Registered before the state is read, so a change in between is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait_until = {
                let mut g = self.inner();
                match g.state {
                    GateState::Closed if g.verified => return Some(Admit::Go),
                    _ if g.probe_in_flight => deadline,
                    GateState::Closed => {
                        g.probe_in_flight = true;
                        return Some(Admit::Probe);
                    }
                    _ if Instant::now() >= g.reopen_at => {
                        g.probe_in_flight = true;
                        return Some(Admit::Probe);
                    }
                    _ => g.reopen_at.min(deadline),
                }
            };
            if Instant::now() >= deadline {
                return None;
            }
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
        if g.state == GateState::Closed {
            if !g.verified {
                g.verified = true;
                if probe {
                    g.probe_in_flight = false;
                }
                drop(g);
                self.changed.notify_waiters();
            }
        } else if probe || !g.probe_in_flight {
            match g.state {
                GateState::AuthPaused => {
                    tracing::info!("the API key is accepted again; sending resumes")
                }
                _ => tracing::info!("the API answers again; circuit closed"),
            }
            g.state = GateState::Closed;
            g.verified = true;
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
        }
        match g.state {
            GateState::CircuitOpen if probe => {
                g.cooldown = (g.cooldown * 2).min(self.settings.max_cooldown);
                g.reopen_at = now + g.cooldown;
            }
            // A failure says nothing about the key: probe it again at the usual interval.
            GateState::AuthPaused if probe => {
                g.reopen_at = now + self.settings.auth_probe_interval;
            }
            GateState::Closed if g.consecutive_failures >= self.settings.failure_threshold => {
                g.state = GateState::CircuitOpen;
                g.cooldown = self.settings.cooldown;
                g.reopen_at = now + g.cooldown;
                tracing::warn!(
                    consecutive_failures = g.consecutive_failures,
                    cooldown_ms = crate::telemetry::ms(g.cooldown),
                    "the API keeps failing; circuit open, sending paused"
                );
            }
            _ => {}
        }
        drop(g);
        // Rows waiting for the probe's outcome look again (the next probe, or the new state).
        self.changed.notify_waiters();
    }

    /// A 429 answered the probe: not a failure, but wait as told before the next probe.
    pub fn on_rate_limited(&self, retry_after: Duration, probe: bool) {
        if probe {
            let mut g = self.inner();
            g.probe_in_flight = false;
            g.reopen_at = Instant::now() + retry_after;
            drop(g);
            self.changed.notify_waiters();
        }
    }

    /// The reason of an auth pause in force.
    pub fn refusal(&self) -> Option<Refusal> {
        let g = self.inner();
        (g.state == GateState::AuthPaused).then_some(g.refusal)
    }

    /// An answer no row can get past (a rejected key, a redirect): pause everything; one
    /// error line per probe interval says why and names the key to fix.
    pub fn on_refused(&self, refusal: Refusal, status: u16, probe: bool) {
        let mut g = self.inner();
        let entering = g.state != GateState::AuthPaused;
        if !entering && !probe {
            return; // a request admitted before the pause: already reported
        }
        g.state = GateState::AuthPaused;
        g.refusal = refusal;
        g.verified = false;
        g.probe_in_flight = false;
        g.reopen_at = Instant::now() + self.settings.auth_probe_interval;
        drop(g);
        self.changed.notify_waiters();
        tracing::error!(
            http_status = status,
            probe_again_in_s = self.settings.auth_probe_interval.as_secs(),
            "{}; no row changes",
            refusal.reason()
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn gate() -> Arc<Gate> {
        Arc::new(Gate::new(GateSettings::default()))
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(10)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3_600)
    }

    /// A request waiting at the gate (in a task of its own) until `deadline`.
    async fn waiting(g: &Arc<Gate>, deadline: Instant) -> tokio::task::JoinHandle<Option<Admit>> {
        let g = g.clone();
        let waiter = tokio::spawn(async move { g.enter(deadline).await });
        tokio::task::yield_now().await;
        waiter
    }

    /// A gate whose key has been shown to work.
    async fn verified() -> Arc<Gate> {
        let g = gate();
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        g.on_success(true);
        g
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_request_goes_alone_until_the_key_is_accepted() {
        let g = gate();
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        // Others wait for its answer.
        assert_eq!(g.enter(soon()).await, None);
        let waiter = waiting(&g, far()).await;
        g.on_success(true);
        assert_eq!(waiter.await.unwrap(), Some(Admit::Go));
        assert_eq!(g.enter(soon()).await, Some(Admit::Go));
        assert_eq!(g.state(), GateState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_first_request_hands_the_probe_to_the_next() {
        let g = gate();
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        let waiter = waiting(&g, far()).await;
        g.on_failure(true);
        assert_eq!(waiter.await.unwrap(), Some(Admit::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_after_n_failures_and_lets_one_probe_through() {
        let g = verified().await;
        for _ in 0..4 {
            g.on_failure(false);
        }
        assert_eq!(g.state(), GateState::Closed);
        g.on_failure(false);
        assert_eq!(g.state(), GateState::CircuitOpen);
        // Shut for the cool-down (1 s).
        assert_eq!(g.enter(soon()).await, None);
        assert!(g.blocked_for().is_some_and(|d| d <= Duration::from_secs(1)));
        let start = Instant::now();
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        assert!(start.elapsed() >= Duration::from_millis(900));
        // One probe at a time.
        let waiter = waiting(&g, far()).await;
        assert!(!waiter.is_finished());
        // The probe fails: the cool-down doubles, and the waiter becomes the next probe.
        let failed_at = Instant::now();
        g.on_failure(true);
        assert_eq!(g.state(), GateState::CircuitOpen);
        assert_eq!(waiter.await.unwrap(), Some(Admit::Probe));
        assert!(failed_at.elapsed() >= Duration::from_millis(1_900));
        // It succeeds: the circuit closes and everyone goes.
        g.on_success(true);
        assert_eq!(g.state(), GateState::Closed);
        assert_eq!(g.blocked_for(), None);
        assert_eq!(g.enter(soon()).await, Some(Admit::Go));
        assert_eq!(g.enter(soon()).await, Some(Admit::Go));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let g = verified().await;
        for _ in 0..4 {
            g.on_failure(false);
        }
        g.on_success(false);
        for _ in 0..4 {
            g.on_failure(false);
        }
        assert_eq!(g.state(), GateState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_another_try() {
        let g = verified().await;
        for _ in 0..5 {
            g.on_failure(false);
        }
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        assert_eq!(g.enter(soon()).await, None);
        g.probe_abandoned();
        assert_eq!(g.enter(soon()).await, Some(Admit::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_key_pauses_everything_but_one_probe_per_interval() {
        let g = verified().await;
        g.on_refused(Refusal::Key, 401, false);
        assert_eq!(g.state(), GateState::AuthPaused);
        // Requests already in flight report too: still one pause.
        g.on_refused(Refusal::Key, 401, false);
        assert_eq!(g.state(), GateState::AuthPaused);
        assert_eq!(g.enter(soon()).await, None);
        let start = Instant::now();
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        assert!(start.elapsed() >= Duration::from_millis(9_900));
        // Only the probe gets through.
        assert_eq!(g.enter(soon()).await, None);
        // Still rejected: wait another interval.
        g.on_refused(Refusal::Key, 401, true);
        assert_eq!(g.state(), GateState::AuthPaused);
        assert_eq!(g.enter(soon()).await, None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(g.enter(soon()).await, Some(Admit::Probe));
        // The key works again.
        g.on_success(true);
        assert_eq!(g.state(), GateState::Closed);
        assert_eq!(g.enter(soon()).await, Some(Admit::Go));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_first_request_pauses_at_once() {
        let g = gate();
        assert_eq!(g.enter(far()).await, Some(Admit::Probe));
        let waiter = waiting(&g, Instant::now() + Duration::from_secs(5)).await;
        g.on_refused(Refusal::Key, 403, true);
        assert_eq!(g.state(), GateState::AuthPaused);
        // The waiter is not let through; it gives up at its deadline (before the next probe).
        assert_eq!(waiter.await.unwrap(), None);
    }
}
