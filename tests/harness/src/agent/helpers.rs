//! What the agent tests share: references and state lookups, health check scripts, the hook
//! recorder, the metrics textfile.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::{ATTR, Bench, ORG};

/// Makes a [`Bench`] for the test `$name` (with `$opts`, or the defaults), or returns from the
/// test when the bench cannot run here (it printed `SKIP: ...`; under `CI=true` it panicked).
#[macro_export]
macro_rules! bench {
    ($name:expr) => {
        $crate::bench!($name, $crate::agent::Options::default())
    };
    ($name:expr, $opts:expr) => {
        match $crate::agent::Bench::new($name, $opts) {
            Some(b) => b,
            None => return,
        }
    };
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// fh's arguments for fetching `version` of acme/`flake`: the exact reference, and
/// `dry-activate` (fh makes the profile generation; the agent activates it itself).
pub fn fh_fetch(flake: &str, version: &str) -> String {
    format!("apply nixos {ORG}/{flake}/={version}#{ATTR} dry-activate")
}

/// Is the deploy in its activation step, with the step's PID written down?
pub fn activating(b: &Bench) -> bool {
    let state = b.state();
    str_at(&state, "/in_flight/phase") == "activate" && state.pointer("/in_flight/pid").is_some()
}

/// The string at `pointer` in `v` (empty when there is none).
pub fn str_at<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(|x| x.as_str()).unwrap_or("")
}

/// Now, as RFC 3339 to the second (as FlakeHub writes `published_at`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A `[[health_check]]` script at `bin/<name>`: fails (saying why) while `<root>/flags/<flag>`
/// exists; every run leaves a line in `logs/checks.log`.
pub fn check_script(b: &Bench, name: &str, flag: &str) -> PathBuf {
    b.script(
        &format!("bin/{name}"),
        &format!(
            "#!/bin/bash\necho \"{name} $(date +%s.%N)\" >>@ROOT@/logs/checks.log\n\
             if [ -e @ROOT@/flags/{flag} ]; then echo \"{name}: the app does not answer\" >&2; exit 1; fi\n\
             exit 0\n"
        ),
    )
}

/// Runs of the health check scripts so far.
pub fn checks_run(b: &Bench) -> usize {
    std::fs::read_to_string(b.path("logs/checks.log"))
        .unwrap_or_default()
        .lines()
        .count()
}

/// `[[hook]]` tables: a hook that fails first, then one ([`write_hook_recorder`]) that appends
/// its `HCLOUD_NIXOS_*` environment to `logs/hooks.log`.
pub const HOOKS: &str = r#"
[[hook]]
command = ["/bin/sh", "-c", "echo this hook fails >&2; exit 3"]

[[hook]]
command = ["@ROOT@/bin/record-hook"]
timeout = "10s"
"#;

/// The hook [`HOOKS`] names second.
pub fn write_hook_recorder(b: &Bench) {
    b.script(
        "bin/record-hook",
        "#!/bin/bash\n{ echo ===; env | grep '^HCLOUD_NIXOS_' | sort; } >>@ROOT@/logs/hooks.log\n",
    );
}

/// Every hook run so far: its `HCLOUD_NIXOS_*` variables (without the prefix).
pub fn hook_events(b: &Bench) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(b.path("logs/hooks.log")).unwrap_or_default();
    text.split("===\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| {
                    (
                        k.trim_start_matches("HCLOUD_NIXOS_").to_string(),
                        v.to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// (event, outcome) of each hook run, in order.
pub fn hook_kinds(b: &Bench) -> Vec<(String, String)> {
    hook_events(b)
        .iter()
        .map(|e| (e["EVENT"].clone(), e["OUTCOME"].clone()))
        .collect()
}

/// `[("deploy", "success"), ...]` as [`hook_kinds`] returns it.
pub fn kinds(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// The metrics textfile at `<root>/metrics.prom`, parsed.
pub fn metrics_file(b: &Bench) -> BTreeMap<String, f64> {
    crate::prometheus::parse(
        &std::fs::read_to_string(b.path("metrics.prom")).expect("the metrics textfile"),
    )
}
