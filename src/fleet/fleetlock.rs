//! The FleetLock backend (airlock, Kubernetes FleetLock servers): `pre-reboot` takes a slot,
//! `steady-state` gives it back. Both are re-entrant by the server's id.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::url::ServerUrl;
use super::{
    Acquired, Backend, Error, ErrorKind, Fleet, FleetStatus, GuardInner, Member, Purpose, SlotGuard,
};

/// The most of a FleetLock server's answer that is read.
const MAX_ANSWER: usize = 64 * 1024;
/// The most of its reason that reaches a status line.
const MAX_REASON: usize = 200;

/// What a FleetLock server answers besides 200.
#[derive(Debug, Deserialize)]
struct ServerError {
    kind: Option<String>,
    value: Option<String>,
}

/// A FleetLock server's answer other than 200, as one line for the status: its status code and
/// `kind: value` (or the body's start, when it is not the protocol's JSON), control characters
/// made spaces, at most [`MAX_REASON`] characters of text.
pub(crate) fn reason(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ANSWER)]);
    let said = match serde_json::from_str::<ServerError>(&text) {
        Ok(ServerError { kind, value }) => {
            let kind = kind.unwrap_or_default();
            let value = value.unwrap_or_default();
            match (kind.is_empty(), value.is_empty()) {
                (false, false) => format!("{kind}: {value}"),
                (false, true) => kind,
                _ => value,
            }
        }
        Err(_) => text.into_owned(),
    };
    let said: String = super::records::one_line(said.trim())
        .chars()
        .take(MAX_REASON)
        .collect();
    format!("{status} {}", said.trim())
}

pub struct FleetLockCoordinator {
    fleet: Fleet,
    me: Member,
    url: ServerUrl,
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
    pub(crate) fn new(fleet: &Fleet, me: Member) -> Result<Self, Error> {
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

    pub(crate) fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    async fn post(&self, op: &str) -> Result<Answer, Error> {
        // Credentials in the URL go out as basic authentication; messages show `url`.
        let request_url = format!("{}/v1/{op}", self.url.expose());
        let url = format!("{}/v1/{op}", self.url.shown());
        let body = json!({"client_params": {"id": self.me.id, "group": self.fleet.group}});
        let resp = self
            .http
            .post(&request_url)
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
        let body = crate::plumbing::http::read_limited(resp, MAX_ANSWER)
            .await
            .unwrap_or_default();
        let reason = reason(status.as_u16(), &body);
        if status.is_server_error() {
            return Err(Error::new(
                ErrorKind::Unreachable,
                format!("fleetlock unavailable ({url}): {reason}"),
            ));
        }
        Ok(Answer::No(reason))
    }

    pub(crate) async fn acquire(&self, purpose: Purpose) -> Result<Acquired, Error> {
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

    pub(crate) async fn release_own(&self) -> Result<(), Error> {
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

    pub(crate) fn status(&self) -> FleetStatus {
        FleetStatus {
            backend: Backend::FleetLock,
            group: self.fleet.group.clone(),
            slots: self.fleet.slots,
            holders_known: false,
            holders: Vec::new(),
            paused: Vec::new(),
            canaries: Vec::new(),
            confirmed: Vec::new(),
            desired: None,
            poller: None,
            members: Vec::new(),
        }
    }
}
