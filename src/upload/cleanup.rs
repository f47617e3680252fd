//! `hcloud-nixos cleanup`: the temporary servers, SSH keys and unfinished snapshots that uploads left behind, deleted unless their run is still alive; and the deleting itself, which runs use too.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, UNIX_EPOCH};

use super::api::{Client, Kind, RetryPolicy};
use super::flow::{endpoint, find_temporaries, now_unix};
use super::leftovers::{Leftovers, Resource, deletion_order};
use super::outside::one_line;
use super::progress::Reporter;
use super::{CleanupArgs, labels, token};

/// What `cleanup` does with what it found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sorted {
    pub(crate) delete: Vec<Resource>,
    /// Resources of a run whose lease has not run out: (resource, run, live until).
    pub(crate) live: Vec<(Resource, String, u64)>,
    /// Younger than `--older-than`.
    pub(crate) young: usize,
}

/// Sorts temporary resources: a run is alive while any of its resources has a lease reaching
/// past `now`; its resources are left alone unless `force`. Of the rest, those at least
/// `min_age` old are deleted.
pub(crate) fn sort_out(
    found: Vec<(Resource, BTreeMap<String, String>)>,
    now: u64,
    min_age: u64,
    force: bool,
) -> Sorted {
    let mut leases: BTreeMap<String, u64> = BTreeMap::new();
    for (_, l) in &found {
        if let (Some(run), Some(until)) = (labels::run_of(l), labels::live_until(l)) {
            let e = leases.entry(run.to_string()).or_default();
            *e = (*e).max(until);
        }
    }
    let mut sorted = Sorted::default();
    for (r, l) in found {
        let run = labels::run_of(&l).unwrap_or("");
        match leases.get(run) {
            Some(&until) if until > now && !force => {
                sorted.live.push((r, one_line(run, 63), until));
            }
            _ if !labels::is_stale(&l, now, min_age) => sorted.young += 1,
            _ => sorted.delete.push(r),
        }
    }
    sorted
}

/// A time from a label (anyone with the project's token writes labels): past the year 9999 it is
/// shown as the number it is instead of overflowing the clock.
fn utc(unix: u64) -> String {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    match UNIX_EPOCH.checked_add(Duration::from_secs(unix)) {
        Some(t) if unix <= LAST_SECOND_OF_9999 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => format!("{unix} (seconds since 1970)"),
    }
}

/// Runs `hcloud-nixos cleanup`.
pub async fn run_cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    if let Some(run) = &args.run
        && (run.is_empty() || run.len() > 63 || !run.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        anyhow::bail!("--run {run}: give a run ID as the upload printed it (letters and digits)");
    }
    let token = token::resolve(args.token_file.as_deref())?;
    let api = Client::new(&endpoint(), token, RetryPolicy::default())?;
    let report = Reporter::new();
    let sel = match &args.run {
        Some(run) => labels::run_selector(run),
        None => labels::temporary_selector(),
    };
    let found = find_temporaries(&api, &sel).await?;
    let sorted = sort_out(found, now_unix(), args.older_than.as_secs(), args.force);
    let live_runs: BTreeSet<&str> = sorted.live.iter().map(|(_, r, _)| r.as_str()).collect();
    for (r, run, until) in &sorted.live {
        report.line(
            "cleanup",
            &format!(
                "left {r} alone: its upload (run {run}) is alive, its lease runs until {} and is renewed while it runs; --force deletes it",
                utc(*until)
            ),
        );
    }
    if sorted.young > 0 {
        report.line(
            "cleanup",
            &format!(
                "left {} younger than {} alone",
                sorted.young,
                humantime::format_duration(args.older_than)
            ),
        );
    }
    let n = sorted.delete.len();
    if n == 0 {
        report.line("cleanup", "nothing to delete");
        return Ok(());
    }
    let doomed = Leftovers::default();
    for r in sorted.delete {
        doomed.add(r, 0, BTreeMap::new());
    }
    let res = delete_all(&api, &doomed, &report, Duration::from_secs(180)).await;
    let left = doomed.snapshot();
    let live = if live_runs.is_empty() {
        String::new()
    } else {
        format!(", left {} live run(s) alone", live_runs.len())
    };
    report.line(
        "cleanup",
        &format!("deleted {} of {n}{live}", n - left.len()),
    );
    res.map_err(|e| {
        let list: Vec<String> = left.iter().map(|r| r.to_string()).collect();
        anyhow::anyhow!(
            "{e:#}; left behind: {}; run this cleanup again once the API lets it",
            list.join(", ")
        )
    })
}

/// Deletes resources (servers first), removing each from `leftovers` once gone.
pub(crate) async fn delete_all(
    api: &Client,
    leftovers: &Leftovers,
    report: &Reporter,
    deadline: Duration,
) -> anyhow::Result<()> {
    let mut first_err = None;
    for r in deletion_order(leftovers.snapshot()) {
        let res: anyhow::Result<()> = async {
            match r.kind {
                Kind::Server => {
                    if let Some(a) = api.delete_server(r.id).await? {
                        api.wait_action(&a, deadline).await?;
                    }
                }
                Kind::SshKey => api.delete_ssh_key(r.id).await?,
                Kind::Image => api.delete_image(r.id).await?,
            }
            Ok(())
        }
        .await;
        match res {
            Ok(()) => {
                report.line("cleanup", &format!("deleted {r}"));
                leftovers.remove(&r);
            }
            Err(e) => {
                report.line("cleanup", &format!("cannot delete {r}: {e:#}"));
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(
        kind: Kind,
        id: u64,
        run: &str,
        created: u64,
        until: Option<u64>,
    ) -> (Resource, BTreeMap<String, String>) {
        let mut l = labels::temporary_labels(run, 0, created, until.unwrap_or(0));
        if until.is_none() {
            l.remove(labels::LIVE_UNTIL);
        }
        (Resource::new(kind, id, "n"), l)
    }

    #[test]
    fn live_runs_are_left_alone_unless_forced() {
        let now = 10_000;
        let rs = vec![
            // A live run: its key's lease was not renewed, its server's was.
            found(Kind::Server, 1, "live", 0, Some(now + 60)),
            found(Kind::SshKey, 2, "live", 0, Some(now - 600)),
            // A dead run, old enough.
            found(Kind::Server, 3, "dead", 0, Some(now - 1)),
            // A dead run, too young.
            found(Kind::Server, 4, "young", now - 60, Some(now - 1)),
            // An older version's leftover: no lease, by age only.
            found(Kind::Image, 5, "old", 0, None),
        ];
        let s = sort_out(rs.clone(), now, 1800, false);
        let ids = |v: &[Resource]| v.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&s.delete), vec![3, 5]);
        let live: Vec<(u64, &str, u64)> = s
            .live
            .iter()
            .map(|(r, run, u)| (r.id, run.as_str(), *u))
            .collect();
        assert_eq!(live, vec![(1, "live", now + 60), (2, "live", now + 60)]);
        assert_eq!(s.young, 1);
        let s = sort_out(rs, now, 0, true);
        assert_eq!(ids(&s.delete), vec![1, 2, 3, 4, 5]);
        assert!(s.live.is_empty());
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        // A live-until label far out (or hostile) does not overflow the clock.
        assert_eq!(utc(u64::MAX), "18446744073709551615 (seconds since 1970)");
    }
}
