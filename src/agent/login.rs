//! Logging the machine in to FlakeHub: determinate-nixd where it runs, fh's token file elsewhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::agent::lifecycle::state::{Login, State};
use crate::plumbing::exec;
use crate::plumbing::files;
use crate::plumbing::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(60);

/// How this machine logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Method {
    /// Determinate Nix: `determinate-nixd login token --token-file FILE`.
    DeterminateNixd(PathBuf),
    /// Upstream Nix: fh reads its own token file.
    FhAuthFile(PathBuf),
}

/// The token's fingerprint, kept in the state to notice a changed token. Not the token.
pub(crate) fn fingerprint(token: &Secret) -> String {
    let digest = Sha256::digest(token.expose().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Does `determinate-nixd status` say we are logged in?
pub(crate) fn parse_logged_in(status_output: &str) -> bool {
    status_output.lines().any(|line| {
        let line = line.trim().to_ascii_lowercase();
        line.strip_prefix("logged in:")
            .is_some_and(|rest| rest.trim() == "true")
    })
}

/// Removes the token from a program's output before it can reach a message.
fn scrub(text: &str, token: &Secret) -> String {
    if token.expose().is_empty() {
        return text.to_string();
    }
    text.replace(token.expose(), "[redacted]")
}

/// Logs in when the token changed or the login is gone; does nothing otherwise. Returns whether
/// a login happened. `run_dir` holds the token file for the moment determinate-nixd reads it.
pub(crate) async fn ensure(
    method: &Method,
    token: &Secret,
    run_dir: &Path,
    state: &mut State,
) -> Result<bool> {
    let print = fingerprint(token);
    let same_token = state
        .login
        .as_ref()
        .is_some_and(|l| l.token_sha256 == print);
    match method {
        Method::DeterminateNixd(program) => {
            if same_token && logged_in(program).await? {
                return Ok(false);
            }
            login_determinate(program, token, run_dir).await?;
            if !logged_in(program).await? {
                bail!(
                    "determinate-nixd accepted the token but `determinate-nixd status` does not say 'Logged in: true'"
                );
            }
        }
        Method::FhAuthFile(path) => {
            if same_token
                && std::fs::read(path).is_ok_and(|t| t.trim_ascii() == token.expose().as_bytes())
            {
                return Ok(false);
            }
            if let Some(dir) = path.parent() {
                files::create_dir_all_mode(dir, 0o700)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            files::write_atomic(path, token.expose().as_bytes(), 0o600)
                .with_context(|| format!("cannot write fh's token file {}", path.display()))?;
        }
    }
    state.login = Some(Login {
        token_sha256: print,
        at: crate::agent::lifecycle::state::now(),
    });
    Ok(true)
}

async fn logged_in(program: &Path) -> Result<bool> {
    let out = exec::run(program, &["status"], TIMEOUT).await?;
    Ok(parse_logged_in(&out.stdout) || parse_logged_in(&out.stderr))
}

/// A file holding the token for the moment a program reads it; removed when dropped, also when
/// the agent is stopped in the middle.
struct TokenFile(PathBuf);

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn login_determinate(program: &Path, token: &Secret, run_dir: &Path) -> Result<()> {
    files::create_dir_all_mode(run_dir, 0o700)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let file = TokenFile(run_dir.join(format!("flakehub-token.{}", std::process::id())));
    files::write_atomic(&file.0, token.expose().as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", file.0.display()))?;
    let file_arg = file.0.to_string_lossy().into_owned();
    let out = exec::run(
        program,
        &["login", "token", "--token-file", &file_arg],
        TIMEOUT,
    )
    .await;
    drop(file);
    let out = out?;
    if !out.status.success() {
        bail!(
            "determinate-nixd login failed ({}): {}",
            out.status,
            scrub(&out.last_line(), token)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_output() {
        assert!(parse_logged_in(
            "Logged in: true\nNetrc: /nix/var/determinate/netrc\n"
        ));
        assert!(!parse_logged_in("Logged in: false\n"));
        assert!(!parse_logged_in(""));
    }

    #[test]
    fn fingerprint_is_not_the_token() {
        let t = Secret::new("flakehub1_secret");
        let f = fingerprint(&t);
        assert_eq!(f.len(), 64);
        assert!(!f.contains("secret"));
        assert_ne!(f, fingerprint(&Secret::new("flakehub1_other")));
    }

    #[test]
    fn scrub_removes_the_token() {
        let t = Secret::new("flakehub1_secret");
        assert_eq!(
            scrub("bad token flakehub1_secret here", &t),
            "bad token [redacted] here"
        );
    }

    #[tokio::test]
    async fn fh_auth_file_is_written_once_and_root_only() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("home/.config/flakehub/auth");
        let method = Method::FhAuthFile(auth.clone());
        let mut state = State::default();
        let token = Secret::new("flakehub1_abc");
        assert!(
            ensure(&method, &token, dir.path(), &mut state)
                .await
                .unwrap()
        );
        assert_eq!(std::fs::read_to_string(&auth).unwrap(), "flakehub1_abc");
        assert_eq!(std::fs::metadata(&auth).unwrap().mode() & 0o777, 0o600);
        assert!(
            !ensure(&method, &token, dir.path(), &mut state)
                .await
                .unwrap(),
            "no second login"
        );
        assert!(
            ensure(
                &method,
                &Secret::new("flakehub1_new"),
                dir.path(),
                &mut state
            )
            .await
            .unwrap()
        );
        assert!(
            !serde_json::to_string(&state)
                .unwrap()
                .contains("flakehub1_")
        );
    }
}
