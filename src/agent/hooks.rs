//! Hooks: programs run after each deploy, rollback and reboot decision, told what happened in
//! environment variables. A hook that fails, hangs or cannot be started is logged; it never
//! fails the deploy.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// How long a hook may run when its `timeout` is not given.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `PATH` for hooks when the agent itself has none.
pub(crate) const DEFAULT_PATH: &str = "/run/current-system/sw/bin:/usr/bin:/bin";

/// Bytes of each output stream kept; the rest is read and counted, not kept.
const KEEP_OUTPUT: usize = 16 * 1024;
/// Characters of each output stream put in the log.
const LOG_OUTPUT: usize = 2000;
/// Bytes of one environment variable's value (the kernel refuses strings over 128 KiB).
const MAX_VALUE: usize = 4096;

/// One `[[hook]]` table as written. Unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HookConfig {
    pub(crate) command: Vec<String>,
    #[serde(default, deserialize_with = "crate::agent::config::raw::duration")]
    pub(crate) timeout: Option<String>,
}

/// A validated hook: an absolute program path and its arguments, run without a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hook {
    pub(crate) command: Vec<String>,
    pub(crate) timeout: Duration,
}

impl Hook {
    /// Validates `hook[index]`; the error is one line naming the key.
    pub(crate) fn from_config(c: &HookConfig, index: usize) -> Result<Hook, String> {
        let at = format!("hook[{index}]");
        let Some(program) = c.command.first() else {
            return Err(format!(
                "{at}.command: is empty; give the program and its arguments, for example [\"/run/current-system/sw/bin/logger\", \"-t\", \"deploy\"]"
            ));
        };
        if !Path::new(program).is_absolute() {
            return Err(format!(
                "{at}.command: '{}' is not an absolute path (hooks run without a shell or a search of PATH)",
                one_line(program)
            ));
        }
        if let Some(arg) = c.command.iter().find(|a| a.contains('\0')) {
            return Err(format!(
                "{at}.command: '{}' contains a NUL byte",
                one_line(arg)
            ));
        }
        let timeout = crate::agent::config::bounds::HOOK_TIMEOUT
            .read(&format!("{at}.timeout"), c.timeout.as_deref())?;
        Ok(Hook {
            command: c.command.clone(),
            timeout,
        })
    }

    /// Validates every `[[hook]]`, returning every problem (one line each).
    pub(crate) fn from_configs(configs: &[HookConfig]) -> Result<Vec<Hook>, Vec<String>> {
        let (hooks, problems): (Vec<_>, Vec<_>) = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Hook::from_config(c, i))
            .partition(Result::is_ok);
        if problems.is_empty() {
            Ok(hooks.into_iter().map(Result::unwrap).collect())
        } else {
            Err(problems.into_iter().map(Result::unwrap_err).collect())
        }
    }
}

/// What a hook is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Deploy,
    Rollback,
    Reboot,
}

impl EventKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EventKind::Deploy => "deploy",
            EventKind::Rollback => "rollback",
            EventKind::Reboot => "reboot",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened. Holds nothing secret, and must not: all of it goes to the hooks' environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) kind: EventKind,
    pub(crate) version: Option<String>,
    pub(crate) store_path: Option<String>,
    pub(crate) previous_path: Option<String>,
    /// success | failed | rolled-back | scheduled | held | ...
    pub(crate) outcome: String,
    pub(crate) error: Option<String>,
}

/// The variables a hook gets (besides `PATH`). Absent values are empty strings; every value is
/// one line (control characters become spaces) of at most 4 KiB.
pub(crate) fn environment(e: &Event) -> Vec<(String, String)> {
    let value = |v: Option<&str>| one_line(v.unwrap_or(""));
    vec![
        ("HCLOUD_NIXOS_EVENT".into(), e.kind.as_str().into()),
        ("HCLOUD_NIXOS_VERSION".into(), value(e.version.as_deref())),
        (
            "HCLOUD_NIXOS_STORE_PATH".into(),
            value(e.store_path.as_deref()),
        ),
        (
            "HCLOUD_NIXOS_PREVIOUS_PATH".into(),
            value(e.previous_path.as_deref()),
        ),
        ("HCLOUD_NIXOS_OUTCOME".into(), value(Some(&e.outcome))),
        ("HCLOUD_NIXOS_ERROR".into(), value(e.error.as_deref())),
    ]
}

/// `s` with control characters (newlines, NUL, ...) replaced by spaces, cut to 4 KiB.
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if crate::plumbing::text::breaks_a_line(c) {
                ' '
            } else {
                c
            }
        })
        .collect();
    if out.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// Runs every hook, one after another, each for at most its timeout. Failures are logged, never
/// returned.
pub(crate) async fn run_all(hooks: &[Hook], event: &Event) {
    if hooks.is_empty() {
        return;
    }
    let mut env = environment(event);
    let path = std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    env.push(("PATH".into(), path));
    for hook in hooks {
        run_one(hook, event, &env).await;
    }
}

/// Up to `KEEP_OUTPUT` bytes of a stream and how many there were.
#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    total: usize,
}

impl Capture {
    /// Reads until end of file or an error, keeping the beginning.
    async fn fill(&mut self, reader: Option<impl AsyncRead + Unpin>) {
        let Some(mut reader) = reader else { return };
        let mut chunk = [0u8; 4096];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let room = KEEP_OUTPUT.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&chunk[..n.min(room)]);
                    self.total += n;
                }
            }
        }
    }

    /// The output for the log: trimmed, on one line (control characters escaped, a byte that is
    /// not UTF-8 shown as U+FFFD), cut to `LOG_OUTPUT` characters, "-" when there is none. What
    /// is left out is counted in bytes of the output.
    fn for_log(&self) -> String {
        let kept = &self.kept;
        let start = kept
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(kept.len());
        let end = kept
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(start, |i| i + 1);
        if start == end {
            return "-".into();
        }
        let mut shown = String::new();
        let mut chars = 0;
        // Bytes of the output accounted for: the leading whitespace, then what is shown.
        let mut used = start;
        'text: for chunk in kept[start..end].utf8_chunks() {
            let pieces =
                chunk.valid().chars().map(|c| (c, c.len_utf8())).chain(
                    (!chunk.invalid().is_empty()).then(|| ('\u{fffd}', chunk.invalid().len())),
                );
            for (c, len) in pieces {
                if chars == LOG_OUTPUT {
                    break 'text;
                }
                if crate::plumbing::text::breaks_a_line(c) {
                    shown.extend(c.escape_debug());
                } else {
                    shown.push(c);
                }
                chars += 1;
                used += len;
            }
        }
        if used == end {
            // All of it is shown; trailing whitespace counts as shown too.
            used = kept.len();
        }
        match self.total.saturating_sub(used) {
            0 => shown,
            more => format!("{shown} … ({more} bytes more)"),
        }
    }
}

async fn run_one(hook: &Hook, event: &Event, env: &[(String, String)]) {
    let program = &hook.command[0];
    let deadline = Instant::now() + hook.timeout;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&hook.command[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that what it starts is killed with it on a timeout.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(hook = %program, event = %event.kind, error = %e, "hook could not be run");
            return;
        }
    };
    let pgid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let mut out = Capture::default();
    let mut err = Capture::default();
    // Finished means the hook exited and nothing it started still holds its output.
    let finished = tokio::time::timeout_at(deadline, async {
        let (status, (), ()) = tokio::join!(child.wait(), out.fill(stdout), err.fill(stderr));
        status
    })
    .await;
    let timeout = humantime::format_duration(hook.timeout);
    match finished {
        Ok(Ok(status)) if status.success() => {
            tracing::info!(hook = %program, event = %event.kind, stdout = %out.for_log(), stderr = %err.for_log(), "hook ran");
        }
        Ok(Ok(status)) => {
            tracing::warn!(hook = %program, event = %event.kind, %status, stdout = %out.for_log(), stderr = %err.for_log(), "hook failed");
        }
        Ok(Err(e)) => {
            tracing::warn!(hook = %program, event = %event.kind, error = %e, "cannot wait for hook");
        }
        Err(_) => {
            // Whether the hook itself is still running or only something it left behind holding
            // its output: kill the whole group.
            crate::plumbing::exec::kill_group(pgid);
            let exited = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(status)) => status.to_string(),
                _ => "unknown".into(),
            };
            tracing::warn!(hook = %program, event = %event.kind, %timeout, status = %exited, stdout = %out.for_log(), stderr = %err.for_log(), "hook did not finish within its timeout (or left processes holding its output); killed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn config(command: &[&str], timeout: Option<&str>) -> HookConfig {
        HookConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.map(str::to_string),
        }
    }

    fn script(dir: &Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn event() -> Event {
        Event {
            kind: EventKind::Rollback,
            version: Some("0.1.42".into()),
            store_path: Some("/nix/store/aaaa-nixos-system-web-25.11".into()),
            previous_path: Some("/nix/store/bbbb-nixos-system-web-25.11".into()),
            outcome: "rolled-back".into(),
            error: Some(
                "switch-to-configuration exited with 4:\nunit foo.service failed\r\n\0".into(),
            ),
        }
    }

    #[test]
    fn parses_and_validates_the_toml() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            hook: Vec<HookConfig>,
        }
        let file: File = toml::from_str(
            "[[hook]]\ncommand = [\"/run/current-system/sw/bin/logger\", \"-t\", \"deploy\"]\n\
             [[hook]]\ncommand = [\"/bin/true\"]\ntimeout = \"2m\"\n",
        )
        .unwrap();
        let hooks = Hook::from_configs(&file.hook).unwrap();
        assert_eq!(hooks[0].command[2], "deploy");
        assert_eq!(hooks[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(hooks[1].timeout, Duration::from_secs(120));
        let typo = toml::from_str::<File>("[[hook]]\ncommand = [\"/bin/true\"]\ntimout = \"1s\"\n");
        assert!(typo.is_err());
    }

    #[test]
    fn problems_are_one_line_and_name_the_key() {
        let problems = Hook::from_configs(&[
            config(&["/bin/true"], None),
            config(&[], None),
            config(&["logger", "-t", "x"], None),
            config(&["/bin/true"], Some("soon")),
            config(&["/bin/true"], Some("0s")),
        ])
        .unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("hook[1].command: is empty"));
        assert!(problems[1].starts_with("hook[2].command: 'logger' is not an absolute path"));
        assert!(problems[2].starts_with("hook[3].timeout: 'soon'"));
        assert!(problems[3].starts_with("hook[4].timeout: '0s'"));
        assert!(problems.iter().all(|p| !p.contains('\n')));
    }

    #[test]
    fn environment_is_one_line_and_empty_when_absent() {
        let env: HashMap<_, _> = environment(&event()).into_iter().collect();
        assert_eq!(env.len(), 6);
        assert_eq!(
            env["HCLOUD_NIXOS_ERROR"],
            "switch-to-configuration exited with 4: unit foo.service failed   "
        );
        let bare = Event {
            kind: EventKind::Reboot,
            version: None,
            store_path: None,
            previous_path: None,
            outcome: "scheduled".into(),
            error: None,
        };
        let env: HashMap<_, _> = environment(&bare).into_iter().collect();
        assert_eq!(env["HCLOUD_NIXOS_EVENT"], "reboot");
        assert_eq!(env["HCLOUD_NIXOS_OUTCOME"], "scheduled");
        for key in [
            "HCLOUD_NIXOS_VERSION",
            "HCLOUD_NIXOS_STORE_PATH",
            "HCLOUD_NIXOS_PREVIOUS_PATH",
            "HCLOUD_NIXOS_ERROR",
        ] {
            assert_eq!(env[key], "", "{key}");
        }
        let long = Event {
            error: Some("é".repeat(5000)),
            ..bare
        };
        let env: HashMap<_, _> = environment(&long).into_iter().collect();
        assert!(env["HCLOUD_NIXOS_ERROR"].len() <= MAX_VALUE);
    }

    /// Reads `env -0` output into a map.
    fn read_env_dump(path: &Path) -> HashMap<String, String> {
        let text = std::fs::read_to_string(path).unwrap();
        text.split('\0')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hooks_get_the_event_in_a_clean_environment() {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("env");
        let second = dir.path().join("second");
        let hooks = Hook::from_configs(&[
            config(
                &[
                    &script(dir.path(), "dump", "env -0 > \"$1\"; pwd > \"$1.cwd\""),
                    dump.to_str().unwrap(),
                ],
                None,
            ),
            config(
                &[
                    &script(
                        dir.path(),
                        "second",
                        "echo \"$HCLOUD_NIXOS_OUTCOME\" > \"$1\"",
                    ),
                    second.to_str().unwrap(),
                ],
                None,
            ),
        ])
        .unwrap();
        run_all(&hooks, &event()).await;
        let env = read_env_dump(&dump);
        assert_eq!(env["HCLOUD_NIXOS_EVENT"], "rollback");
        assert_eq!(env["HCLOUD_NIXOS_VERSION"], "0.1.42");
        assert_eq!(
            env["HCLOUD_NIXOS_STORE_PATH"],
            "/nix/store/aaaa-nixos-system-web-25.11"
        );
        assert_eq!(
            env["HCLOUD_NIXOS_PREVIOUS_PATH"],
            "/nix/store/bbbb-nixos-system-web-25.11"
        );
        assert_eq!(env["HCLOUD_NIXOS_OUTCOME"], "rolled-back");
        assert_eq!(
            env["HCLOUD_NIXOS_ERROR"],
            "switch-to-configuration exited with 4: unit foo.service failed   "
        );
        assert_eq!(env["PATH"], std::env::var("PATH").unwrap());
        // sh may add PWD, SHLVL and _ of its own; nothing else comes from the agent's environment
        // (HOME, USER, the test harness's variables).
        let extra: Vec<_> = env
            .keys()
            .filter(|k| {
                !k.starts_with("HCLOUD_NIXOS_")
                    && !matches!(k.as_str(), "PATH" | "PWD" | "SHLVL" | "_" | "OLDPWD")
            })
            .collect();
        assert!(extra.is_empty(), "unexpected variables: {extra:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("env.cwd")).unwrap(),
            "/\n"
        );
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "rolled-back\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failing_missing_and_hanging_hooks_are_only_logged_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let hooks = vec![
            Hook {
                command: vec![script(dir.path(), "fails", "echo oops >&2; exit 3")],
                timeout: Duration::from_secs(5),
            },
            Hook {
                command: vec![dir.path().join("missing").to_str().unwrap().into()],
                timeout: Duration::from_secs(5),
            },
            Hook {
                // Hangs, with a child of its own holding the output.
                command: vec![script(dir.path(), "hangs", "sleep 60 & sleep 60")],
                timeout: Duration::from_millis(300),
            },
            Hook {
                // Exits at once but leaves a process holding its output.
                command: vec![script(dir.path(), "leaves", "sleep 60 &\necho started")],
                timeout: Duration::from_millis(300),
            },
            Hook {
                command: vec![script(dir.path(), "after", "touch \"$0.ran\"")],
                timeout: Duration::from_secs(5),
            },
        ];
        let started = std::time::Instant::now();
        run_all(&hooks, &event()).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(
            dir.path().join("after.ran").exists(),
            "a later hook still runs"
        );
    }

    #[test]
    fn output_that_is_not_utf8_is_cut_and_counted_in_bytes() {
        // Each invalid byte becomes a three-byte U+FFFD when shown: the count of what is left
        // out is still in bytes of the output, and never below zero.
        let mut c = Capture {
            kept: vec![0xff; 3000],
            total: 3000,
        };
        let log = c.for_log();
        assert!(log.starts_with(&"\u{fffd}".repeat(LOG_OUTPUT)), "{log}");
        assert!(
            log.ends_with(&format!("({} bytes more)", 3000 - LOG_OUTPUT)),
            "{log}"
        );
        // Leading whitespace that is trimmed counts as shown.
        c.kept = b"   ".to_vec();
        c.kept.extend(vec![0xfe; LOG_OUTPUT + 10]);
        c.total = c.kept.len() + 5;
        let log = c.for_log();
        assert!(log.ends_with("(15 bytes more)"), "{log}");
        // Control characters do not reach the log as such (a fake log line, a terminal escape).
        c.kept = b"ok\nWARN fake line\x1b[31m".to_vec();
        c.total = c.kept.len();
        let log = c.for_log();
        assert!(!log.contains('\x1b') && !log.contains('\n'), "{log:?}");
    }

    #[test]
    fn output_for_the_log_is_cut() {
        let mut c = Capture::default();
        assert_eq!(c.for_log(), "-");
        c.kept = b"  hello\n".to_vec();
        c.total = 8;
        assert_eq!(c.for_log(), "hello");
        c.kept = vec![b'x'; KEEP_OUTPUT];
        c.total = KEEP_OUTPUT + 100;
        let log = c.for_log();
        assert!(log.starts_with(&"x".repeat(LOG_OUTPUT)));
        assert!(log.ends_with(&format!("({} bytes more)", KEEP_OUTPUT + 100 - LOG_OUTPUT)));
    }
}
