//! The token bucket (governor) with an adjustable rate: the deployment's rate divided by the
//! live replicas, lowered multiplicatively after a 429 and won back in steps relative to the
//! rate in force: quickly while far below the rate that last met a 429, slowly near it. A
//! step relative to the *configured* rate would, with a configured rate far above the API's
//! real limit, jump over the limit every second or two.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

/// Lowest rate AIMD may fall to (requests per second), whatever the target. A floor as a
/// share of the target instead would, with a configured rate far above the API's limit (1e6
/// against 100/s), stay above the limit for good and meet a 429 every pause.
const FLOOR_RATE: f64 = 1.0;
/// Multiplicative decrease on a 429.
const DECREASE: f64 = 0.5;
/// Increase per second without a 429, as a share of the rate in force, while well below the
/// rate that last met a 429 (or far above it, when the limit seems to have moved).
const INCREASE_FAR: f64 = 0.10;
/// The same near that rate (from `NEAR` of it to `PAST` of it): probe the limit rarely.
const INCREASE_NEAR: f64 = 0.005;
const NEAR: f64 = 0.8;
const PAST: f64 = 1.1;

/// governor on tokio's clock: the bucket and the sleeps that wait for it read the same time
/// (and tests with paused time see the bucket refill as time advances).
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

#[derive(Debug)]
pub struct AdaptiveRate {
    configured: f64,
    burst: u32,
    inner: Mutex<State>,
}

#[derive(Debug)]
struct State {
    replicas: u32,
    /// Share of the target now in force (AIMD), in `[floor, 1]`.
    factor: f64,
    limiter: Arc<Limiter>,
    clock: TokioClock,
    /// The rate `limiter` was built for.
    rate: f64,
    paused_until: Option<Instant>,
    /// The share in force when the last 429 came: the limit is below it.
    limited_at: Option<f64>,
    last_decrease: Option<Instant>,
    last_increase: Instant,
}

/// A bucket for `rate` per second holding `burst`, empty, so that a start or a rate change
/// never grants a fresh burst.
fn limiter(rate: f64, burst: u32, clock: TokioClock) -> Arc<Limiter> {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001)).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst.max(1)).expect("max(1)");
    let quota = Quota::with_period(period)
        .expect("period > 0")
        .allow_burst(burst);
    let l = RateLimiter::direct_with_clock(quota, clock);
    let _ = l.check_n(burst);
    Arc::new(l)
}

impl AdaptiveRate {
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        let clock = TokioClock {
            origin: Instant::now(),
        };
        Self {
            configured: requests_per_second,
            burst,
            inner: Mutex::new(State {
                replicas: 1,
                factor: 1.0,
                // Empty at start: replicas that start together do not each send a full
                // burst before they have counted one another.
                limiter: limiter(requests_per_second, burst, clock),
                clock,
                rate: requests_per_second,
                paused_until: None,
                limited_at: None,
                last_decrease: None,
                last_increase: Instant::now(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This replica's share of the deployment's rate, before AIMD.
    #[cfg(test)]
    fn target(&self) -> f64 {
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
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "at most the configured burst (replicas is at least 1)"
        )]
        let burst = (f64::from(self.burst) / replicas).ceil() as u32;
        if (rate - s.rate).abs() > f64::EPSILON {
            s.limiter = limiter(rate, burst, s.clock);
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
                    let wait = not_until.wait_time_from(limiter.clock().now());
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
            s.limited_at = Some(s.factor);
            s.factor = (s.factor * DECREASE).max(self.floor(s.replicas));
            s.last_decrease = Some(now);
            s.last_increase = now;
            self.rebuild(&mut s);
        }
    }

    /// The lowest share of the target: [`FLOOR_RATE`], or the whole target if below it.
    fn floor(&self, replicas: u32) -> f64 {
        let target = self.configured / f64::from(replicas.max(1));
        (FLOOR_RATE / target).min(1.0)
    }

    /// A request went through: win the rate back, a step per second, relative to the rate in
    /// force.
    pub fn on_success(&self) {
        let now = Instant::now();
        let mut s = self.state();
        if s.factor < 1.0 && now.duration_since(s.last_increase) >= Duration::from_secs(1) {
            let near = s
                .limited_at
                .is_some_and(|at| s.factor >= at * NEAR && s.factor < at * PAST);
            if s.limited_at.is_some_and(|at| s.factor >= at * PAST) {
                s.limited_at = None; // well past it without a 429: the limit has moved
            }
            let step = if near { INCREASE_NEAR } else { INCREASE_FAR };
            s.factor = (s.factor * (1.0 + step)).min(1.0);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn approx(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_rate_once_per_pause() {
        let rate = AdaptiveRate::new(100.0, 10);
        rate.on_rate_limited(Duration::from_secs(1));
        assert!(approx(rate.effective(), 50.0), "{}", rate.effective());
        // The volley of 429s answering requests already in flight counts once.
        for _ in 0..20 {
            rate.on_rate_limited(Duration::from_secs(1));
        }
        assert!(approx(rate.effective(), 50.0), "{}", rate.effective());
        assert!(rate.paused_for().is_some());
        // A 429 after the pause is news: halve again.
        tokio::time::advance(Duration::from_millis(1_100)).await;
        assert_eq!(rate.paused_for(), None);
        rate.on_rate_limited(Duration::from_secs(1));
        assert!(approx(rate.effective(), 25.0), "{}", rate.effective());
        // Never below the floor.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(1_100)).await;
            rate.on_rate_limited(Duration::from_secs(1));
        }
        assert!(approx(rate.effective(), FLOOR_RATE), "{}", rate.effective());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_won_back_step_by_step_up_to_the_target() {
        let rate = AdaptiveRate::new(100.0, 10);
        rate.on_rate_limited(Duration::from_secs(1));
        assert!(approx(rate.effective(), 50.0));
        // Successes within the same second do not add up.
        for _ in 0..100 {
            rate.on_success();
        }
        assert!(approx(rate.effective(), 50.0), "{}", rate.effective());
        // A step is relative to the rate in force: 10 % while far below the rate that met
        // the 429, 0.5 % near it.
        tokio::time::advance(Duration::from_secs(1)).await;
        rate.on_success();
        assert!(approx(rate.effective(), 55.0), "{}", rate.effective());
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            rate.on_success();
        }
        assert!(
            approx(rate.effective(), 50.0 * 1.1f64.powi(5)),
            "{}",
            rate.effective()
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        rate.on_success();
        assert!(
            approx(rate.effective(), 50.0 * 1.1f64.powi(5) * 1.005),
            "{}",
            rate.effective()
        );
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            rate.on_success();
        }
        assert!(
            approx(rate.effective(), 100.0),
            "capped at the target: {}",
            rate.effective()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_share_the_configured_rate() {
        let rate = AdaptiveRate::new(80.0, 10);
        assert!(approx(rate.target(), 80.0));
        rate.set_replicas(2);
        assert!(approx(rate.target(), 40.0));
        assert!(approx(rate.effective(), 40.0));
        rate.set_replicas(4);
        assert!(approx(rate.effective(), 20.0));
        // AIMD applies to the share.
        rate.on_rate_limited(Duration::from_secs(1));
        assert!(approx(rate.effective(), 10.0));
        rate.set_replicas(1);
        assert!(approx(rate.effective(), 40.0));
        // Zero live replicas cannot happen (we are one); it counts as one.
        rate.set_replicas(0);
        assert!(approx(rate.target(), 80.0));
    }

    /// Tokens taken over `span` of (paused) time.
    async fn tokens_in(rate: &AdaptiveRate, span: Duration) -> u32 {
        let end = Instant::now() + span;
        let mut n = 0;
        while rate.until_ready(end).await {
            n += 1;
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_paces_requests_at_the_rate_in_force() {
        let rate = AdaptiveRate::new(50.0, 5);
        // An empty bucket at start, then 50 per second.
        let n = tokens_in(&rate, Duration::from_secs(2)).await;
        assert!((99..=101).contains(&n), "{n}");
        // A quiet spell fills it up to the burst.
        tokio::time::advance(Duration::from_secs(10)).await;
        let n = tokens_in(&rate, Duration::from_millis(100)).await;
        assert!((9..=11).contains(&n), "5 at once, then 5 in 0.1 s: {n}");
        // Two replicas: 25 per second each, and no fresh burst on the change (the old bucket
        // was full).
        tokio::time::advance(Duration::from_secs(10)).await;
        rate.set_replicas(2);
        let n = tokens_in(&rate, Duration::from_secs(2)).await;
        assert!((49..=51).contains(&n), "{n}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pause_holds_every_sender() {
        let rate = AdaptiveRate::new(100.0, 10);
        let start = Instant::now();
        rate.on_rate_limited(Duration::from_secs(2));
        // A deadline inside the pause: give up at once rather than hold the row.
        assert!(!rate.until_ready(start + Duration::from_secs(1)).await);
        assert!(rate.until_ready(start + Duration::from_secs(5)).await);
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    /// Far above the API's real limit (5,000/s configured, the API takes 100/s) the rate
    /// settles under the limit and probes over it rarely, not every few seconds.
    #[tokio::test(start_paused = true)]
    async fn far_above_the_apis_limit_the_rate_settles() {
        settles_under_the_limit(5_000.0).await;
    }

    /// The bounds of the configured rate: 1e6 per second (ten thousand times the API's limit)
    /// settles as well, and 1 per second is never lowered under 1 per second.
    #[tokio::test(start_paused = true)]
    async fn a_rate_of_a_million_settles_and_a_rate_of_one_stays() {
        settles_under_the_limit(1e6).await;
        let one = AdaptiveRate::new(1.0, 1);
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(1_100)).await;
            one.on_rate_limited(Duration::from_secs(1));
        }
        assert!(approx(one.effective(), 1.0), "{}", one.effective());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            one.until_ready(Instant::now() + Duration::from_secs(2))
                .await
        );
    }

    async fn settles_under_the_limit(configured: f64) {
        const LIMIT: f64 = 100.0;
        let rate = AdaptiveRate::new(configured, 10);
        let start = Instant::now();
        let mut limited_at = Vec::new();
        // Every 100 ms the sender learns one answer: 429 while it sends faster than the API
        // takes, a success otherwise.
        for _ in 0..3_000 {
            tokio::time::advance(Duration::from_millis(100)).await;
            if rate.paused_for().is_some() {
                continue;
            }
            if rate.effective() > LIMIT {
                rate.on_rate_limited(Duration::from_secs(1));
                limited_at.push(start.elapsed().as_secs());
            } else {
                rate.on_success();
            }
        }
        let late: Vec<u64> = limited_at.iter().copied().filter(|t| *t >= 120).collect();
        eprintln!(
            "{configured}/s against a 100/s limit: 429s at {limited_at:?} s, ending at {:.1}/s",
            rate.effective()
        );
        assert!(late.len() <= 6, "429s at {limited_at:?} s");
        assert!(
            late.windows(2).all(|w| w[1] - w[0] >= 20),
            "probes over the limit closer than 20 s: {late:?}"
        );
        assert!(
            rate.effective() >= 0.4 * LIMIT,
            "settled near the limit, not at the floor: {}",
            rate.effective()
        );
    }
}
