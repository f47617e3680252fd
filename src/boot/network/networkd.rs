//! Asking a running systemd-networkd to re-read its files, over D-Bus.

use anyhow::{Context, Result};

const NETWORKD: &str = "org.freedesktop.network1";

/// What became of the reload request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reload {
    Reloaded,
    /// networkd is not running (or there is no system bus yet); it reads the files when it starts.
    NotRunning,
}

/// Calls `org.freedesktop.network1.Manager.Reload` when networkd owns its name. networkd is not
/// started for this: at boot it starts after us and reads the files then.
pub(crate) async fn reload() -> Result<Reload> {
    let conn = match zbus::Connection::system().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(error = %e, "no system bus");
            return Ok(Reload::NotRunning);
        }
    };
    let dbus = zbus::fdo::DBusProxy::new(&conn)
        .await
        .context("cannot talk to the D-Bus daemon")?;
    let name = zbus::names::BusName::try_from(NETWORKD).expect("valid bus name");
    if !dbus
        .name_has_owner(name)
        .await
        .context("cannot ask the D-Bus daemon whether networkd runs")?
    {
        return Ok(Reload::NotRunning);
    }
    conn.call_method(
        Some(NETWORKD),
        "/org/freedesktop/network1",
        Some("org.freedesktop.network1.Manager"),
        "Reload",
        &(),
    )
    .await
    .context("systemd-networkd refused to reload (org.freedesktop.network1.Manager.Reload)")?;
    Ok(Reload::Reloaded)
}
