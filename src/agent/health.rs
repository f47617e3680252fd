//! Health after a deploy: no new failed units, FlakeHub reachable again, every configured check.

use std::time::Duration;

use serde::Deserialize;

use crate::plumbing::exec;

/// A `[[health_check]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckConfig {
    pub(crate) command: Option<Vec<String>>,
    pub(crate) url: Option<String>,
    #[serde(default, deserialize_with = "crate::agent::config::raw::duration")]
    pub(crate) timeout: Option<String>,
}

/// One validated check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    /// argv, no shell; must exit 0.
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// Must answer 2xx.
    Http { url: String, timeout: Duration },
}

impl Check {
    /// Validates `health_check[index]`; the error is one line naming the key.
    pub(crate) fn from_config(c: &CheckConfig, index: usize) -> Result<Check, String> {
        let at = format!("health_check[{index}]");
        let timeout = crate::agent::config::bounds::HEALTH_CHECK_TIMEOUT
            .read(&format!("{at}.timeout"), c.timeout.as_deref())?;
        match (&c.command, &c.url) {
            (Some(argv), None) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(format!(
                        "{at}.command: give the program and its arguments, e.g. [\"/run/current-system/sw/bin/true\"]"
                    ));
                }
                if !argv[0].starts_with('/') {
                    return Err(format!(
                        "{at}.command: '{}' is not an absolute path (no shell and no PATH search is involved)",
                        argv[0]
                    ));
                }
                Ok(Check::Command {
                    argv: argv.clone(),
                    timeout,
                })
            }
            (None, Some(url)) => {
                let parsed = reqwest::Url::parse(url)
                    .map_err(|_| format!("{at}.url: '{url}' is not a URL"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(format!("{at}.url: '{url}' is not an http(s) URL"));
                }
                Ok(Check::Http {
                    url: url.clone(),
                    timeout,
                })
            }
            (Some(_), Some(_)) => Err(format!("{at}: give either command or url, not both")),
            (None, None) => Err(format!("{at}: give command (a list) or url")),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Check::Command { argv, .. } => argv.join(" "),
            Check::Http { url, .. } => url.clone(),
        }
    }

    /// Runs the check once; `Err` says why it failed, in one line.
    pub(crate) async fn run(&self, http: &reqwest::Client) -> Result<(), String> {
        match self {
            Check::Command { argv, timeout } => {
                let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
                match exec::run(std::path::Path::new(&argv[0]), &args, *timeout).await {
                    Ok(out) if out.status.success() => Ok(()),
                    Ok(out) => {
                        let line = out.last_line();
                        let tail = if line.is_empty() {
                            String::new()
                        } else {
                            format!(": {line}")
                        };
                        Err(format!(
                            "health check `{}` failed ({}){tail}",
                            self.describe(),
                            out.status
                        ))
                    }
                    Err(e) => Err(format!("health check `{}` failed: {e:#}", self.describe())),
                }
            }
            Check::Http { url, timeout } => match http.get(url).timeout(*timeout).send().await {
                Ok(resp) if resp.status().is_success() => Ok(()),
                Ok(resp) => Err(format!(
                    "health check {url} answered HTTP {}",
                    resp.status().as_u16()
                )),
                Err(e) => Err(format!(
                    "health check {url} failed: {}",
                    crate::plumbing::http::describe(&e)
                )),
            },
        }
    }
}

/// Units that failed after the deploy and had not failed before it (the agent's own step units
/// excepted: a rolled-back deploy leaves its failed activation behind).
pub(crate) fn new_failures(before: &[String], after: &[String]) -> Vec<String> {
    let mut new: Vec<String> = after
        .iter()
        .filter(|u| !before.contains(u))
        .filter(|u| !crate::agent::apply::is_step_unit(u))
        .cloned()
        .collect();
    new.sort();
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(command: Option<&[&str]>, url: Option<&str>, timeout: Option<&str>) -> CheckConfig {
        CheckConfig {
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            url: url.map(str::to_string),
            timeout: timeout.map(str::to_string),
        }
    }

    #[test]
    fn validation_names_the_key() {
        assert_eq!(
            Check::from_config(&cfg(Some(&["/bin/true"]), None, None), 0).unwrap(),
            Check::Command {
                argv: vec!["/bin/true".into()],
                timeout: Duration::from_secs(10)
            }
        );
        let e = Check::from_config(&cfg(Some(&["curl", "-f"]), None, None), 2).unwrap_err();
        assert!(
            e.starts_with("health_check[2].command: 'curl' is not an absolute path"),
            "{e}"
        );
        assert!(
            Check::from_config(&cfg(None, None, None), 0)
                .unwrap_err()
                .contains("give command")
        );
        assert!(Check::from_config(&cfg(Some(&["/bin/true"]), Some("http://x"), None), 0).is_err());
        assert!(Check::from_config(&cfg(None, Some("ftp://x/"), None), 0).is_err());
        assert!(
            Check::from_config(&cfg(None, Some("http://127.0.0.1/h"), Some("soon")), 1)
                .unwrap_err()
                .starts_with("health_check[1].timeout")
        );
    }

    #[tokio::test]
    async fn commands_pass_fail_and_time_out() {
        let http = crate::plumbing::tls::client_builder().build().unwrap();
        let ok = Check::from_config(&cfg(Some(&["/bin/true"]), None, None), 0).unwrap();
        assert_eq!(ok.run(&http).await, Ok(()));
        let bad = Check::from_config(
            &cfg(
                Some(&["/bin/sh", "-c", "echo broken >&2; exit 3"]),
                None,
                None,
            ),
            0,
        )
        .unwrap();
        let e = bad.run(&http).await.unwrap_err();
        assert!(
            e.contains("exit status: 3") && e.ends_with(": broken"),
            "{e}"
        );
        let slow =
            Check::from_config(&cfg(Some(&["/bin/sleep", "5"]), None, Some("1s")), 0).unwrap();
        let started = std::time::Instant::now();
        assert!(
            slow.run(&http)
                .await
                .unwrap_err()
                .contains("did not finish")
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn http_checks_want_2xx() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let http = crate::plumbing::tls::client_builder().build().unwrap();
        let check =
            Check::from_config(&cfg(None, Some(&format!("http://{addr}/healthz")), None), 0)
                .unwrap();
        assert_eq!(check.run(&http).await, Ok(()));
        assert!(check.run(&http).await.unwrap_err().contains("HTTP 503"));
    }

    #[test]
    fn the_agents_own_step_units_never_count() {
        // A rolled-back deploy leaves its failed activation unit behind; the rollback's own
        // confirmation must not fail over it, nor over a fetch or rollback unit.
        let after: Vec<String> = [
            "hcloud-nixos-fetch-1700000000.service",
            "hcloud-nixos-activate-1700000001.service",
            "hcloud-nixos-rollback-1700000002.service",
            "web.service",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(new_failures(&[], &after), vec!["web.service".to_string()]);
        // A unit of someone else's that only starts like ours still counts.
        let theirs = vec!["hcloud-nixos-activate-web.service".to_string()];
        assert_eq!(new_failures(&[], &theirs), theirs);
    }

    #[tokio::test]
    async fn a_command_check_that_times_out_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 60 & echo $! > {}; sleep 60; true",
            pid_file.display()
        );
        let check = Check::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
            timeout: Duration::from_millis(500),
        };
        let http = crate::plumbing::tls::client_builder().build().unwrap();
        let e = check.run(&http).await.unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed and reaped by the shell's parent (us, or init once the shell is gone).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the check's background process {pid} outlived it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[tokio::test]
    async fn a_check_that_prints_without_end_is_kept_within_bounds() {
        // 64 MiB on stdout and a last line on stderr: what is kept is bounded, and the last
        // line (what the status shows) is still there.
        let check = Check::Command {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "head -c 67108864 /dev/zero; echo the app is down >&2; exit 1".into(),
            ],
            timeout: Duration::from_secs(30),
        };
        let out = exec::run(
            std::path::Path::new("/bin/sh"),
            &[
                "-c",
                "head -c 67108864 /dev/zero; echo the app is down >&2; exit 1",
            ],
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert!(
            out.stdout.len() <= 1024 * 1024 && out.stderr.len() <= 1024 * 1024,
            "kept {} and {} bytes",
            out.stdout.len(),
            out.stderr.len()
        );
        let http = crate::plumbing::tls::client_builder().build().unwrap();
        let e = check.run(&http).await.unwrap_err();
        assert!(e.ends_with(": the app is down"), "{e}");
    }

    #[test]
    fn only_new_failures_count() {
        let before = vec!["old.service".to_string()];
        let after = vec![
            "old.service".to_string(),
            "web.service".to_string(),
            "hcloud-nixos-apply-17.service".to_string(),
        ];
        assert_eq!(
            new_failures(&before, &after),
            vec!["web.service".to_string()]
        );
        assert!(new_failures(&after, &before).is_empty());
    }
}
