//! FlakeHub API client: resolving a flake output reference to an exact release and store path.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::flakeref::FlakeRef;
use crate::plumbing::http::{BodyError, describe, read_limited};
use crate::plumbing::secret::Secret;

pub const DEFAULT_API_URL: &str = "https://api.flakehub.com";

/// A release's JSON carries its README; a list of them can be large, but not this large.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// One release of a flake, as `GET /version/...` and `GET /f/.../releases` give it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Release {
    pub version: String,
    #[serde(default)]
    pub simplified_version: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub commit_count: Option<u64>,
    #[serde(default)]
    pub published_at: Option<String>,
    #[serde(default)]
    pub yanked_at: Option<String>,
}

impl Release {
    pub fn is_yanked(&self) -> bool {
        self.yanked_at.as_deref().is_some_and(|s| !s.is_empty())
    }
}

/// A flake output at one release.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Output {
    #[serde(default)]
    pub attribute_path: Option<String>,
    #[serde(default)]
    pub store_path: Option<String>,
}

/// What a reference resolves to right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub version: String,
    pub attr: String,
    pub store_path: String,
    pub published_at: Option<String>,
}

/// Why FlakeHub could not resolve a reference. Messages are one line and carry no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "FlakeHub rejected the token (HTTP {0}): log in with a valid token (user-data flakehub_token or flakehub.token_file)"
    )]
    Unauthorized(u16),
    #[error("{0}")]
    NotFound(String),
    #[error("FlakeHub answered {what} with HTTP {status}")]
    Status { what: String, status: u16 },
    #[error("cannot reach FlakeHub at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("FlakeHub's answer to {what} is not what was expected: {why}")]
    Invalid { what: String, why: String },
}

impl Error {
    /// Worth trying again soon (the network, FlakeHub itself), as opposed to a setting to fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// The FlakeHub API.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    api_url: reqwest::Url,
    token: Option<Secret>,
    /// The last output resolved: a release's output at an exact version never changes, so an
    /// idle poll that finds the same release costs one request, not two.
    last: std::sync::Arc<std::sync::Mutex<Option<(String, Resolved)>>>,
}

impl Client {
    pub fn new(api_url: &str, token: Option<Secret>) -> anyhow::Result<Self> {
        let mut api_url = reqwest::Url::parse(api_url)
            .map_err(|_| anyhow::anyhow!("flakehub.api_url '{api_url}' is not a URL"))?;
        if !api_url.path().ends_with('/') {
            let path = format!("{}/", api_url.path());
            api_url.set_path(&path);
        }
        let http = crate::plumbing::tls::client_builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Client {
            http,
            api_url,
            token,
            last: Default::default(),
        })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.api_url.clone();
        {
            let mut path = url.path_segments_mut().expect("http URL has a path");
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
        }
        url
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
        what: &str,
    ) -> Result<T, Error> {
        let url = self.url(segments);
        let mut req = self.http.get(url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose());
        }
        let resp = req.send().await.map_err(|e| Error::Unreachable {
            url: self.api_url.to_string(),
            why: describe(&e),
        })?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => {}
            401 | 403 => return Err(Error::Unauthorized(status)),
            404 => return Err(Error::NotFound(format!("FlakeHub has no {what}"))),
            _ => {
                return Err(Error::Status {
                    what: what.to_string(),
                    status,
                });
            }
        }
        let body = read_limited(resp, MAX_BODY).await.map_err(|e| match e {
            BodyError::TooLarge => Error::Invalid {
                what: what.to_string(),
                why: format!("larger than {MAX_BODY} bytes"),
            },
            BodyError::Cut(why) => Error::Unreachable {
                url: self.api_url.to_string(),
                why,
            },
        })?;
        serde_json::from_slice(&body).map_err(|e| Error::Invalid {
            what: what.to_string(),
            why: e.to_string(),
        })
    }

    /// The release matching the reference's version constraint.
    pub async fn release(&self, flake: &FlakeRef) -> Result<Release, Error> {
        let what = format!(
            "release of {}/{} matching '{}'",
            flake.org, flake.flake, flake.version
        );
        self.get(
            &["version", &flake.org, &flake.flake, &flake.version],
            &what,
        )
        .await
    }

    /// Every release of the flake.
    pub async fn releases(&self, flake: &FlakeRef) -> Result<Vec<Release>, Error> {
        let what = format!("releases of {}/{}", flake.org, flake.flake);
        self.get(&["f", &flake.org, &flake.flake, "releases"], &what)
            .await
    }

    /// The output `attr` at exactly `version`.
    pub async fn output(
        &self,
        flake: &FlakeRef,
        version: &str,
        attr: &str,
    ) -> Result<Output, Error> {
        let what = format!(
            "output {attr} of {}/{} at version {version}",
            flake.org, flake.flake
        );
        let exact = format!("={version}");
        self.get(
            &["f", &flake.org, &flake.flake, &exact, "output", attr],
            &what,
        )
        .await
    }

    /// Resolves the reference: the newest matching release that is not yanked, then the store
    /// path of the output at exactly that version.
    pub async fn resolve(&self, flake: &FlakeRef, attr: &str) -> Result<Resolved, Error> {
        let mut release = self.release(flake).await?;
        if release.is_yanked() {
            let all = self.releases(flake).await?;
            release = newest_unyanked(&all, &flake.version).ok_or_else(|| {
                Error::NotFound(format!(
                    "FlakeHub has no release of {}/{} matching '{}' that is not yanked",
                    flake.org, flake.flake, flake.version
                ))
            })?;
        }
        let key = format!("{}/{}", flake.org, flake.flake);
        if let Ok(last) = self.last.lock()
            && let Some((known_key, known)) = last.as_ref()
            && *known_key == key
            && known.version == release.version
            && known.attr == attr
        {
            return Ok(Resolved {
                published_at: release.published_at,
                ..known.clone()
            });
        }
        let output = self.output(flake, &release.version, attr).await?;
        let store_path = output.store_path.filter(|p| !p.is_empty()).ok_or_else(|| Error::Invalid {
            what: format!("output {attr} of {}/{} at version {}", flake.org, flake.flake, release.version),
            why: "it has no store path: publish the release with output paths included (include-output-paths: true)"
                .to_string(),
        })?;
        if !is_store_path(&store_path) {
            return Err(Error::Invalid {
                what: format!("output {attr} at version {}", release.version),
                why: format!("'{store_path}' is not a Nix store path"),
            });
        }
        let resolved = Resolved {
            version: release.version,
            attr: attr.to_string(),
            store_path,
            published_at: release.published_at,
        };
        if let Ok(mut last) = self.last.lock() {
            *last = Some((key, resolved.clone()));
        }
        Ok(resolved)
    }
}

/// A path `/nix/store/<32 base32 characters>-<name>`, nothing else.
pub fn is_store_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/nix/store/") else {
        return false;
    };
    let (hash, name) = match rest.split_once('-') {
        Some(parts) => parts,
        None => return false,
    };
    hash.len() == 32
        && hash
            .bytes()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        && !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

/// The highest version that matches `constraint` (Cargo's rules, as FlakeHub's) and is not yanked.
pub fn newest_unyanked(releases: &[Release], constraint: &str) -> Option<Release> {
    let req = semver::VersionReq::parse(constraint).ok();
    releases
        .iter()
        .filter(|r| !r.is_yanked())
        .filter_map(|r| semver::Version::parse(&r.version).ok().map(|v| (v, r)))
        .filter(|(v, _)| match &req {
            // FlakeHub matches pre-release-free versions with build metadata; compare without it.
            Some(req) => {
                req.matches(&semver::Version::new(v.major, v.minor, v.patch)) || req.matches(v)
            }
            None => constraint == "*",
        })
        .max_by(|(a, _), (b, _)| a.cmp_precedence(b).then_with(|| a.cmp(b)))
        .map(|(_, r)| r.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(version: &str, yanked: bool) -> Release {
        Release {
            version: version.into(),
            simplified_version: None,
            revision: None,
            commit_count: None,
            published_at: None,
            yanked_at: yanked.then(|| "2026-01-01T00:00:00Z".into()),
        }
    }

    #[test]
    fn fixture_release_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/flakehub/version.example.json"
        ))
        .unwrap();
        let r: Release = serde_json::from_str(&text).unwrap();
        assert_eq!(
            r.version,
            "1.1.0+rev-ff81ac966bb2cae68946d5ed5fc4994f96d0ffec"
        );
        assert_eq!(r.published_at.as_deref(), Some("2024-12-04T12:00:00Z"));
        assert!(!r.is_yanked());
    }

    #[test]
    fn newest_unyanked_follows_the_constraint() {
        let all = [
            rel("0.1.40+rev-a", false),
            rel("0.1.42+rev-c", true),
            rel("0.1.41+rev-b", false),
            rel("0.2.0+rev-d", false),
        ];
        assert_eq!(
            newest_unyanked(&all, "0.1").unwrap().version,
            "0.1.41+rev-b"
        );
        assert_eq!(newest_unyanked(&all, "*").unwrap().version, "0.2.0+rev-d");
        assert_eq!(newest_unyanked(&all, "=0.1.42").map(|r| r.version), None);
        assert_eq!(
            newest_unyanked(&all, "~0.1.40").unwrap().version,
            "0.1.41+rev-b"
        );
    }

    #[test]
    fn store_paths_are_checked() {
        assert!(is_store_path(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-24.11"
        ));
        assert!(!is_store_path("/nix/store/short-x"));
        assert!(!is_store_path("/tmp/0123456789abcdfghijklmnpqrsvwxyz-x"));
        assert!(!is_store_path(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x; rm -rf /"
        ));
        assert!(!is_store_path(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-../../etc"
        ));
    }

    #[test]
    fn urls_escape_every_segment() {
        let c = Client::new("http://127.0.0.1:1/api", None).unwrap();
        let url = c.url(&[
            "f",
            "org",
            "flake",
            "=0.1.2+rev-abc",
            "output",
            "nixosConfigurations.web",
        ]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:1/api/f/org/flake/=0.1.2+rev-abc/output/nixosConfigurations.web"
        );
        let url = c.url(&["version", "org", "flake", "a/b?c"]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:1/api/version/org/flake/a%2Fb%3Fc"
        );
    }
}
