//! Root's SSH keys from the metadata, in a file of their own that sshd reads besides the user's.

use std::path::Path;

use anyhow::{Context, Result};

use crate::boot::metadata::SshKey;
use crate::plumbing::files;

/// Where the NixOS module points sshd's extra `AuthorizedKeysFile` (`/run/hcloud-nixos/authorized_keys/%u`).
pub const DEFAULT_KEYS_FILE: &str = "/run/hcloud-nixos/authorized_keys/root";

/// The file's contents for these keys (each checked where it entered: one line, no options).
pub(crate) fn render(keys: &[SshKey]) -> String {
    let mut out = String::from(
        "# SSH keys of this server in the Hetzner metadata service.\n\
         # Written by `hcloud-nixos network` at every boot; keys in ~/.ssh/authorized_keys stay as they are.\n",
    );
    for key in keys {
        out.push_str(key.as_str());
        out.push('\n');
    }
    out
}

/// Writes the keys file, readable by root only, creating its directory.
pub(crate) fn write(path: &Path, contents: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        files::create_dir_all_mode(dir, 0o755)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    files::write_atomic(path, contents.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_a_line_after_a_comment() {
        let text = render(&[SshKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA a@b").unwrap()]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with('#') && lines[1].starts_with('#'));
        assert_eq!(lines[2], "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA a@b");
        assert_eq!(lines.len(), 3);
    }
}
