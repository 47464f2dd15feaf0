//! Fakes shared by the unit tests of the workers.

use chrono::{DateTime, Utc};
use issuer_domain::ports::Clock;

/// A clock that always says the same time.
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}
