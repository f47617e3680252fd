//! Finding and running the external programs the agent drives (fh, determinate-nixd, nix-env,
//! health checks), never through a shell: each in a process group of its own that a timeout
//! kills whole, its output kept within bounds.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The program's absolute path: as given when it has a slash, else the first match in `PATH`.
pub(crate) fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 || program.is_absolute() {
        let p = std::path::absolute(program).ok()?;
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// What a finished program said.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) status: std::process::ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    /// The last non-empty line of stderr (or stdout), for a one-line error.
    pub(crate) fn last_line(&self) -> String {
        [&self.stderr, &self.stdout]
            .iter()
            .flat_map(|s| s.lines().rev())
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    }
}

/// Bytes of each output stream [`run`] keeps: the end, where a program says what went wrong.
pub(crate) const MAX_OUTPUT: usize = 64 * 1024;

/// The last `MAX_OUTPUT` bytes of a stream, read to its end.
#[derive(Default)]
struct Tail {
    kept: std::collections::VecDeque<u8>,
}

impl Tail {
    async fn fill(&mut self, reader: Option<impl tokio::io::AsyncRead + Unpin>) {
        use tokio::io::AsyncReadExt;
        let Some(mut reader) = reader else { return };
        let mut chunk = [0u8; 8192];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.kept.extend(&chunk[..n]);
                    let excess = self.kept.len().saturating_sub(MAX_OUTPUT);
                    self.kept.drain(..excess);
                }
            }
        }
    }

    fn text(self) -> String {
        let bytes: Vec<u8> = self.kept.into();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Runs `program args...` with no stdin, in a process group of its own, collecting the end of
/// its output ([`MAX_OUTPUT`] bytes of each stream). After `timeout` the whole group is killed:
/// what the program started does not outlive it.
pub(crate) async fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let group = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Tail::default(), Tail::default());
    // Done when the program has exited and nothing it started still holds its output.
    let finished = tokio::time::timeout(timeout, async {
        let (status, (), ()) = tokio::join!(child.wait(), out.fill(stdout), err.fill(stderr));
        status
    })
    .await;
    match finished {
        Ok(status) => Ok(Output {
            status: status.with_context(|| format!("cannot run {}", program.display()))?,
            stdout: out.text(),
            stderr: err.text(),
        }),
        Err(_) => {
            kill_group(group);
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            bail!(
                "{} did not finish within {} and was killed with everything it started",
                program.display(),
                humantime::format_duration(timeout)
            )
        }
    }
}

/// Sends SIGKILL to the process group led by `leader` (never to group 0 or 1: ourselves, init).
pub(crate) fn kill_group(leader: Option<u32>) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Some(pgid) = leader
        .and_then(|p| i32::try_from(p).ok())
        .filter(|p| *p > 1)
    {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_path_and_by_path() {
        assert!(find_program(Path::new("sh")).is_some_and(|p| p.is_absolute()));
        assert_eq!(
            find_program(Path::new("/bin/sh")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(find_program(Path::new("surely-no-such-program-here")), None);
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        assert_eq!(find_program(&plain), None, "not executable");
    }

    #[tokio::test]
    async fn runs_with_a_timeout() {
        let out = run(
            Path::new("/bin/sh"),
            &["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.last_line(), "err");
        let slow = run(Path::new("/bin/sleep"), &["5"], Duration::from_millis(100)).await;
        assert!(slow.unwrap_err().to_string().contains("did not finish"));
    }

    #[tokio::test]
    async fn keeps_the_end_of_long_output() {
        let out = run(
            Path::new("/bin/sh"),
            &["-c", "seq 1 100000; echo the end"],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(out.stdout.len(), MAX_OUTPUT);
        assert!(out.stdout.ends_with("100000\nthe end\n"));
        assert_eq!(out.last_line(), "the end");
    }
}
