//! Where the time went while a server was created: the phases from the API call to the confirmed
//! deploy, each with the moment it ended, from `create`'s clock and from the server's record.

use std::fmt::Write as _;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

/// A phase, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// The API accepted the server.
    ApiCall,
    /// Hetzner says it runs.
    Running,
    /// sshd answered, with the host key create made.
    FirstSshAnswer,
    /// The boot step wrote the network files (IPv6, hostname, keys).
    NetworkConfigured,
    /// The agent is ready (READY=1).
    AgentReady,
    /// The agent logged in to FlakeHub.
    Login,
    /// fh fetched the release.
    Fetch,
    /// switch-to-configuration ran.
    Activation,
    /// The release runs and is healthy.
    Confirmed,
}

impl Phase {
    /// For a person.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Phase::ApiCall => "API call",
            Phase::Running => "running",
            Phase::FirstSshAnswer => "first SSH answer",
            Phase::NetworkConfigured => "network configured",
            Phase::AgentReady => "agent ready",
            Phase::Login => "login",
            Phase::Fetch => "fetch",
            Phase::Activation => "activation",
            Phase::Confirmed => "confirmed",
        }
    }
}

/// The moments the phases ended, from a start (just before the API call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Timeline {
    pub start: Timestamp,
    pub ended: Vec<(Phase, Timestamp)>,
}

/// One phase in the machine-readable timeline: seconds from the start to its end, and how long
/// it took itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Entry {
    pub phase: Phase,
    pub at_seconds: f64,
    pub took_seconds: f64,
}

impl Timeline {
    pub(crate) fn new(start: Timestamp) -> Timeline {
        Timeline {
            start,
            ended: Vec::new(),
        }
    }

    /// Notes that `phase` ended at `at` (the first note of a phase counts; a moment before the
    /// start, from a server whose clock is behind, counts as the start).
    pub(crate) fn ended(&mut self, phase: Phase, at: Timestamp) {
        if self.ended.iter().all(|(p, _)| *p != phase) {
            self.ended.push((phase, at.max(self.start)));
            self.ended.sort_by_key(|(p, _)| *p);
        }
    }

    pub(crate) fn has(&self, phase: Phase) -> bool {
        self.ended.iter().any(|(p, _)| *p == phase)
    }

    /// The phases in order, with when each ended and how long it took (from the end of the one
    /// before it).
    pub(crate) fn entries(&self) -> Vec<Entry> {
        let seconds = |t: Timestamp| {
            Duration::try_from(t.duration_since(self.start))
                .unwrap_or_default()
                .as_secs_f64()
        };
        let mut before = self.start;
        self.ended
            .iter()
            .map(|(phase, at)| {
                let entry = Entry {
                    phase: *phase,
                    at_seconds: round(seconds(*at)),
                    took_seconds: round(seconds(*at) - seconds(before)).max(0.0),
                };
                before = (*at).max(before);
                entry
            })
            .collect()
    }

    /// The table for a person: one phase a line, when it ended and how long it took.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        for e in self.entries() {
            let _ = writeln!(
                out,
                "  {:<20} {:>7.1} s  (+{:.1} s)",
                e.phase.label(),
                e.at_seconds,
                e.took_seconds
            );
        }
        out
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Timestamp, ms: i64) -> Timestamp {
        start
            .checked_add(jiff::SignedDuration::from_millis(ms))
            .unwrap()
    }

    #[test]
    fn phases_come_in_order_with_what_each_took() {
        let start: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        let mut t = Timeline::new(start);
        t.ended(Phase::Running, at(start, 9_000));
        t.ended(Phase::ApiCall, at(start, 400));
        t.ended(Phase::Confirmed, at(start, 41_250));
        t.ended(Phase::Running, at(start, 99_000));
        let e = t.entries();
        assert_eq!(
            e.iter().map(|e| e.phase).collect::<Vec<_>>(),
            [Phase::ApiCall, Phase::Running, Phase::Confirmed]
        );
        assert_eq!(e[1].at_seconds, 9.0, "the first note counts");
        assert_eq!(e[1].took_seconds, 8.6);
        assert_eq!(e[2].took_seconds, 32.3);
        let table = t.render();
        assert!(table.contains("running"), "{table}");
        assert!(table.contains("   41.3 s  (+32.3 s)"), "{table}");
    }

    #[test]
    fn a_server_clock_behind_ours_does_not_make_negative_times() {
        let start: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        let mut t = Timeline::new(start);
        t.ended(Phase::NetworkConfigured, at(start, -3_000));
        assert_eq!(t.entries()[0].at_seconds, 0.0);
        assert!(t.has(Phase::NetworkConfigured));
        assert!(!t.has(Phase::Login));
    }
}
