//! The token bucket (governor) with an adjustable rate: the deployment's rate divided by the
//! live replicas, lowered multiplicatively after a 429 and won back additively.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// Lowest share of the target rate AIMD may fall to.
const FLOOR: f64 = 0.05;
/// Multiplicative decrease on a 429.
const DECREASE: f64 = 0.5;
/// Additive increase per second without a 429, as a share of the target.
const INCREASE: f64 = 0.05;

#[derive(Debug)]
pub struct AdaptiveRate {
    configured: f64,
    burst: u32,
    inner: Mutex<State>,
}

#[derive(Debug)]
struct State {
    replicas: u32,
    /// Share of the target now in force (AIMD), in `[FLOOR, 1]`.
    factor: f64,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The rate `limiter` was built for.
    rate: f64,
    paused_until: Option<Instant>,
    last_decrease: Option<Instant>,
    last_increase: Instant,
}

fn limiter(rate: f64, burst: u32) -> Arc<DefaultDirectRateLimiter> {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let burst = NonZeroU32::new(burst.max(1)).expect("max(1)");
    let quota = Quota::with_period(period)
        .expect("period > 0")
        .allow_burst(burst);
    let l = RateLimiter::direct(quota);
    // A new bucket starts full; drain it, so a rate change never grants a fresh burst.
    let _ = l.check_n(burst);
    Arc::new(l)
}

impl AdaptiveRate {
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        Self {
            configured: requests_per_second,
            burst,
            inner: Mutex::new(State {
                replicas: 1,
                factor: 1.0,
                limiter: Arc::new(RateLimiter::direct(
                    Quota::with_period(Duration::from_secs_f64(1.0 / requests_per_second))
                        .expect("period > 0")
                        .allow_burst(NonZeroU32::new(burst.max(1)).expect("max(1)")),
                )),
                rate: requests_per_second,
                paused_until: None,
                last_decrease: None,
                last_increase: Instant::now(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This replica's share of the deployment's rate, before AIMD.
    pub fn target(&self) -> f64 {
        self.configured / f64::from(self.state().replicas.max(1))
    }

    /// The rate in force now (requests per second).
    pub fn effective(&self) -> f64 {
        self.state().rate
    }

    /// Live replicas changed: this one's share changes with them.
    pub fn set_replicas(&self, replicas: u32) {
        let mut s = self.state();
        if s.replicas != replicas.max(1) {
            s.replicas = replicas.max(1);
            self.rebuild(&mut s);
        }
    }

    fn rebuild(&self, s: &mut State) {
        let replicas = f64::from(s.replicas);
        let rate = self.configured / replicas * s.factor;
        let burst = (f64::from(self.burst) / replicas).ceil() as u32;
        if (rate - s.rate).abs() > f64::EPSILON {
            s.limiter = limiter(rate, burst);
            s.rate = rate;
        }
    }

    /// Waits for a token; false when `deadline` comes first.
    pub async fn until_ready(&self, deadline: Instant) -> bool {
        loop {
            let (limiter, paused) = {
                let s = self.state();
                (s.limiter.clone(), s.paused_until)
            };
            if let Some(until) = paused.filter(|u| *u > Instant::now()) {
                if until > deadline {
                    return false;
                }
                tokio::time::sleep_until(until).await;
                continue;
            }
            match limiter.check() {
                Ok(()) => return true,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    let at = Instant::now() + wait;
                    if at > deadline {
                        return false;
                    }
                    tokio::time::sleep_until(at).await;
                }
            }
        }
    }

    /// A 429: pause every sender for `retry_after`, and lower the rate (at most once per
    /// pause, so a volley of 429s from requests already in flight counts once).
    pub fn on_rate_limited(&self, retry_after: Duration) {
        let now = Instant::now();
        let mut s = self.state();
        let until = now + retry_after;
        s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
        let recent = s
            .last_decrease
            .is_some_and(|t| now.duration_since(t) < retry_after.max(Duration::from_secs(1)));
        if !recent {
            s.factor = (s.factor * DECREASE).max(FLOOR);
            s.last_decrease = Some(now);
            s.last_increase = now;
            self.rebuild(&mut s);
        }
    }

    /// A request went through: win the rate back, a step per second.
    pub fn on_success(&self) {
        let now = Instant::now();
        let mut s = self.state();
        if s.factor < 1.0 && now.duration_since(s.last_increase) >= Duration::from_secs(1) {
            s.factor = (s.factor + INCREASE).min(1.0);
            s.last_increase = now;
            self.rebuild(&mut s);
        }
    }

    /// Time left of a 429 pause.
    pub fn paused_for(&self) -> Option<Duration> {
        let until = self.state().paused_until?;
        let now = Instant::now();
        (until > now).then(|| until - now)
    }
}
