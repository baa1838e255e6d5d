//! The one retry policy every request to a target goes through, expressed as data.
//!
//! Retried: 408, 429, every 5xx except 501, and connection failures; with exponential backoff,
//! jitter, and the server's `Retry-After` when it sends one. Never retried: any other 4xx (the
//! request itself is wrong and sending it again cannot help). This module decides *whether* and
//! *when*; it never sends anything and never decides whether a create is safe to repeat (that is
//! the FHIR client's job, which searches before repeating a create whose answer was lost).

use std::time::{Duration, SystemTime};

use rand::Rng;

/// How often and how patiently to retry.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per request, the first one included.
    pub max_attempts: u32,
    /// The delay after the first failure; doubled after each further failure.
    pub base_delay: Duration,
    /// The longest computed backoff.
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured; a longer one is clipped so a run cannot stall for hours.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// Whether an HTTP status is worth another attempt.
    pub fn status_is_retryable(status: u16) -> bool {
        matches!(status, 408 | 429) || (500..=599).contains(&status) && status != 501
    }

    /// Whether another attempt is allowed after `attempts` attempts.
    pub fn may_retry(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }

    /// The pause before the next attempt, after `failures` failed attempts (1 for the first).
    ///
    /// A `Retry-After` from the server wins over the computed backoff (clipped to
    /// `max_retry_after`). The backoff is "equal jitter": half fixed, half random, so that many
    /// workers throttled at once do not come back in lockstep.
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(self.max_retry_after);
        }
        let exp = failures.saturating_sub(1).min(20);
        let full = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let half = full / 2;
        let jitter_ms = half.as_millis() as u64;
        let extra = if jitter_ms == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter_ms)
        };
        half + Duration::from_millis(extra)
    }
}

/// Parses a `Retry-After` value: delay-seconds, or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let when = SystemTime::from(when);
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(RetryPolicy::status_is_retryable(s), "{s}");
        }
        for s in [200, 201, 400, 401, 403, 404, 409, 412, 422, 501] {
            assert!(!RetryPolicy::status_is_retryable(s), "{s}");
        }
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered_within_bounds() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(5),
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3, None);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d9 = p.delay(9, None);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000));
        }
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }

    #[test]
    fn retry_after_wins_and_is_clipped() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(100_000))),
            p.max_retry_after
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_767);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        let later = now + Duration::from_secs(60);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO)
        );
    }
}
