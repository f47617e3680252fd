//! Talking to systemd (PID 1) over D-Bus: transient units for applies, and what a unit became.

use anyhow::{Context, Result};
use zbus::{OwnedObjectPath, Variant as Value};

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// What a unit is doing, or what it ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnitStatus {
    /// `active`, `activating`, `deactivating`, `failed`, `inactive`.
    pub(crate) active_state: String,
    pub(crate) sub_state: String,
    /// The service's `Result`: `success`, `exit-code`, `signal`, `timeout`, ...
    pub(crate) result: String,
    /// The main process's exit status (or signal number).
    pub(crate) exec_main_status: i32,
    /// The unit has left `inactive` at least once (InactiveExitTimestampMonotonic is set).
    pub(crate) started: bool,
    /// A job (its start, right after StartTransientUnit) is queued for the unit.
    pub(crate) job_pending: bool,
}

impl UnitStatus {
    /// The process has ended (successfully or not). A unit that is `inactive` because its start
    /// job has not run yet has not ended: StartTransientUnit returns when the job is queued.
    pub(crate) fn finished(&self) -> bool {
        match self.active_state.as_str() {
            "failed" => true,
            "inactive" => self.started && !self.job_pending,
            "active" => self.sub_state == "exited",
            _ => false,
        }
    }

    /// Loaded but never started, and nothing queued to start it: it will never run.
    pub(crate) fn never_ran(&self) -> bool {
        self.active_state == "inactive" && !self.started && !self.job_pending
    }

    pub(crate) fn succeeded(&self) -> bool {
        self.finished() && self.result == "success" && self.exec_main_status == 0
    }

    /// One line for a person: `exited with status 1`, `killed by signal 9`.
    pub(crate) fn describe(&self) -> String {
        match self.result.as_str() {
            "success" => "finished successfully".to_string(),
            "exit-code" => format!("exited with status {}", self.exec_main_status),
            "signal" | "core-dump" => format!("killed by signal {}", self.exec_main_status),
            "timeout" => "timed out".to_string(),
            other => format!("ended with result '{other}'"),
        }
    }
}

/// A command to run in a transient service.
#[derive(Debug, Clone)]
pub(crate) struct TransientService {
    pub(crate) name: String,
    pub(crate) description: String,
    /// Absolute program path, then its arguments.
    pub(crate) argv: Vec<String>,
    /// `KEY=value` pairs.
    pub(crate) environment: Vec<String>,
    /// Extra journal fields for every line the service logs (`KEY=value`).
    pub(crate) log_fields: Vec<String>,
}

/// A connection to the system manager.
#[derive(Clone)]
pub(crate) struct Systemd {
    conn: zbus::Connection,
}

impl Systemd {
    pub(crate) async fn connect() -> Result<Self> {
        let conn = zbus::Connection::system()
            .await
            .context("cannot connect to the system D-Bus (is systemd running?)")?;
        Ok(Systemd { conn })
    }

    /// Starts the service; it keeps running whatever happens to us, and stays loaded after it
    /// ends (RemainAfterExit) so that its result can be read later, even by a restarted agent.
    pub(crate) async fn start_transient_service(&self, svc: &TransientService) -> Result<()> {
        let program = svc.argv.first().context("empty command")?.clone();
        let exec: Vec<(String, Vec<String>, bool)> = vec![(program, svc.argv.clone(), false)];
        let properties: Vec<(&str, Value<'_>)> = vec![
            ("Description", Value::from(svc.description.as_str())),
            ("Type", Value::from("exec")),
            ("RemainAfterExit", Value::from(true)),
            ("ExecStart", Value::from(exec)),
            ("Environment", Value::from(svc.environment.clone())),
            // systemd takes journal fields as byte arrays (aay), not strings.
            (
                "LogExtraFields",
                Value::from(
                    svc.log_fields
                        .iter()
                        .map(|f| f.as_bytes().to_vec())
                        .collect::<Vec<Vec<u8>>>(),
                ),
            ),
            ("SyslogIdentifier", Value::from("hcloud-nixos-apply")),
        ];
        let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        self.conn
            .call_method(
                Some(DEST),
                PATH,
                Some(MANAGER),
                "StartTransientUnit",
                &(svc.name.as_str(), "fail", properties, aux),
            )
            .await
            .with_context(|| format!("systemd did not start the transient unit {}", svc.name))?;
        Ok(())
    }

    /// The unit's state, or `None` when systemd has no such unit loaded.
    pub(crate) async fn unit_status(&self, name: &str) -> Result<Option<UnitStatus>> {
        let reply = self
            .conn
            .call_method(Some(DEST), PATH, Some(MANAGER), "GetUnit", &(name,))
            .await;
        let path: OwnedObjectPath = match reply {
            Ok(msg) => msg.body().deserialize()?,
            Err(zbus::Error::MethodError(err, _, _))
                if err.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot ask systemd about {name}")),
        };
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(DEST)
            .path(path)
            .build()
            .await?;
        let unit =
            zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Unit");
        let service = zbus::names::InterfaceName::from_static_str_unchecked(
            "org.freedesktop.systemd1.Service",
        );
        // The unit's properties in one call, so that they describe one moment: read one by one,
        // a start job that runs between two reads makes a running unit look finished (a stale
        // `inactive` beside a fresh start timestamp and no job), and the agent would stop it.
        let mut all = props.get_all(unit).await?;
        let mut take = |key: &str| all.remove(key);
        let text = |v: Option<zbus::OwnedVariant>| {
            v.and_then(|v| String::try_from(v).ok()).unwrap_or_default()
        };
        let active_state = text(take("ActiveState"));
        let sub_state = text(take("SubState"));
        let started = take("InactiveExitTimestampMonotonic")
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0)
            > 0;
        let job: (u32, OwnedObjectPath) = take("Job")
            .and_then(|v| v.try_into().ok())
            .unwrap_or((0, OwnedObjectPath::default()));
        // The service's result is final once the unit above has finished; read after it.
        let result = text(Some(props.get(service.clone(), "Result").await?));
        let exec_main_status =
            i32::try_from(props.get(service, "ExecMainStatus").await?).unwrap_or(-1);
        Ok(Some(UnitStatus {
            active_state,
            sub_state,
            result,
            exec_main_status,
            started,
            job_pending: job.0 != 0,
        }))
    }

    /// A unit's timestamp property (`ActiveEnterTimestamp`, `ExecMainExitTimestamp`, ...), in
    /// microseconds since the epoch; `None` when the unit is not loaded or the moment has not
    /// come.
    pub(crate) async fn unit_timestamp(&self, name: &str, property: &str) -> Option<u64> {
        let reply = self
            .conn
            .call_method(Some(DEST), PATH, Some(MANAGER), "GetUnit", &(name,))
            .await
            .ok()?;
        let path: OwnedObjectPath = reply.body().deserialize().ok()?;
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(DEST)
            .path(path)
            .build()
            .await
            .ok()?;
        let unit =
            zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Unit");
        let service = zbus::names::InterfaceName::from_static_str_unchecked(
            "org.freedesktop.systemd1.Service",
        );
        let value = match props.get(unit, property).await {
            Ok(v) => v,
            Err(_) => props.get(service, property).await.ok()?,
        };
        u64::try_from(value).ok().filter(|usec| *usec > 0)
    }

    /// Stops and unloads a finished unit (its log stays in the journal).
    pub(crate) async fn forget_unit(&self, name: &str) {
        let _ = self
            .conn
            .call_method(
                Some(DEST),
                PATH,
                Some(MANAGER),
                "StopUnit",
                &(name, "replace"),
            )
            .await;
        let _ = self
            .conn
            .call_method(Some(DEST), PATH, Some(MANAGER), "ResetFailedUnit", &(name,))
            .await;
    }

    /// Names of the units that are in the `failed` state.
    pub(crate) async fn failed_units(&self) -> Result<Vec<String>> {
        type Unit = (
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        );
        let reply = self
            .conn
            .call_method(
                Some(DEST),
                PATH,
                Some(MANAGER),
                "ListUnitsFiltered",
                &(vec!["failed"],),
            )
            .await
            .context("cannot list failed units")?;
        let units: Vec<Unit> = reply.body().deserialize()?;
        Ok(units.into_iter().map(|u| u.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(active: &str, sub: &str, result: &str, code: i32) -> UnitStatus {
        UnitStatus {
            active_state: active.into(),
            sub_state: sub.into(),
            result: result.into(),
            exec_main_status: code,
            started: true,
            job_pending: false,
        }
    }

    #[test]
    fn reads_what_a_unit_became() {
        assert!(!status("activating", "start", "success", 0).finished());
        assert!(!status("active", "running", "success", 0).finished());
        assert!(status("active", "exited", "success", 0).succeeded());
        let failed = status("failed", "failed", "exit-code", 1);
        assert!(failed.finished() && !failed.succeeded());
        assert_eq!(failed.describe(), "exited with status 1");
        assert_eq!(
            status("failed", "failed", "signal", 9).describe(),
            "killed by signal 9"
        );
        // Right after StartTransientUnit the start job is queued and the unit still inactive.
        let queued = UnitStatus {
            started: false,
            job_pending: true,
            ..status("inactive", "dead", "success", 0)
        };
        assert!(!queued.finished() && !queued.never_ran());
        let never = UnitStatus {
            started: false,
            ..status("inactive", "dead", "success", 0)
        };
        assert!(!never.finished() && never.never_ran());
        assert!(status("inactive", "dead", "success", 0).finished());
    }
}
