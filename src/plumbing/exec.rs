//! Finding and running the external programs the agent drives (fh, determinate-nixd), never
//! through a shell.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The program's absolute path: as given when it has a slash, else the first match in `PATH`.
pub fn find_program(program: &Path) -> Option<PathBuf> {
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
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The last non-empty line of stderr (or stdout), for a one-line error.
    pub fn last_line(&self) -> String {
        [&self.stderr, &self.stdout]
            .iter()
            .flat_map(|s| s.lines().rev())
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    }
}

/// Runs `program args...` with no stdin, collecting its output, killed after `timeout`.
pub async fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", program.display()))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("cannot run {}", program.display()))?,
        Err(_) => bail!(
            "{} did not finish within {}s",
            program.display(),
            timeout.as_secs()
        ),
    };
    Ok(Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
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
}
