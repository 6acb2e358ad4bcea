//! One log line per burst: an event that repeats within an interval is counted, not logged, so
//! callers who trigger it on every request cannot flood the log. Shared by the attestor (why a
//! selector was left out) and the agent's connection limits (why a connection was refused).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a [`LogGate`] made with `default()` stays shut after it let a line through.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Lets one occurrence of an event be logged per interval and counts the rest.
#[derive(Debug)]
pub struct LogGate {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    held_back: u64,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

impl LogGate {
    /// A gate that opens at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(State::default()),
        }
    }

    /// `Some(n)` when this occurrence (at `now`) is to be logged, `n` being how many were held
    /// back since the last logged one; `None` when it is to be counted only.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        // The state is two plain values, valid after a panic anywhere.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let open = state
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if open {
            state.last = Some(now);
            Some(std::mem::take(&mut state.held_back))
        } else {
            state.held_back = state.held_back.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_one_line_through_per_interval_and_counts_the_rest() {
        let gate = LogGate::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(gate.admit(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(gate.admit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(gate.admit(t0 + Duration::from_secs(59)), None);
        assert_eq!(gate.admit(t0 + Duration::from_secs(60)), Some(1001));
        assert_eq!(gate.admit(t0 + Duration::from_secs(61)), None);
        assert_eq!(gate.admit(t0 + Duration::from_secs(200)), Some(1));
    }
}
