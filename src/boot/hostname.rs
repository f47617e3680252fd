//! The server's hostname: deciding whether to take the metadata's, and setting it via hostnamed.

use std::path::Path;

use anyhow::{Context, Result};

use crate::boot::metadata::Hostname;

/// `--hostname`: when the metadata's hostname is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Never touch the hostname.
    Never,
    /// Only when the machine has no static hostname of its own (no or an empty /etc/hostname).
    #[default]
    Auto,
    /// Always, as the transient hostname (a static hostname still shows where one is set).
    Always,
}

/// Does the machine have a static hostname? An empty or missing file means no, as for hostnamed.
pub(crate) fn has_static_hostname(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .map(str::trim)
                .any(|l| !l.is_empty() && !l.starts_with('#'))
        })
        .unwrap_or(false)
}

/// The hostname to set, if any.
pub(crate) fn decide(
    policy: Policy,
    from_metadata: Option<&Hostname>,
    has_static: bool,
) -> Option<Hostname> {
    let name = from_metadata?;
    match policy {
        Policy::Never => None,
        Policy::Auto if has_static => None,
        Policy::Auto | Policy::Always => Some(name.clone()),
    }
}

/// Sets the transient hostname through `org.freedesktop.hostname1` (checked where it entered:
/// hostnamed refuses some names, but is not relied on).
pub(crate) async fn set_transient(name: &Hostname) -> Result<()> {
    let name = name.as_str();
    let conn = zbus::Connection::system()
        .await
        .context("cannot connect to the system D-Bus to set the hostname")?;
    conn.call_method(
        Some("org.freedesktop.hostname1"),
        "/org/freedesktop/hostname1",
        Some("org.freedesktop.hostname1"),
        "SetHostname",
        &(name, false),
    )
    .await
    .with_context(|| format!("systemd-hostnamed did not set the hostname to '{name}'"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_metadata_name_only_without_a_static_one() {
        let web = Hostname::parse("web-1").unwrap();
        let web = Some(&web);
        assert_eq!(decide(Policy::Auto, web, false).as_deref(), Some("web-1"));
        assert_eq!(decide(Policy::Auto, web, true), None);
        assert_eq!(decide(Policy::Always, web, true).as_deref(), Some("web-1"));
        assert_eq!(decide(Policy::Never, web, false), None);
        assert_eq!(decide(Policy::Always, None, false), None);
    }

    #[test]
    fn empty_or_comment_only_hostname_file_is_no_static_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostname");
        assert!(!has_static_hostname(&path));
        std::fs::write(&path, "\n# nothing\n  \n").unwrap();
        assert!(!has_static_hostname(&path));
        std::fs::write(&path, "box\n").unwrap();
        assert!(has_static_hostname(&path));
    }
}
