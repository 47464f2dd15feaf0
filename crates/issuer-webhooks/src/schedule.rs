//! The retry schedule for failed deliveries (DESIGN §9).
//!
//! Why a fixed table rather than a formula: the delays are a product decision
//! (a receiver that is down for a working day still gets its events, and the
//! total span is predictable for the endpoint auto-disable rule), and
//! operators may override it in configuration with the same notation.
//!
//! Invariants:
//! - Entry `i` is the wait after the `i+1`-th failed attempt; once the table
//!   is used up there are no more retries ([`RetrySchedule::next_delay`]
//!   returns `None`).
//! - Jitter is at most ±10 % and randomness is supplied by the caller, so the
//!   schedule is deterministic and testable.
//! - A receiver's `Retry-After` can lengthen a wait (up to
//!   [`RETRY_AFTER_CAP`]) but never shorten it below the schedule, and never
//!   adds attempts.

use std::fmt;
use std::time::Duration;

use crate::sender::RETRY_AFTER_CAP;

/// Delays between attempts; `len()` is the number of retries after the first
/// attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

/// The largest jitter, as a fraction of the scheduled delay.
const JITTER: f64 = 0.10;

impl Default for RetrySchedule {
    /// DESIGN §9: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, i.e. 7 retries
    /// spanning about 27.6 hours after the first attempt.
    fn default() -> Self {
        const MIN: u64 = 60;
        const HOUR: u64 = 60 * MIN;
        Self(
            [
                5,
                5 * MIN,
                30 * MIN,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                10 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        )
    }
}

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Self {
        Self(delays)
    }

    /// Parses configuration such as `5s,5m,30m,2h`: comma-separated integers
    /// with a unit of `ms`, `s`, `m`, `h` or `d`. An empty schedule is refused
    /// as almost certainly a mistake (it would mean "never retry").
    pub fn parse(s: &str) -> Result<Self, String> {
        let delays = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(parse_delay)
            .collect::<Result<Vec<_>, _>>()?;
        if delays.is_empty() {
            return Err("retry schedule is empty".to_owned());
        }
        Ok(Self(delays))
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    /// Number of retries after the first attempt.
    pub fn retries(&self) -> usize {
        self.0.len()
    }

    /// How long to wait before the next attempt, given how many attempts
    /// have been made so far (including the first), or `None` when the
    /// schedule is exhausted and the delivery has failed for good.
    ///
    /// `jitter` is a caller-supplied uniform random number in `0..1`; it
    /// scales the delay by `0.9..1.1` so that endpoints failing together do
    /// not retry together. The result is never less than `retry_after`
    /// (capped at [`RETRY_AFTER_CAP`]). With `attempts_made == 0` nothing
    /// has been tried yet, so the answer is "now" (or the `retry_after`).
    pub fn next_delay(
        &self,
        attempts_made: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        let scheduled = match attempts_made.checked_sub(1) {
            None => Duration::ZERO,
            Some(i) => *self.0.get(usize::try_from(i).ok()?)?,
        };
        // NaN or out-of-range randomness must not produce a wild delay.
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let factor = 1.0 + JITTER * (2.0 * jitter - 1.0);
        let jittered = scheduled.mul_f64(factor);
        let floor = retry_after.map_or(Duration::ZERO, |r| r.min(RETRY_AFTER_CAP));
        Some(jittered.max(floor))
    }
}

impl fmt::Display for RetrySchedule {
    /// The same notation [`RetrySchedule::parse`] reads, so configuration
    /// round-trips through logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let ms = d.as_millis();
            let (n, unit) = if ms % 1000 != 0 {
                (ms, "ms")
            } else {
                let s = ms / 1000;
                match s {
                    _ if s != 0 && s % 86_400 == 0 => (s / 86_400, "d"),
                    _ if s != 0 && s % 3600 == 0 => (s / 3600, "h"),
                    _ if s != 0 && s % 60 == 0 => (s / 60, "m"),
                    _ => (s, "s"),
                }
            };
            write!(f, "{n}{unit}")?;
        }
        Ok(())
    }
}

fn parse_delay(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("retry delay `{s}` needs a unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("retry delay `{s}` must start with a whole number"))?;
    let per_unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "retry delay `{s}` has an unknown unit (ms, s, m, h, d)"
            ));
        }
    };
    n.checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("retry delay `{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn default_is_the_design_schedule() {
        let d = RetrySchedule::default();
        assert_eq!(
            d.delays(),
            &[
                S(5),
                S(300),
                S(1800),
                S(7200),
                S(18_000),
                S(36_000),
                S(36_000)
            ]
        );
        assert_eq!(d.retries(), 7);
        assert_eq!(d.to_string(), "5s,5m,30m,2h,5h,10h,10h");
        assert_eq!(RetrySchedule::parse(&d.to_string()).unwrap(), d);
    }

    #[test]
    fn parse_reads_configuration() {
        let s = RetrySchedule::parse("5s, 5m,30m ,2h").unwrap();
        assert_eq!(s.delays(), &[S(5), S(300), S(1800), S(7200)]);
        assert_eq!(
            RetrySchedule::parse("250ms,1d").unwrap().delays(),
            &[Duration::from_millis(250), S(86_400)]
        );
        for bad in [
            "",
            " , ",
            "5",
            "5x",
            "s",
            "-5s",
            "1.5h",
            "99999999999999999999h",
        ] {
            assert!(RetrySchedule::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn next_delay_walks_the_table_then_stops() {
        let s = RetrySchedule::default();
        let mid = 0.5; // no jitter
        assert_eq!(s.next_delay(0, None, mid), Some(Duration::ZERO));
        assert_eq!(s.next_delay(1, None, mid), Some(S(5)));
        assert_eq!(s.next_delay(2, None, mid), Some(S(300)));
        assert_eq!(s.next_delay(7, None, mid), Some(S(36_000)));
        assert_eq!(s.next_delay(8, None, mid), None);
        assert_eq!(s.next_delay(u32::MAX, None, mid), None);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let s = RetrySchedule::default();
        assert_eq!(s.next_delay(3, None, 0.0), Some(S(1620)));
        assert_eq!(s.next_delay(3, None, 1.0), Some(S(1980)));
        for j in [0.0, 0.1, 0.33, 0.5, 0.77, 0.999, 1.0] {
            let d = s.next_delay(4, None, j).unwrap();
            assert!(d >= S(6480) && d <= S(7920), "{j}: {d:?}");
        }
        // Bad randomness is clamped, not trusted.
        assert_eq!(
            s.next_delay(1, None, 7.0),
            Some(Duration::from_millis(5500))
        );
        assert_eq!(
            s.next_delay(1, None, -3.0),
            Some(Duration::from_millis(4500))
        );
        assert_eq!(s.next_delay(1, None, f64::NAN), Some(S(5)));
    }

    #[test]
    fn retry_after_is_a_floor_capped_at_a_day() {
        let s = RetrySchedule::default();
        assert_eq!(s.next_delay(1, Some(S(7)), 0.5), Some(S(7)));
        // Shorter than scheduled: the schedule wins.
        assert_eq!(s.next_delay(2, Some(S(7)), 0.5), Some(S(300)));
        // Cannot exceed a day, however long the receiver asks for.
        assert_eq!(
            s.next_delay(1, Some(S(10 * 86_400)), 0.5),
            Some(RETRY_AFTER_CAP)
        );
        // Never revives an exhausted schedule.
        assert_eq!(s.next_delay(8, Some(S(7)), 0.5), None);
    }
}
