//! Trying again: exponential backoff with jitter, bounded by a deadline or a number of attempts,
//! and only for failures that may pass. Every client that retries uses this one helper.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The waits between attempts: `first`, multiplied by `factor` after each failure, never more
/// than `max`, each stretched or shrunk by up to `jitter` (0.1: ±10 %) so that many clients do not
/// retry in step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    pub(crate) first: Duration,
    pub(crate) max: Duration,
    pub(crate) factor: f64,
    pub(crate) jitter: f64,
}

impl Backoff {
    /// Doubling from `first` up to `max`, ±10 %.
    pub(crate) const fn doubling(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            factor: 2.0,
            jitter: 0.1,
        }
    }

    /// The same wait every time, without jitter (polling at a steady pace).
    pub(crate) const fn steady(every: Duration) -> Backoff {
        Backoff {
            first: every,
            max: every,
            factor: 1.0,
            jitter: 0.0,
        }
    }

    /// The wait after `failures` failures in a row (1 for the first), for a jitter sample `r`
    /// uniform in 0..1. Never more than `max` stretched by the jitter; never overflows.
    pub(crate) fn delay(&self, failures: u32, r: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(63) as i32;
        let base = self.first.as_secs_f64() * self.factor.max(1.0).powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter.clamp(0.0, 1.0) * (2.0 * r.clamp(0.0, 1.0) - 1.0);
        Duration::try_from_secs_f64(capped * spread).unwrap_or(self.max)
    }
}

/// Whether a failure is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// It may pass (a refused connection, a 5xx, a timeout): try again after the backoff.
    Passing,
    /// It may pass, but not before this long (the server said so: Retry-After, a rate limit).
    /// Only the workstation's clients (upload, create) hear it.
    #[cfg_attr(not(feature = "workstation"), allow(dead_code))]
    After(Duration),
    /// Trying again would not change it.
    Final,
}

/// How long to keep trying.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Policy {
    pub(crate) backoff: Backoff,
    /// No attempt starts after this, and no wait runs past it.
    pub(crate) deadline: Option<Instant>,
    /// At most this many attempts.
    pub(crate) attempts: Option<u32>,
}

impl Policy {
    /// Until `deadline`.
    pub(crate) fn until(backoff: Backoff, deadline: Instant) -> Policy {
        Policy {
            backoff,
            deadline: Some(deadline),
            attempts: None,
        }
    }

    /// At most `attempts` attempts (used by the workstation's commands).
    #[cfg_attr(not(feature = "workstation"), allow(dead_code))]
    pub(crate) fn times(backoff: Backoff, attempts: u32) -> Policy {
        Policy {
            backoff,
            deadline: None,
            attempts: Some(attempts),
        }
    }
}

/// How the tries ended without success: the last error, and how many attempts were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GaveUp<E> {
    pub(crate) last: E,
    pub(crate) attempts: u32,
    /// The failure was final; otherwise the deadline or the number of attempts was reached.
    pub(crate) final_failure: bool,
}

/// Runs `op` (given the attempt's number, from 1) until it succeeds, fails for good, or the
/// policy says stop. `classify` says which failures may pass.
pub(crate) async fn retry<T, E, F, Fut>(
    policy: Policy,
    mut op: F,
    classify: impl Fn(&E) -> Class,
) -> Result<T, GaveUp<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        let error = match op(attempt).await {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        let wait = match classify(&error) {
            Class::Final => {
                return Err(GaveUp {
                    last: error,
                    attempts: attempt,
                    final_failure: true,
                });
            }
            Class::Passing => policy.backoff.delay(attempt, fastrand::f64()),
            Class::After(d) => d.max(policy.backoff.delay(attempt, fastrand::f64())),
        };
        let out_of_attempts = policy.attempts.is_some_and(|n| attempt >= n);
        let out_of_time = policy
            .deadline
            .is_some_and(|d| Instant::now().checked_add(wait).is_none_or(|at| at >= d));
        if out_of_attempts || out_of_time {
            return Err(GaveUp {
                last: error,
                attempts: attempt,
                final_failure: false,
            });
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn the_backoff_doubles_up_to_its_cap_with_jitter_around_it() {
        let b = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(5));
        let ms = |n, r| b.delay(n, r).as_millis();
        assert_eq!(ms(1, 0.5), 100);
        assert_eq!(ms(2, 0.5), 200);
        assert_eq!(ms(6, 0.5), 3200);
        assert_eq!(ms(7, 0.5), 5000);
        assert_eq!(ms(u32::MAX, 0.5), 5000, "no overflow");
        assert_eq!(ms(1, 0.0), 90);
        assert_eq!(ms(1, 1.0), 110);
        let steady = Backoff::steady(Duration::from_secs(2));
        assert_eq!(steady.delay(1, 0.0), Duration::from_secs(2));
        assert_eq!(steady.delay(50, 1.0), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn passing_failures_are_tried_again_until_the_deadline() {
        let calls = Cell::new(0);
        let start = Instant::now();
        let policy = Policy::until(
            Backoff::steady(Duration::from_secs(1)),
            start + Duration::from_millis(3500),
        );
        let result: Result<(), _> = retry(
            policy,
            |_| {
                calls.set(calls.get() + 1);
                async { Err::<(), _>("refused") }
            },
            |_| Class::Passing,
        )
        .await;
        let gave_up = result.unwrap_err();
        assert_eq!((gave_up.attempts, gave_up.final_failure), (4, false));
        assert_eq!(calls.get(), 4);
        assert!(start.elapsed() < Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_failure_ends_at_once_and_success_ends_the_tries() {
        let policy = Policy::times(Backoff::steady(Duration::from_secs(1)), 10);
        let result: Result<(), _> =
            retry(policy, |_| async { Err::<(), _>("404") }, |_| Class::Final).await;
        assert_eq!(
            result.unwrap_err(),
            GaveUp {
                last: "404",
                attempts: 1,
                final_failure: true
            }
        );
        let result = retry(
            policy,
            |n| async move { if n < 3 { Err("503") } else { Ok(n) } },
            |_| Class::Passing,
        )
        .await;
        assert_eq!(result, Ok(3));
        let result: Result<(), _> =
            retry(policy, |_| async { Err::<(), _>("x") }, |_| Class::Passing).await;
        assert_eq!(result.unwrap_err().attempts, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_asking_for_time_gets_it() {
        let start = Instant::now();
        let policy = Policy::times(Backoff::steady(Duration::from_millis(10)), 2);
        let _ = retry(
            policy,
            |_| async { Err::<(), _>("429") },
            |_| Class::After(Duration::from_secs(7)),
        )
        .await;
        assert!(start.elapsed() >= Duration::from_secs(7));
    }
}
