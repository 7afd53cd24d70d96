//! The retry policy of a row: capped exponential backoff with full jitter.

use std::time::Duration;

/// Delay before the next try after `attempts` retryable failures (1 for the first):
/// uniform in `[0, ceiling(attempts, base, max)]` ("full jitter").
pub fn backoff(attempts: u32, base: Duration, max: Duration) -> Duration {
    jitter(ceiling(attempts, base, max))
}

/// The longest delay after `attempts` retryable failures: `min(max, base * 2^(attempts-1))`.
pub fn ceiling(attempts: u32, base: Duration, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exp).min(max)
}

/// A delay drawn uniformly in `[0, ceiling]`, to the millisecond.
pub fn jitter(ceiling: Duration) -> Duration {
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::random_range(0..=ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_the_exponential_ceiling_and_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_millis(1_000);
        for attempts in 1..40 {
            let ceiling = (100u64 << (attempts - 1).min(30)).min(1_000);
            for _ in 0..50 {
                let d = backoff(attempts, base, max);
                assert!(
                    d <= Duration::from_millis(ceiling),
                    "attempt {attempts}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let base = Duration::from_millis(1_000);
        let max = Duration::from_secs(60);
        let draws: std::collections::HashSet<_> = (0..50).map(|_| backoff(5, base, max)).collect();
        assert!(
            draws.len() > 10,
            "full jitter spreads the delays: {draws:?}"
        );
    }
}
