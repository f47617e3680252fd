//! The server's SSH host key from the user-data, put where sshd reads it before sshd starts.
//!
//! `hcloud-nixos create` passes an ed25519 host key in the user-data (cloud-init's `ssh_keys`)
//! and records its public half in the user's `known_hosts`, so the first connection is verified.
//! NixOS's sshd reads `/etc/ssh/ssh_host_ed25519_key` (`services.openssh.hostKeys`) and generates
//! it only when it is missing, so a key written there first is the one sshd presents.

use std::path::Path;

use anyhow::{Context, Result};

use crate::agent::userdata::HostKey;
use crate::plumbing::files;

/// Where NixOS's sshd looks for its host keys.
pub const DEFAULT_DIR: &str = "/etc/ssh";
const PRIVATE_NAME: &str = "ssh_host_ed25519_key";
const PUBLIC_NAME: &str = "ssh_host_ed25519_key.pub";

/// What installing the key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Installed {
    /// The files were written (the first boot, or another key was there).
    Written,
    /// The files already held this key.
    Unchanged,
    /// There is no host key directory: sshd is not installed here (NixOS creates `/etc/ssh`
    /// when `services.openssh` is enabled), so there is no one to present the key.
    NoSshd,
}

/// Writes the key pair into `dir` unless it is there already: the private half root-only
/// (0600), the public half 0644, each written whole (temporary file, fsync, rename).
pub(crate) fn install(dir: &Path, key: &HostKey) -> Result<Installed> {
    if !dir.is_dir() {
        return Ok(Installed::NoSshd);
    }
    let private = dir.join(PRIVATE_NAME);
    let public = dir.join(PUBLIC_NAME);
    let same =
        |path: &Path, text: &str| std::fs::read(path).is_ok_and(|held| held == text.as_bytes());
    if same(&private, key.private.expose())
        && same(&public, &key.public)
        && mode(&private) == Some(0o600)
    {
        return Ok(Installed::Unchanged);
    }
    // The private half first: a crash between the two leaves sshd a key it can derive the
    // public half from.
    files::write_atomic(&private, key.private.expose().as_bytes(), 0o600)
        .with_context(|| format!("cannot write the SSH host key {}", private.display()))?;
    files::write_atomic(&public, key.public.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", public.display()))?;
    Ok(Installed::Written)
}

fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.permissions().mode() & 0o7777)
}

/// The private key file's path in `dir` (for messages).
pub(crate) fn private_path(dir: &Path) -> std::path::PathBuf {
    dir.join(PRIVATE_NAME)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn key() -> HostKey {
        let (private, public) = crate::agent::userdata::hostkey::generated_pair();
        HostKey::new(&private, &public).unwrap()
    }

    #[test]
    fn the_key_is_written_root_only_then_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join("etc/ssh");
        let key = key();
        // No /etc/ssh: no sshd to present the key, nothing written, no error.
        assert_eq!(install(&ssh, &key).unwrap(), Installed::NoSshd);
        assert!(!ssh.exists());
        std::fs::create_dir_all(&ssh).unwrap();
        assert_eq!(install(&ssh, &key).unwrap(), Installed::Written);
        let private = ssh.join(PRIVATE_NAME);
        assert_eq!(
            std::fs::read_to_string(&private).unwrap(),
            key.private.expose()
        );
        assert_eq!(mode(&private), Some(0o600));
        assert_eq!(mode(&ssh.join(PUBLIC_NAME)), Some(0o644));
        assert_eq!(install(&ssh, &key).unwrap(), Installed::Unchanged);
        // A key sshd generated itself (or a looser mode) is replaced by the one create knows.
        std::fs::write(&private, "other").unwrap();
        assert_eq!(install(&ssh, &key).unwrap(), Installed::Written);
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(install(&ssh, &key).unwrap(), Installed::Written);
        assert_eq!(mode(&private), Some(0o600));
    }
}
