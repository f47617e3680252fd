//! Building a running agent from its configuration and the server's user-data: the settings,
//! the programs, the FlakeHub client, the applier and the fleet coordinator.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::agent::apply::Applier;
use crate::agent::config::{self, FileConfig, Settings};
use crate::agent::flakehub;
use crate::agent::lifecycle::Context;
use crate::agent::programs::Programs;
use crate::agent::userdata;
use crate::boot::metadata::client::{Client as MetadataClient, Settings as MetadataSettings};
use crate::fleet;

/// How long to wait for the metadata service when reading user-data.
const USERDATA_DEADLINE: Duration = Duration::from_secs(30);

/// Settings, and what the user-data said besides.
pub(crate) struct Loaded {
    pub(crate) settings: Settings,
    /// Lines worth one log message each (ignored cloud-init keys, user-data problems).
    pub(crate) notes: Vec<String>,
    /// Why the user-data gave no reference, for the status line when there is none.
    pub(crate) why_no_reference: Option<String>,
    /// The Hetzner instance id (what a fleet knows this server by), when a fleet is configured;
    /// or why it could not be read.
    pub(crate) instance_id: Option<Result<String, String>>,
}

/// Reads the configuration file, fetches and parses the user-data, and merges them.
pub(crate) async fn load(config_path: &Path) -> Result<Loaded> {
    let file = config::read_file(config_path).map_err(anyhow::Error::msg)?;
    let (user, notes) = fetch_userdata(&file).await;
    let settings = config::resolve(&file, user.settings.as_ref(), |p| {
        std::fs::read_to_string(p)
    })
    .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?;
    let why_no_reference = if settings.flake.is_some() {
        None
    } else if let Some(problem) = notes.iter().find(|n| {
        n.starts_with("cannot read the user-data")
            || n.starts_with(&format!("user-data: {}.flake", userdata::SECTION))
    }) {
        Some(problem.clone())
    } else if user.settings.is_none() {
        Some("the user-data has no hcloud_nixos section".to_string())
    } else {
        Some("the user-data's hcloud_nixos section has no flake".to_string())
    };
    let instance_id = match &settings.fleet {
        None => None,
        Some(_) => Some(fetch_instance_id(&settings.metadata_url).await),
    };
    Ok(Loaded {
        settings,
        notes,
        why_no_reference,
        instance_id,
    })
}

/// `metadata/instance-id`, plain text.
async fn fetch_instance_id(url: &str) -> Result<String, String> {
    let client = MetadataClient::new(MetadataSettings {
        base_url: url.to_string(),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let body = client
        .get(
            "metadata/instance-id",
            tokio::time::Instant::now() + USERDATA_DEADLINE,
        )
        .await
        .map_err(|e| format!("cannot read this server's instance id: {e}"))?
        .unwrap_or_default();
    let id = String::from_utf8_lossy(&body).trim().to_string();
    if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "the metadata service gave no instance id ({})",
            crate::plumbing::text::quoted(&id)
        ));
    }
    Ok(id)
}

async fn fetch_userdata(file: &FileConfig) -> (userdata::UserData, Vec<String>) {
    let mut notes = Vec::new();
    let url = file
        .metadata
        .url
        .clone()
        .unwrap_or_else(|| crate::boot::metadata::client::DEFAULT_URL.to_string());
    let raw = match MetadataClient::new(MetadataSettings {
        base_url: url,
        ..Default::default()
    }) {
        Ok(client) => client
            .get("userdata", tokio::time::Instant::now() + USERDATA_DEADLINE)
            .await
            .map(Option::unwrap_or_default),
        Err(e) => Err(e),
    };
    let data = match raw {
        Ok(raw) => userdata::parse(&raw),
        Err(e) => {
            notes.push(format!("cannot read the user-data: {e}"));
            userdata::UserData::default()
        }
    };
    for problem in &data.problems {
        notes.push(format!("user-data: {problem}"));
    }
    if !data.other_keys.is_empty() {
        notes.push(format!(
            "user-data keys for cloud-init, ignored by hcloud-nixos: {}",
            data.other_keys.join(", ")
        ));
    }
    for part in &data.other_parts {
        notes.push(format!("user-data: ignored: {part}"));
    }
    (data, notes)
}

/// Builds what a cycle needs from loaded settings.
pub(crate) async fn context(loaded: Loaded) -> Result<Context> {
    let Loaded {
        settings,
        why_no_reference,
        instance_id,
        ..
    } = loaded;
    let flakehub = flakehub::Client::new(
        &settings.flakehub_api_url,
        settings.token.as_ref().map(|t| t.secret().clone()),
    )?;
    let programs = Programs::resolve(&settings.paths);
    for line in programs.describe() {
        tracing::info!("program for {line}");
    }
    if let Some(problem) = programs.deploy_problem() {
        tracing::error!("cannot deploy until this is mended: {problem}");
    }
    let applier = Applier::new(settings.apply_mode, programs.step_path())
        .await
        .context(
            "apply.mode = \"transient-unit\" needs systemd; use \"direct\" on machines without it",
        )?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let (fleet, fleet_problem) = match (&settings.fleet, instance_id) {
        (Some(f), Some(Ok(id))) => match fleet::Coordinator::new(
            f,
            fleet::Member {
                id,
                host: hostname.clone(),
            },
        ) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        },
        (Some(_), Some(Err(e))) => (None, Some(e)),
        _ => (None, None),
    };
    Ok(Context {
        settings,
        hostname,
        flakehub,
        applier,
        programs,
        login_checked: Default::default(),
        why_no_reference,
        fleet,
        fleet_problem,
    })
}

/// Logs what loading found worth saying, one warning each.
pub(crate) fn log_notes(notes: &[String]) {
    for note in notes {
        tracing::warn!("{note}");
    }
}
