//! Getting the documents: from the metadata service, or this server's saved ones when it is silent.
//!
//! The service is asked within the deadline; when it cannot be reached, the metadata saved at
//! the last boot that reached it is used, if it is this server's (`cache`).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tokio::time::Instant;

use super::{Fetched, Options, Origin, Source};
use crate::boot::cache::{self, Machine, Saved};
use crate::boot::metadata::client::{self, Client, FetchError};
use crate::boot::metadata::{self, Problem};
use crate::boot::network::link::{self, Netlink};

/// The documents as the service served them.
pub(crate) struct Documents {
    pub(crate) metadata: Vec<u8>,
    /// `None` when the service has no such document (HTTP 404).
    pub(crate) private_networks: Option<Vec<u8>>,
    /// The user-data, read for the server's SSH host key only (the agent reads the rest);
    /// `None` when there is none or it did not come. Never saved: it holds secrets.
    pub(crate) userdata: Option<Vec<u8>>,
}

/// What asking the service gave, short of an error that ends the run.
pub(crate) enum Answer {
    Both(Documents),
    /// `metadata` came, `private-networks` did not before the deadline.
    MetadataOnly {
        metadata: Vec<u8>,
        why: anyhow::Error,
    },
    /// Nothing came before the deadline (or no link could be borrowed to ask).
    Unreachable(anyhow::Error),
}

/// Fetches both documents within one deadline, borrowing a link-local address first when no
/// NIC can reach a link-local service yet. An answer that says this is no Hetzner metadata
/// service (404, 403, a body too large) is an error; silence is [`Answer::Unreachable`].
pub(crate) async fn ask(source: &Source) -> Result<Answer> {
    let client = Client::new(client::Settings {
        base_url: source.url.clone(),
        ..Default::default()
    })?;
    let deadline = Instant::now() + source.deadline;
    if !link::url_needs_link(client.base_url()) {
        return ask_documents(&client, deadline).await;
    }
    let netlink = match Netlink::connect() {
        Ok(n) => n,
        Err(e) => return Ok(Answer::Unreachable(e)),
    };
    let links = match netlink.links().await {
        Ok(links) => links,
        Err(e) => return Ok(Answer::Unreachable(e)),
    };
    let Some(borrow) = link::link_to_borrow(&links) else {
        return ask_documents(&client, deadline).await;
    };
    tracing::info!(
        link = %borrow.name,
        address = %link::TEMPORARY_ADDRESS,
        "no NIC has an IPv4 address yet; borrowing a link-local address to reach the metadata service"
    );
    let borrowed = match netlink.borrow(borrow).await {
        Ok(b) => b,
        Err(e) => return Ok(Answer::Unreachable(e)),
    };
    let result = ask_documents(&client, deadline).await;
    let name = borrowed.link_name().to_string();
    let given_back = netlink.give_back(borrowed).await;
    let answer = result?;
    given_back?;
    tracing::debug!(link = %name, "temporary address removed");
    Ok(answer)
}

async fn ask_documents(client: &Client, deadline: Instant) -> Result<Answer> {
    let url = format!("{}metadata", client.base_url());
    let metadata = match client.get("metadata", deadline).await {
        Ok(Some(body)) => body,
        Ok(None) => bail!(
            "{url} does not exist (HTTP 404): is this a Hetzner Cloud server, and is --metadata-url right?"
        ),
        Err(e @ FetchError::Deadline { .. }) => return Ok(Answer::Unreachable(e.into())),
        Err(e) => return Err(e.into()),
    };
    match client.get("metadata/private-networks", deadline).await {
        Ok(private_networks) => {
            if private_networks.is_none() {
                tracing::warn!(
                    "the metadata service has no private-networks document; assuming none"
                );
            }
            let userdata = match client.get("userdata", deadline).await {
                Ok(userdata) => userdata,
                Err(e) => {
                    tracing::warn!(
                        "the user-data did not come ({e:#}); an SSH host key it may hold is not installed"
                    );
                    None
                }
            };
            Ok(Answer::Both(Documents {
                metadata,
                private_networks,
                userdata,
            }))
        }
        Err(e @ FetchError::Deadline { .. }) => Ok(Answer::MetadataOnly {
            metadata,
            why: e.into(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// The documents' text; a body that is not UTF-8 is a problem of its document.
fn utf8<'a>(body: &'a [u8], document: &'static str) -> Result<&'a str, Problem> {
    std::str::from_utf8(body).map_err(|e| Problem {
        document,
        field: "(document)".into(),
        problem: format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })
}

/// Parses both documents. `metadata` must be a YAML mapping; a `private-networks` document
/// that cannot be used costs the private networks only.
pub(crate) fn parse(docs: &Documents, origin: Origin) -> Result<Fetched> {
    let parsed = metadata::parse_metadata(utf8(&docs.metadata, "metadata")?)?;
    let mut problems = parsed.problems;
    let private_networks = match &docs.private_networks {
        None => Vec::new(),
        Some(body) => {
            match utf8(body, "private-networks").and_then(metadata::parse_private_networks) {
                Ok(p) => {
                    problems.extend(p.problems);
                    p.value
                }
                Err(p) => {
                    problems.push(Problem {
                        problem: format!("{}; no private network is configured", p.problem),
                        ..p
                    });
                    Vec::new()
                }
            }
        }
    };
    let host_key = docs.userdata.as_deref().and_then(|raw| {
        let userdata = crate::agent::userdata::parse(raw);
        problems.extend(
            (userdata.problems.into_iter())
                .filter(|p| p.starts_with("ssh_keys"))
                .map(|problem| Problem {
                    document: "userdata",
                    field: "ssh_keys".into(),
                    problem,
                }),
        );
        userdata.host_key
    });
    Ok(Fetched {
        metadata: parsed.value,
        private_networks,
        problems,
        origin,
        host_key,
    })
}

/// The documents to save: both as text (a private-networks body that is not UTF-8 is left out).
fn to_saved(docs: &Documents) -> Option<Saved> {
    let metadata = String::from_utf8(docs.metadata.clone()).ok()?;
    let private = docs
        .private_networks
        .as_ref()
        .and_then(|b| String::from_utf8(b.clone()).ok());
    Some(Saved::new(metadata, private))
}

/// The documents for `network`: fresh from the service (and saved for a later boot), or, when
/// the service cannot be reached, the saved ones of this server.
pub(crate) async fn fetch_or_saved(source: &Source, opts: &Options) -> Result<Fetched> {
    match ask(source).await? {
        Answer::Both(docs) => {
            let fetched = parse(&docs, Origin::Service)?;
            if !opts.dry_run
                && let Some(saved) = to_saved(&docs)
                && let Err(e) = cache::save(&opts.state_dir, &saved)
            {
                tracing::warn!(
                    "{e:#}; a boot without the metadata service will have no metadata to fall back on"
                );
            }
            Ok(fetched)
        }
        Answer::MetadataOnly { metadata, why } => {
            let mut docs = Documents {
                metadata,
                private_networks: None,
                userdata: None,
            };
            let fresh = parse(&docs, Origin::Service)?;
            let saved = load_saved(&opts.state_dir).filter(|s| {
                let id = |text: &str| metadata::parse_metadata(text).ok()?.value.instance_id;
                fresh.metadata.instance_id.is_some()
                    && id(&s.metadata) == fresh.metadata.instance_id
            });
            match saved {
                Some(saved) => {
                    tracing::warn!(
                        "private-networks did not come ({why:#}); using the one saved at {}",
                        saved.when()
                    );
                    docs.private_networks = saved.private_networks.map(String::into_bytes);
                    parse(&docs, Origin::Service)
                }
                None => {
                    tracing::warn!(
                        "private-networks did not come ({why:#}), and none of this server was saved; private networks are left to DHCP"
                    );
                    Ok(fresh)
                }
            }
        }
        Answer::Unreachable(why) => from_saved(why, opts).await,
    }
}

/// The saved documents, `None` (with a warning for a damaged file) when there are none.
fn load_saved(dir: &Path) -> Option<Saved> {
    cache::load(dir).unwrap_or_else(|e| {
        tracing::warn!("{e:#}");
        None
    })
}

/// The saved documents, when they are this machine's; otherwise the reason, after `why` the
/// service could not be reached, in one error line.
async fn from_saved(why: anyhow::Error, opts: &Options) -> Result<Fetched> {
    let file = cache::path(&opts.state_dir);
    let saved = match cache::load(&opts.state_dir) {
        Ok(Some(saved)) => saved,
        Ok(None) => bail!(
            "{why:#}; and no metadata was saved at an earlier boot to fall back on ({} does not exist)",
            file.display()
        ),
        Err(e) => bail!("{why:#}; and the saved metadata cannot be used: {e:#}"),
    };
    let when = saved.when();
    let docs = Documents {
        metadata: saved.metadata.into_bytes(),
        private_networks: saved.private_networks.map(String::into_bytes),
        userdata: None,
    };
    let mut fetched = parse(
        &docs,
        Origin::Saved {
            saved_at: saved.saved_at,
        },
    )
    .with_context(|| format!("{why:#}; and the metadata saved in {}", file.display()))?;
    let machine = machine(&opts.dmi_dir)
        .await
        .with_context(|| format!("{why:#}; and this machine's links cannot be listed"))?;
    match cache::check_owner(&fetched.metadata, &mut fetched.private_networks, &machine) {
        Ok(problems) => fetched.problems.extend(problems),
        Err(not_ours) => {
            return Err(anyhow!(
                "the metadata saved at {when} is not this server's: {not_ours}; nothing is configured from it, and {why:#}"
            ));
        }
    }
    tracing::warn!(
        error = %format!("{why:#}"),
        "the metadata service cannot be reached; configuring this server from its metadata saved at {when}"
    );
    Ok(fetched)
}

/// This machine's MACs (netlink) and SMBIOS serial.
async fn machine(dmi_dir: &Path) -> Result<Machine> {
    let links = Netlink::connect()?.links().await?;
    Ok(Machine {
        macs: links.iter().filter_map(|l| l.mac).collect(),
        serial: cache::hetzner_serial(dmi_dir),
    })
}

/// Fetches and parses both documents from the service, without falling back (for `metadata`).
pub(crate) async fn fetch(source: &Source) -> Result<Fetched> {
    match ask(source).await? {
        Answer::Both(docs) => parse(&docs, Origin::Service),
        Answer::MetadataOnly { why, .. } | Answer::Unreachable(why) => Err(why),
    }
}
