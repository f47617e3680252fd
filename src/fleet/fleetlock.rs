//! The FleetLock backend (airlock, Kubernetes FleetLock servers): `pre-reboot` takes a slot,
//! `steady-state` gives it back. Both are re-entrant by the server's id.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{
    Acquired, Backend, Error, ErrorKind, Fleet, FleetStatus, GuardInner, Member, Purpose, SlotGuard,
};

/// What a FleetLock server answers besides 200.
#[derive(Debug, Deserialize)]
struct ServerError {
    kind: Option<String>,
    value: Option<String>,
}

pub struct FleetLockCoordinator {
    fleet: Fleet,
    me: Member,
    url: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for FleetLockCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLockCoordinator")
            .field("group", &self.fleet.group)
            .field("me", &self.me)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

enum Answer {
    Ok,
    /// Not granted: the server's reason.
    No(String),
}

impl FleetLockCoordinator {
    pub fn new(fleet: &Fleet, me: Member) -> Result<Self, Error> {
        let url = fleet
            .fleetlock
            .as_ref()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "fleet.fleetlock: missing for backend fleetlock",
                )
            })?
            .url
            .clone();
        let http = crate::plumbing::tls::client_builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("fleetlock: {}", crate::plumbing::http::describe(&e)),
                )
            })?;
        Ok(FleetLockCoordinator {
            fleet: fleet.clone(),
            me,
            url,
            http,
        })
    }

    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    async fn post(&self, op: &str) -> Result<Answer, Error> {
        let url = format!("{}/v1/{op}", self.url);
        let body = json!({"client_params": {"id": self.me.id, "group": self.fleet.group}});
        let resp = self
            .http
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unreachable,
                    format!(
                        "fleetlock unreachable ({url}): {}",
                        crate::plumbing::http::describe(&e)
                    ),
                )
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(Answer::Ok);
        }
        let text = crate::plumbing::http::read_limited(resp, 64 * 1024)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let reason = match serde_json::from_str::<ServerError>(&text) {
            Ok(ServerError { kind, value }) => {
                let kind = kind.unwrap_or_default();
                let value = value.unwrap_or_default();
                match (kind.is_empty(), value.is_empty()) {
                    (false, false) => format!("{kind}: {value}"),
                    (false, true) => kind,
                    _ => value,
                }
            }
            Err(_) => text.chars().take(200).collect::<String>(),
        };
        let reason = format!("{} {}", status.as_u16(), reason.trim().replace('\n', " "));
        if status.is_server_error() {
            return Err(Error::new(
                ErrorKind::Unreachable,
                format!("fleetlock unavailable ({url}): {reason}"),
            ));
        }
        Ok(Answer::No(reason))
    }

    pub async fn acquire(&self, purpose: Purpose) -> Result<Acquired, Error> {
        match self.post("pre-reboot").await? {
            Answer::Ok => {
                tracing::info!(purpose = %purpose, group = %self.fleet.group, "fleetlock: took a slot");
                Ok(Acquired::Granted(SlotGuard {
                    purpose,
                    slot: None,
                    inner: GuardInner::FleetLock,
                }))
            }
            Answer::No(reason) => Ok(Acquired::Waiting {
                holders: Vec::new(),
                slots: self.fleet.slots,
                detail: Some(format!("fleetlock said {reason} (holders unknown)")),
            }),
        }
    }

    pub async fn release_own(&self) -> Result<(), Error> {
        match self.post("steady-state").await? {
            Answer::Ok => {
                tracing::info!(group = %self.fleet.group, "fleetlock: gave back the slot");
                Ok(())
            }
            Answer::No(reason) => Err(Error::new(
                ErrorKind::Refused,
                format!("fleetlock refused steady-state ({}): {reason}", self.url),
            )),
        }
    }

    pub fn status(&self) -> FleetStatus {
        FleetStatus {
            backend: Backend::FleetLock,
            group: self.fleet.group.clone(),
            slots: self.fleet.slots,
            holders_known: false,
            holders: Vec::new(),
            paused: Vec::new(),
            canaries: Vec::new(),
            confirmed: Vec::new(),
        }
    }
}
