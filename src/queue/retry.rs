//! Retry policy: exponential backoff with jitter (through `backon`, the maintained
//! successor of `backoff`), persisted by the store as the job's `run_at`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How failed attempts are spaced out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub min_delay: Duration,
    /// Longest delay.
    pub max_delay: Duration,
    /// Growth per attempt.
    pub factor: f32,
    /// Randomise delays so retries of many jobs do not align.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(300),
            factor: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Delay after the `attempt`-th failed attempt (1-based).
    pub fn delay_after(&self, attempt: i64) -> Duration {
        let n = attempt.clamp(1, 64) as usize;
        let mut builder = ExponentialBuilder::new()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .with_max_times(n);
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder.build().nth(n - 1).unwrap_or(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay_after(1), Duration::from_secs(2));
        assert_eq!(p.delay_after(2), Duration::from_secs(4));
        assert_eq!(p.delay_after(3), Duration::from_secs(8));
        assert_eq!(p.delay_after(30), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_one_extra_step() {
        let p = RetryPolicy::default();
        for attempt in 1..6 {
            let d = p.delay_after(attempt);
            let base = Duration::from_secs(2u64 << (attempt - 1));
            assert!(d >= base && d <= base * 2, "attempt {attempt}: {d:?}");
        }
    }
}
