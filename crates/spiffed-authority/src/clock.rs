//! The time the authority reads: every validity decision (which CA may sign, whether a cached
//! SVID may still be handed out, when to rotate) asks a [`Clock`], so tests can make the clock
//! jump forward past every CA's expiry or back before its notBefore.

use std::sync::Arc;
use std::time::SystemTime;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The clock the authority uses unless told otherwise.
pub(crate) fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Mutex;
    use std::time::SystemTime;

    use super::Clock;

    /// A clock that stands still until a test moves it.
    #[derive(Debug)]
    pub(crate) struct ManualClock(Mutex<SystemTime>);

    impl ManualClock {
        pub(crate) fn new(t: SystemTime) -> Self {
            Self(Mutex::new(t))
        }

        pub(crate) fn set(&self, t: SystemTime) {
            *self.0.lock().unwrap() = t;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }
}
