//! The server's SSH host key, made by `create` before the server exists: its private half goes to
//! the server in the user-data (the boot step installs it before sshd starts), its public half
//! into the user's `known_hosts`, so that the first connection is already verified: no trust on
//! first use, no disabled host key checking.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use russh::keys::ssh_key::LineEnding;

use crate::plumbing::secret::Secret;

/// A host key pair.
pub(crate) struct HostKey {
    /// OpenSSH's private key format; a secret like the token.
    pub private: Secret,
    /// `ssh-ed25519 AAAA... root@<name>`.
    pub public: String,
}

impl HostKey {
    /// A fresh ed25519 key for server `name`.
    pub(crate) fn generate(name: &str) -> Result<HostKey> {
        let key = crate::upload::ssh::new_key()?;
        let private = key
            .to_openssh(LineEnding::LF)
            .context("cannot write the host key in OpenSSH's format")?;
        let public = crate::upload::ssh::public_openssh(&key)?;
        Ok(HostKey {
            private: Secret::new(private.as_str()),
            public: format!("{} root@{name}", public.trim()),
        })
    }

    /// The `known_hosts` line for the server's names and addresses: the key type and key, with
    /// no comment.
    pub(crate) fn known_hosts_line(&self, hosts: &[String]) -> String {
        let mut fields = self.public.split_whitespace();
        let kind = fields.next().unwrap_or_default();
        let key = fields.next().unwrap_or_default();
        format!("{} {kind} {key}\n", hosts.join(","))
    }
}

/// The `known_hosts` file: `--known-hosts`, or `~/.ssh/known_hosts`.
pub(crate) fn known_hosts_path(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set: give --known-hosts FILE")?;
    Ok(PathBuf::from(home).join(".ssh/known_hosts"))
}

/// Records the server's key for `hosts` (its name and addresses) in `file`, after removing every
/// key recorded for them before (an address Hetzner gives again had another server's key),
/// hashed entries included (`ssh-keygen -R`). The file is created 0600 with its folder.
pub(crate) fn remember(file: &Path, hosts: &[String], key: &HostKey) -> Result<()> {
    forget(file, hosts)?;
    if let Some(dir) = file.parent() {
        crate::plumbing::files::create_dir_all_mode(dir, 0o700)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let old = match std::fs::read(file) {
        Ok(old) => old,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let mut text = old;
    if !text.is_empty() && !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    text.extend_from_slice(key.known_hosts_line(hosts).as_bytes());
    crate::plumbing::files::write_atomic(file, &text, 0o600)
        .with_context(|| format!("cannot write {}", file.display()))
}

/// Removes every key recorded for `hosts` in `file` (a server deleted after a failure).
pub(crate) fn forget(file: &Path, hosts: &[String]) -> Result<()> {
    if !file.exists() {
        return Ok(());
    }
    for host in hosts {
        let out = std::process::Command::new("ssh-keygen")
            .arg("-R")
            .arg(host)
            .arg("-f")
            .arg(file)
            .output()
            .context("cannot run ssh-keygen (OpenSSH's client) to update known_hosts")?;
        if !out.status.success() {
            anyhow::bail!(
                "ssh-keygen -R {host} -f {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    // ssh-keygen keeps the previous file beside it.
    let _ = std::fs::remove_file(PathBuf::from(format!("{}.old", file.display())));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_key_has_both_halves_and_a_known_hosts_line() {
        let key = HostKey::generate("web-1").unwrap();
        assert!(
            key.private
                .expose()
                .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n")
        );
        assert!(key.public.starts_with("ssh-ed25519 AAAA"), "{}", key.public);
        assert!(key.public.ends_with(" root@web-1"));
        let line = key.known_hosts_line(&["web-1".into(), "192.0.2.7".into()]);
        assert!(
            line.starts_with("web-1,192.0.2.7 ssh-ed25519 AAAA"),
            "{line}"
        );
        assert!(!line.contains("root@"), "{line}");
        assert_ne!(
            HostKey::generate("web-1").unwrap().public,
            key.public,
            "every key is new"
        );
    }

    #[test]
    fn remembering_replaces_what_was_known_for_the_same_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ssh/known_hosts");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(
            &file,
            "other.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOther00\n\
             192.0.2.7 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIStaleStaleStaleStaleStaleStaleStaleStale0000\n",
        )
        .unwrap();
        let key = HostKey::generate("web-1").unwrap();
        let hosts = vec!["web-1".to_string(), "192.0.2.7".to_string()];
        remember(&file, &hosts, &key).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("other.example"), "{text}");
        assert!(
            !text.contains("Stale"),
            "the old key of the address is gone: {text}"
        );
        assert_eq!(text.lines().filter(|l| l.contains("192.0.2.7")).count(), 1);
        // ssh-keygen finds it for either name.
        for host in &hosts {
            let out = std::process::Command::new("ssh-keygen")
                .args(["-F", host, "-f"])
                .arg(&file)
                .output()
                .unwrap();
            assert!(out.status.success(), "{host} not found in {text}");
        }
        forget(&file, &hosts).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("192.0.2.7") && text.contains("other.example"),
            "{text}"
        );
    }
}
