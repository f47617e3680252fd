//! The bounds of every duration and number the agent reads: one table, one reader for each kind.
//!
//! Each bound is decided by what the agent does with the value: durations are added to the
//! clock (`Instant + d`, `SystemTime + d`: past about 292 billion years that panics), stretched
//! by ±10% jitter (`Duration::mul_f64`), and handed to etcd as whole seconds in an `i64` (a cast
//! that turns negative past `i64::MAX`). The maxima below are far inside those limits and still
//! generous for a real configuration; the minima keep the agent from spinning. Every source (the
//! file, user-data) is read by the same rule, and a value outside its range is refused when the
//! configuration is read, naming the key and the range.

use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// The rule for one duration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurationBound {
    /// The key as documented (`hook[].timeout` for the key of every `[[hook]]`).
    pub(crate) key: &'static str,
    pub(crate) default: Duration,
    /// Zero is allowed when this is zero.
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    /// Why the bounds are what they are, for the README.
    pub(crate) why: &'static str,
}

/// The rule for one whole-number key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CountBound {
    pub(crate) key: &'static str,
    pub(crate) default: u32,
    pub(crate) min: u32,
    pub(crate) max: u32,
    pub(crate) why: &'static str,
}

pub(crate) const POLL_INTERVAL: DurationBound = DurationBound {
    key: "poll_interval",
    default: MINUTE,
    min: SECOND,
    max: DAY,
    why: "stretched by ±10% jitter; a server looks at least once a day",
};
pub(crate) const MAX_BACKOFF: DurationBound = DurationBound {
    key: "max_backoff",
    default: Duration::from_secs(600),
    min: SECOND,
    max: DAY,
    why: "like poll_interval",
};
pub(crate) const CONFIRM_TIMEOUT: DurationBound = DurationBound {
    key: "confirm_timeout",
    default: Duration::from_secs(120),
    min: SECOND,
    max: HOUR,
    why: "added to the clock; a deploy holds its fleet slot while it confirms",
};
pub(crate) const MIN_RELEASE_AGE: DurationBound = DurationBound {
    key: "min_release_age",
    default: Duration::ZERO,
    min: Duration::ZERO,
    max: Duration::from_secs(30 * 24 * 3600),
    why: "added to a release's publication time; 0s on canaries",
};
pub(crate) const APPLY_TIMEOUT: DurationBound = DurationBound {
    key: "apply.timeout",
    default: HOUR,
    min: SECOND,
    max: Duration::from_secs(2 * 24 * 3600),
    why: "added to the clock; a fetch of a large closure over a slow link",
};
pub(crate) const REBOOT_GRACE: DurationBound = DurationBound {
    key: "reboot_grace",
    default: MINUTE,
    min: Duration::ZERO,
    max: HOUR,
    why: "the agent waits this long; 0s reboots right after the wall message",
};
pub(crate) const REBOOT_INHIBITOR_TIMEOUT: DurationBound = DurationBound {
    key: "reboot_inhibitor_timeout",
    default: Duration::from_secs(600),
    min: Duration::ZERO,
    max: DAY,
    why: "the agent waits this long; 0s postpones at once while a lock is held",
};
pub(crate) const HEALTH_CHECK_TIMEOUT: DurationBound = DurationBound {
    key: "health_check[].timeout",
    default: Duration::from_secs(10),
    min: SECOND,
    max: HOUR,
    why: "one run of one check, inside confirm_timeout",
};
pub(crate) const HOOK_TIMEOUT: DurationBound = DurationBound {
    key: "hook[].timeout",
    default: crate::agent::hooks::DEFAULT_TIMEOUT,
    min: SECOND,
    max: HOUR,
    why: "added to the clock; the cycle waits for its hooks",
};
pub(crate) const REBOOT_WINDOW_LENGTH: DurationBound = DurationBound {
    key: "reboot_window.length",
    default: Duration::from_secs(2 * 3600),
    min: MINUTE,
    max: crate::agent::reboot::MAX_LENGTH,
    why: "a window as long as a week is always open on its days",
};
pub(crate) const FLEET_LEASE_TTL: DurationBound = DurationBound {
    key: "fleet.etcd.lease_ttl",
    default: Duration::from_secs(30),
    min: Duration::from_secs(2),
    max: HOUR,
    why: "sent to etcd in whole seconds and refreshed every third of it; a dead server's slot is free after it",
};
pub(crate) const FLEET_REBOOT_TTL: DurationBound = DurationBound {
    key: "fleet.etcd.reboot_ttl",
    default: Duration::from_secs(15 * 60),
    min: Duration::from_secs(2),
    max: DAY,
    why: "like lease_ttl; long enough for the server to come back",
};

/// Every duration the agent reads, in the README's order.
#[cfg(test)]
pub(crate) const DURATIONS: [DurationBound; 12] = [
    POLL_INTERVAL,
    MAX_BACKOFF,
    CONFIRM_TIMEOUT,
    MIN_RELEASE_AGE,
    APPLY_TIMEOUT,
    HEALTH_CHECK_TIMEOUT,
    REBOOT_WINDOW_LENGTH,
    REBOOT_GRACE,
    REBOOT_INHIBITOR_TIMEOUT,
    HOOK_TIMEOUT,
    FLEET_LEASE_TTL,
    FLEET_REBOOT_TTL,
];

pub(crate) const RETRY_LIMIT: CountBound = CountBound {
    key: "retry_limit",
    default: 3,
    min: 1,
    max: 100,
    why: "attempts at one store path; each may take up to apply.timeout",
};
pub(crate) const FLEET_SLOTS: CountBound = CountBound {
    key: "fleet.slots",
    default: 1,
    min: 1,
    max: 1000,
    why: "one etcd key per slot, all read at every request",
};

/// Every whole number the agent reads.
#[cfg(test)]
pub(crate) const COUNTS: [CountBound; 2] = [RETRY_LIMIT, FLEET_SLOTS];

/// A duration for people: `90s` as `1m 30s`, zero as `0s`.
pub(crate) fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl DurationBound {
    /// The value of `key` (the key as the user wrote it: `hook[2].timeout`), or the default when
    /// it is not set. The error is one line naming `key` and the allowed range.
    pub(crate) fn read(&self, key: &str, text: Option<&str>) -> Result<Duration, String> {
        match text {
            None => Ok(self.default),
            Some(text) => self.parse(key, text),
        }
    }

    /// `text` as a duration within the bounds.
    pub(crate) fn parse(&self, key: &str, text: &str) -> Result<Duration, String> {
        let shown = super::raw::shown(text);
        let range = format!("{} to {}", human(self.min), human(self.max));
        let out_of_range = || format!("{key}: {shown} is out of range; use {range}");
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d < self.min || d > self.max => Err(out_of_range()),
            Ok(d) => Ok(d),
            Err(humantime::DurationError::NumberOverflow) => Err(out_of_range()),
            Err(_) => Err(format!(
                "{key}: {shown} is not a duration; write a number and a unit, {range} (for example {})",
                human(self.example())
            )),
        }
    }

    /// A value for messages: the default, or the longest when the default is zero.
    fn example(&self) -> Duration {
        if self.default.is_zero() {
            self.max.min(HOUR)
        } else {
            self.default
        }
    }
}

impl CountBound {
    /// The value of `key`, or the default when it is not set; the error names the range.
    pub(crate) fn read(&self, key: &str, value: Option<i64>) -> Result<u32, String> {
        let Some(n) = value else {
            return Ok(self.default);
        };
        match u32::try_from(n) {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(format!(
                "{key}: {n} is out of range; use {} to {}",
                self.min, self.max
            )),
        }
    }
}

/// The table as Markdown, as the README's "Configuration" section states it.
#[cfg(test)]
pub(crate) fn markdown() -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "| key | default | minimum | maximum | zero allowed | why |\n|---|---|---|---|---|---|\n",
    );
    for b in DURATIONS {
        let zero = if b.min.is_zero() { "yes" } else { "no" };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {zero} | {} |",
            b.key,
            human(b.default),
            human(b.min),
            human(b.max),
            b.why
        );
    }
    for b in COUNTS {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | no | {} |",
            b.key, b.default, b.min, b.max, b.why
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bound_is_sane() {
        for b in DURATIONS {
            assert!(b.min <= b.default && b.default <= b.max, "{b:?}");
            // Far inside what the clock, the jitter and etcd's i64 seconds can carry.
            assert!(b.max <= Duration::from_secs(366 * 24 * 3600), "{b:?}");
            assert!(std::time::Instant::now().checked_add(b.max * 2).is_some());
        }
        for b in COUNTS {
            assert!(
                b.min >= 1 && b.min <= b.default && b.default <= b.max,
                "{b:?}"
            );
        }
    }

    #[test]
    fn durations_are_read_by_one_rule() {
        let b = POLL_INTERVAL;
        assert_eq!(b.read("poll_interval", None), Ok(MINUTE));
        assert_eq!(b.read("poll_interval", Some("1h 30m")), Ok(90 * MINUTE));
        assert_eq!(b.read("poll_interval", Some(" 1s ")), Ok(SECOND));
        assert_eq!(b.read("poll_interval", Some("1day")), Ok(DAY));
        for (text, message) in [
            (
                "500ms",
                "poll_interval: '500ms' is out of range; use 1s to 1day",
            ),
            ("0s", "poll_interval: '0s' is out of range; use 1s to 1day"),
            (
                "25h",
                "poll_interval: '25h' is out of range; use 1s to 1day",
            ),
            (
                "300000000000y",
                "poll_interval: '300000000000y' is out of range; use 1s to 1day",
            ),
            (
                "99999999999999999999999y",
                "poll_interval: '99999999999999999999999y' is out of range; use 1s to 1day",
            ),
            (
                "soon",
                "poll_interval: 'soon' is not a duration; write a number and a unit, 1s to 1day (for example 1m)",
            ),
            (
                "60",
                "poll_interval: '60' is not a duration; write a number and a unit, 1s to 1day (for example 1m)",
            ),
            (
                "-1h",
                "poll_interval: '-1h' is not a duration; write a number and a unit, 1s to 1day (for example 1m)",
            ),
            (
                "5m\n[x]",
                "poll_interval: '5m\\n[x]' is not a duration; write a number and a unit, 1s to 1day (for example 1m)",
            ),
        ] {
            assert_eq!(b.read("poll_interval", Some(text)), Err(message.into()));
        }
        // Zero where zero is allowed; the key as the user wrote it.
        assert_eq!(
            MIN_RELEASE_AGE.read("min_release_age", Some("0s")),
            Ok(Duration::ZERO)
        );
        assert!(
            HOOK_TIMEOUT
                .read("hook[2].timeout", Some("2h"))
                .unwrap_err()
                .starts_with("hook[2].timeout: '2h' is out of range; use 1s to 1h")
        );
    }

    #[test]
    fn numbers_are_read_by_one_rule() {
        assert_eq!(RETRY_LIMIT.read("retry_limit", None), Ok(3));
        assert_eq!(RETRY_LIMIT.read("retry_limit", Some(100)), Ok(100));
        for n in [0, -1, 101, i64::MAX, i64::MIN, 1 << 32] {
            assert_eq!(
                RETRY_LIMIT.read("retry_limit", Some(n)),
                Err(format!("retry_limit: {n} is out of range; use 1 to 100"))
            );
        }
        assert_eq!(FLEET_SLOTS.read("fleet.slots", Some(1000)), Ok(1000));
    }

    #[test]
    fn the_markdown_table_has_every_key() {
        let table = markdown();
        assert_eq!(table.lines().count(), 2 + DURATIONS.len() + COUNTS.len());
        assert!(
            table.contains("| `poll_interval` | 1m | 1s | 1day | no |"),
            "{table}"
        );
        assert!(
            table.contains("| `min_release_age` | 0s | 0s | 30days | yes |"),
            "{table}"
        );
        assert!(
            table.contains("| `retry_limit` | 3 | 1 | 100 | no |"),
            "{table}"
        );
    }

    /// The README states the table once; it must say what the code does.
    #[test]
    fn the_readme_states_the_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let table = markdown();
        assert!(
            readme.contains(&table),
            "README.md's table of bounds differs from the code; put this there:\n{table}"
        );
    }
}
