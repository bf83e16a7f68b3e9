//! The one place ubsync and its simulators read the time.
//!
//! Everything that needs "now" takes a [`Clock`]; the pure core takes `now` as an argument. Tests
//! and `ubsync demo` use [`Clock::manual`] so that time moves only when they say so, which keeps
//! them deterministic without sleeping. Production uses [`Clock::system`].

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};

/// A source of the current instant: the system clock, or a manual one that tests advance.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl Clock {
    /// The real wall clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock frozen at `at` until [`Clock::advance`] or [`Clock::set`] moves it.
    pub fn manual(at: DateTime<Utc>) -> Self {
        Self {
            manual: Some(Arc::new(Mutex::new(at))),
        }
    }

    /// The current instant, truncated to whole microseconds.
    #[allow(clippy::disallowed_methods)]
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            Some(m) => *m.lock().expect("clock lock poisoned"),
            None => Utc::now(),
        }
    }

    /// Moves a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            let mut t = m.lock().expect("clock lock poisoned");
            *t += by;
        }
    }

    /// Sets a manual clock; a no-op on the system clock.
    pub fn set(&self, at: DateTime<Utc>) {
        if let Some(m) = &self.manual {
            *m.lock().expect("clock lock poisoned") = at;
        }
    }

    /// Whether this clock only moves when told to.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}
