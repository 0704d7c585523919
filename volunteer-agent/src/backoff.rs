//! How long to wait before trying to reach the hub again.
//!
//! Exponential backoff with full jitter: the n-th wait is uniform in
//! `[0, min(max, initial * 2^n)]`. The jitter spreads a fleet of agents
//! reconnecting after a hub restart over the whole window instead of letting
//! them stampede the hub in lockstep; the cap keeps a volunteer's machine
//! from waiting ages once the hub is back.

use std::time::Duration;

/// The first backoff window.
pub(crate) const INITIAL: Duration = Duration::from_millis(500);

/// Exponential backoff with full jitter; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// The first window.
    initial: Duration,
    /// The largest window.
    max: Duration,
    /// The window the next wait is drawn from.
    window: Duration,
    /// The randomness source (seedable for tests).
    rng: fastrand::Rng,
}

impl Backoff {
    /// Backoff starting at [`INITIAL`] and doubling up to `max`.
    pub fn new(max: Duration) -> Self {
        Self::with_rng(INITIAL, max, fastrand::Rng::new())
    }

    /// Backoff with explicit bounds and randomness.
    fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            window: initial,
            rng,
        }
    }

    /// The next wait, and the window doubles (up to the maximum).
    pub fn next_delay(&mut self) -> Duration {
        let window = self.window;
        self.window = window.saturating_mul(2).min(self.max);
        let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// Back to the first window, after the hub welcomed the agent.
    pub fn reset(&mut self) {
        self.window = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(max: Duration) -> Backoff {
        Backoff::with_rng(INITIAL, max, fastrand::Rng::with_seed(7))
    }

    #[test]
    fn windows_double_up_to_the_cap() {
        let mut b = backoff(Duration::from_secs(5));
        let mut windows = Vec::new();
        for _ in 0..8 {
            windows.push(b.window);
            let d = b.next_delay();
            assert!(d <= *windows.last().unwrap(), "{d:?}");
        }
        let ms: Vec<u128> = windows.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 5000, 5000, 5000, 5000]);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = backoff(Duration::from_secs(60));
        for _ in 0..10 {
            b.next_delay();
        }
        assert_eq!(b.window, Duration::from_secs(60));
        b.reset();
        assert_eq!(b.window, INITIAL);
        assert!(b.next_delay() <= INITIAL);
    }

    #[test]
    fn jitter_spreads_over_the_whole_window() {
        let max = Duration::from_secs(8);
        let mut b = backoff(max);
        for _ in 0..10 {
            b.next_delay();
        }
        let samples: Vec<Duration> = (0..2000).map(|_| b.next_delay()).collect();
        assert!(samples.iter().all(|d| *d <= max));
        let low = samples.iter().filter(|d| **d < max / 4).count();
        let high = samples.iter().filter(|d| **d > max * 3 / 4).count();
        // Uniform: about a quarter each; far from all-equal or all-max.
        assert!((350..650).contains(&low), "{low}");
        assert!((350..650).contains(&high), "{high}");
        let mean = samples.iter().sum::<Duration>() / 2000;
        assert!(mean > max * 4 / 10 && mean < max * 6 / 10, "{mean:?}");
    }

    #[test]
    fn max_below_initial_caps_the_first_window() {
        let mut b = Backoff::with_rng(
            INITIAL,
            Duration::from_millis(100),
            fastrand::Rng::with_seed(1),
        );
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
    }
}
