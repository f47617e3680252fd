//! Everything `create` checks before it creates anything: the names, the reference (FlakeHub
//! must have it), the tokens, the server type and location, the snapshot for the type's
//! architecture, the SSH keys, the user's user-data. A mistake here costs nothing: one line that
//! says what was wrong and what to do, and no server.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;

use super::CreateArgs;
use crate::agent::flakehub;
use crate::agent::flakeref::FlakeRef;
use crate::plumbing::secret::Secret;
use crate::upload::api::{Client, Image, RetryPolicy};

/// What every server of this run shares.
pub(crate) struct Plan {
    pub api: Client,
    pub flakehub_token: Secret,
    pub flake: FlakeRef,
    pub server_type: String,
    pub location: Option<String>,
    pub image: u64,
    pub ssh_keys: Vec<u64>,
    pub networks: Vec<u64>,
    pub labels: BTreeMap<String, String>,
    pub userdata: Option<Vec<u8>>,
    /// Each name with the version its reference resolves to now.
    pub versions: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ServerType {
    name: String,
    architecture: String,
}

#[derive(Deserialize)]
struct Location {
    name: String,
}

#[derive(Deserialize)]
struct NamedKey {
    id: u64,
    name: String,
}

/// A name Hetzner and DNS both take: letters, digits and `-`, dot-separated labels.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        bail!(
            "'{name}' is not a server name: use letters, digits and '-' (and '.' between labels), at most 63 characters"
        );
    }
    Ok(())
}

/// The FlakeHub token: `--flakehub-token-file`, else `FLAKEHUB_TOKEN`.
fn flakehub_token(args: &CreateArgs) -> Result<Secret> {
    let (text, from) = match &args.flakehub_token_file {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --flakehub-token-file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            std::env::var("FLAKEHUB_TOKEN").map_err(|_| {
                anyhow!("no FlakeHub token: give --flakehub-token-file FILE or set FLAKEHUB_TOKEN (a resolve-only device token is enough)")
            })?,
            "FLAKEHUB_TOKEN".to_string(),
        ),
    };
    let token = Secret::new(text.trim());
    if token.expose().is_empty() || token.expose().contains(char::is_whitespace) {
        bail!("{from} does not hold a FlakeHub token (one word, no spaces)");
    }
    Ok(token)
}

/// Checks everything that can be checked before a server exists.
pub(crate) async fn prepare(args: &CreateArgs) -> Result<Plan> {
    for (i, name) in args.names.iter().enumerate() {
        check_name(name)?;
        if args.names[..i].contains(name) {
            bail!("'{name}' is given twice");
        }
    }
    let flake: FlakeRef = args.flake.parse().map_err(|e| anyhow!("--flake: {e}"))?;
    let flakehub_token = flakehub_token(args)?;
    let token = crate::upload::token::resolve(args.token_file.as_deref())?;
    let api = Client::new(
        &crate::upload::flow::endpoint(),
        token,
        RetryPolicy::default(),
    )?;
    let arch = server_type(&api, &args.server_type).await?;
    if let Some(location) = &args.location {
        check_location(&api, location).await?;
    }
    let image = image(&api, &args.image, &arch).await?;
    let ssh_keys = ssh_keys(&api, &args.ssh_keys).await?;
    let versions = resolve_all(args, &flake, &flakehub_token).await?;
    let userdata = match &args.userdata {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("cannot read --userdata {}", path.display()))?,
        ),
        None => None,
    };
    let mut labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    labels.insert("hcloud-nixos/created-by".into(), "create".into());
    Ok(Plan {
        api,
        flakehub_token,
        flake,
        server_type: args.server_type.clone(),
        location: args.location.clone(),
        image,
        ssh_keys,
        networks: args.networks.clone(),
        labels,
        userdata,
        versions,
    })
}

/// The type's architecture (`x86` or `arm`).
async fn server_type(api: &Client, name: &str) -> Result<String> {
    let types: Vec<ServerType> = api
        .list_all("/server_types", "server_types", &[("name", name)])
        .await?;
    types
        .into_iter()
        .find(|t| t.name == name)
        .map(|t| t.architecture)
        .ok_or_else(|| {
            anyhow!("unknown server type '{name}': see the types with `hcloud server-type list`")
        })
}

async fn check_location(api: &Client, name: &str) -> Result<()> {
    let locations: Vec<Location> = api
        .list_all("/locations", "locations", &[("name", name)])
        .await?;
    if locations.iter().any(|l| l.name == name) {
        return Ok(());
    }
    bail!("unknown location '{name}': see the locations with `hcloud location list`")
}

/// `auto`: the newest available snapshot `upload` made for `arch`; else the ID given, which must
/// be for `arch`.
async fn image(api: &Client, given: &str, arch: &str) -> Result<u64> {
    if given != "auto" {
        let id: u64 = given
            .parse()
            .map_err(|_| anyhow!("--image '{given}' is not an image ID (or auto)"))?;
        let image = api.get_image(id).await?;
        if image.architecture.as_deref().is_some_and(|a| a != arch) {
            bail!(
                "image {id} is for {}, the server type for {arch}: give an image for {arch}, or another --type",
                image.architecture.unwrap_or_default()
            );
        }
        return Ok(id);
    }
    let mut images: Vec<Image> = api
        .list_all(
            "/images",
            "images",
            &[
                ("type", "snapshot"),
                ("label_selector", "hcloud-nixos/image-sha256"),
                ("architecture", arch),
                ("status", "available"),
                ("sort", "created:desc"),
            ],
        )
        .await?;
    images
        .retain(|i| i.status == "available" && i.architecture.as_deref().is_none_or(|a| a == arch));
    images.first().map(|i| i.id).ok_or_else(|| {
        let flag = if arch == "arm" { "arm" } else { "x86" };
        anyhow!(
            "no snapshot made by `hcloud-nixos upload` for {arch} in this project: upload one first (`nix run .#upload`, or `hcloud-nixos upload --image nixos.img --architecture {flag}`), or give --image ID"
        )
    })
}

/// SSH keys by name or ID.
async fn ssh_keys(api: &Client, given: &[String]) -> Result<Vec<u64>> {
    if given.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<NamedKey> = api.list_all("/ssh_keys", "ssh_keys", &[]).await?;
    given
        .iter()
        .map(|g| {
            keys.iter()
                .find(|k| k.name == *g || k.id.to_string() == *g)
                .map(|k| k.id)
                .ok_or_else(|| {
                    anyhow!("no SSH key '{g}' in this project: see them with `hcloud ssh-key list`")
                })
        })
        .collect()
}

/// The reference resolves for every name (its own `nixosConfigurations.<name>` without
/// `#attr`): FlakeHub has the release and its output.
async fn resolve_all(
    args: &CreateArgs,
    flake: &FlakeRef,
    token: &Secret,
) -> Result<BTreeMap<String, String>> {
    let client = flakehub::Client::new(&args.flakehub_api_url, Some(token.clone()))?;
    let mut versions = BTreeMap::new();
    for name in &args.names {
        let attr = flake
            .attr_or_default(name)
            .map_err(|e| anyhow!("--flake {}: {e}", args.flake))?;
        let resolved = client.resolve(flake, &attr).await.map_err(|e| {
            anyhow!("--flake {}: {e}; check the reference (and that the release was published with its output paths)", args.flake)
        })?;
        versions.insert(name.clone(), resolved.version);
    }
    Ok(versions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_hostnames() {
        for good in ["web-1", "web-1.example.com", "a"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-web", "web_1", "web..1", "web 1", &"a".repeat(64)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("is not a server name"), "{e}");
        }
    }
}
