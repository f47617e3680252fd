//! FlakeHub API client: resolving a flake output reference to an exact release and store path.

use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

use crate::agent::flakeref::FlakeRef;
use crate::plumbing::http::{BodyError, describe, read_limited};
use crate::plumbing::secret::Secret;
use crate::plumbing::text::{one_line, quoted};

pub(crate) const DEFAULT_API_URL: &str = "https://api.flakehub.com";

/// A release's JSON carries its README; a list of them can be large, but not this large.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// The longest release version accepted (FlakeHub's are `0.1.<n>+rev-<40 hex>`, some 60 bytes).
const MAX_VERSION_LEN: usize = 128;
/// Nix's base-32 alphabet, the characters of a store path's hash.
const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// The longest name Nix gives a store path.
const MAX_STORE_NAME_LEN: usize = 211;

/// One release as FlakeHub's JSON has it: only what the agent reads, checked by
/// [`Release::checked`] before anything else sees it.
#[derive(Deserialize)]
struct ReleaseJson {
    version: String,
    #[serde(default)]
    published_at: Option<String>,
    #[serde(default)]
    yanked_at: Option<String>,
}

/// One release of a flake (`GET /version/...`, `GET /f/.../releases`), checked where it enters:
/// its version reaches `STATUS=`, the journal, hooks' environments, unit descriptions and fh's
/// argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// A SemVer version (`0.1.42+rev-<sha>`): ASCII letters, digits, `.`, `+` and `-` only.
    pub version: String,
    /// When it was published; `None` when FlakeHub gives no time, or something that is not one.
    pub(crate) published_at: Option<Timestamp>,
    pub(crate) yanked: bool,
}

impl Release {
    fn checked(json: ReleaseJson) -> Result<Release, String> {
        check_version(&json.version)?;
        Ok(Release {
            version: json.version,
            published_at: json.published_at.and_then(|p| p.parse().ok()),
            yanked: json.yanked_at.is_some_and(|s| !s.is_empty()),
        })
    }
}

/// A flake output at one release as FlakeHub's JSON has it.
#[derive(Deserialize)]
struct OutputJson {
    #[serde(default)]
    store_path: Option<String>,
}

/// What a reference resolves to right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The release's exact version as FlakeHub names it (`0.1.42+rev-…`), checked
    /// ([`check_version`]).
    pub version: String,
    pub(crate) attr: String,
    /// A store path, checked ([`check_store_path`]).
    pub(crate) store_path: String,
    pub(crate) published_at: Option<Timestamp>,
}

/// `GET /version/...`'s answer: the release, checked.
pub fn parse_release(body: &[u8]) -> Result<Release, String> {
    Release::checked(json(body)?)
}

/// `GET /f/.../releases`'s answer: the releases whose version passes the checks (one FlakeHub got
/// wrong does not hide the others; none of its text goes anywhere).
pub fn parse_releases(body: &[u8]) -> Result<Vec<Release>, String> {
    let all: Vec<ReleaseJson> = json(body)?;
    Ok(all
        .into_iter()
        .filter_map(|r| Release::checked(r).ok())
        .collect())
}

/// `GET /f/.../output/...`'s answer: the store path, checked; `None` when the release was
/// published without output paths.
pub fn parse_output(body: &[u8]) -> Result<Option<String>, String> {
    let output: OutputJson = json(body)?;
    match output.store_path.filter(|p| !p.is_empty()) {
        None => Ok(None),
        Some(path) => check_store_path(&path).map(|()| Some(path)),
    }
}

/// JSON into `T`; the error is one line.
fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| one_line(&e.to_string(), 200))
}

/// A release version as the agent passes it on: SemVer, nothing else.
pub fn check_version(version: &str) -> Result<(), String> {
    let fits = !version.is_empty()
        && version.len() <= MAX_VERSION_LEN
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !fits {
        return Err(format!(
            "the version {} is not a release version (SemVer: letters, digits, '.', '+' and '-', at most {MAX_VERSION_LEN})",
            quoted(version)
        ));
    }
    semver::Version::parse(version)
        .map(|_| ())
        .map_err(|e| format!("the version {} is not SemVer ({e})", quoted(version)))
}

/// A path `/nix/store/<32 characters of Nix's base 32>-<name>`, nothing else: it becomes argv
/// (`<path>/bin/switch-to-configuration`) and the system profile's target. The name uses Nix's
/// characters, does not start with `.` and holds no `..`.
pub fn check_store_path(path: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("{} is not a Nix store path: {why}", quoted(path)));
    let Some(rest) = path.strip_prefix("/nix/store/") else {
        return refuse("it is not in /nix/store");
    };
    let Some((hash, name)) = rest.split_once('-') else {
        return refuse("no '-' after the hash");
    };
    if hash.len() != 32 || !hash.bytes().all(|c| NIX32.contains(&c)) {
        return refuse("the hash is not 32 characters of Nix's base 32");
    }
    if name.is_empty() || name.len() > MAX_STORE_NAME_LEN {
        return refuse("the name is empty or too long");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return refuse("the name has a character Nix does not use in one");
    }
    if name.starts_with('.') || name.contains("..") {
        return refuse("the name starts with '.' or holds '..'");
    }
    Ok(())
}

/// Why FlakeHub could not resolve a reference. Messages are one line and carry no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "FlakeHub rejected the token (HTTP {0}): log in with a valid token (user-data flakehub_token or flakehub.token_file)"
    )]
    /// FlakeHub refused the token (or its absence): the HTTP status, 401 or 403.
    Unauthorized(u16),
    /// HTTP 404, or no release matches the constraint that is not yanked: the whole message.
    #[error("{0}")]
    NotFound(String),
    /// Any other status that is not a success; 5xx and 429 are worth another try.
    #[error("FlakeHub answered {what} with HTTP {status}")]
    Status {
        /// What was asked for (`the release of acme/infra matching '0.1'`).
        what: String,
        /// The HTTP status code.
        status: u16,
    },
    /// No answer: DNS, connection, TLS or a timeout.
    #[error("cannot reach FlakeHub at {url}: {why}")]
    Unreachable {
        /// The URL asked, without credentials.
        url: String,
        /// The transport's reason, one line.
        why: String,
    },
    /// An answer that does not parse or fails a check (a version or store path out of shape).
    #[error("FlakeHub's answer to {what} is not what was expected: {why}")]
    Invalid {
        /// What was asked for.
        what: String,
        /// What is wrong with the answer.
        why: String,
    },
}

impl Error {
    /// Worth trying again soon (the network, FlakeHub itself), as opposed to a setting to fix.
    pub(crate) fn is_transient(&self) -> bool {
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
    /// A client of the API at `api_url` (`https://api.flakehub.com`; a trailing `/` is added),
    /// sending `token` as a bearer token when there is one. Fails only on a URL that does not
    /// parse.
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

    /// The body of a 2xx answer at `segments`; `what` names it in errors.
    async fn get(&self, segments: &[&str], what: &str) -> Result<Vec<u8>, Error> {
        let url = self.url(segments);
        let mut req = self.http.get(url.clone());
        if let Some(token) = &self.token {
            req = req.bearer_auth(token.expose());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.unreachable(describe(&e)))?;
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
        read_limited(resp, MAX_BODY).await.map_err(|e| match e {
            BodyError::TooLarge => invalid(what, format!("larger than {MAX_BODY} bytes")),
            BodyError::Cut(why) => self.unreachable(why),
        })
    }

    fn unreachable(&self, why: String) -> Error {
        Error::Unreachable {
            url: self.api_url.to_string(),
            why: one_line(&why, 200),
        }
    }

    /// The release matching the reference's version constraint.
    pub async fn release(&self, flake: &FlakeRef) -> Result<Release, Error> {
        let what = format!(
            "release of {}/{} matching '{}'",
            flake.org, flake.flake, flake.version
        );
        let body = self
            .get(
                &["version", &flake.org, &flake.flake, &flake.version],
                &what,
            )
            .await?;
        parse_release(&body).map_err(|why| invalid(&what, why))
    }

    /// Every release of the flake (those FlakeHub describes well).
    pub async fn releases(&self, flake: &FlakeRef) -> Result<Vec<Release>, Error> {
        let what = format!("releases of {}/{}", flake.org, flake.flake);
        let body = self
            .get(&["f", &flake.org, &flake.flake, "releases"], &what)
            .await?;
        parse_releases(&body).map_err(|why| invalid(&what, why))
    }

    /// The store path of the output `attr` at exactly `version`.
    pub async fn output(
        &self,
        flake: &FlakeRef,
        version: &str,
        attr: &str,
    ) -> Result<String, Error> {
        let what = format!(
            "output {attr} of {}/{} at version {version}",
            flake.org, flake.flake
        );
        let exact = format!("={version}");
        let body = self
            .get(
                &["f", &flake.org, &flake.flake, &exact, "output", attr],
                &what,
            )
            .await?;
        parse_output(&body)
            .map_err(|why| invalid(&what, why))?
            .ok_or_else(|| {
                invalid(
                    &what,
                    "it has no store path: publish the release with output paths included (include-output-paths: true)".into(),
                )
            })
    }

    /// Resolves the reference: the newest matching release that is not yanked, then the store
    /// path of the output at exactly that version.
    pub async fn resolve(&self, flake: &FlakeRef, attr: &str) -> Result<Resolved, Error> {
        let mut release = self.release(flake).await?;
        if release.yanked {
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
        let store_path = self.output(flake, &release.version, attr).await?;
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

fn invalid(what: &str, why: String) -> Error {
    Error::Invalid {
        what: what.to_string(),
        why,
    }
}

/// The highest version that matches `constraint` (Cargo's rules, as FlakeHub's) and is not yanked.
pub(crate) fn newest_unyanked(releases: &[Release], constraint: &str) -> Option<Release> {
    let req = semver::VersionReq::parse(constraint).ok();
    releases
        .iter()
        .filter(|r| !r.yanked)
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
            published_at: None,
            yanked,
        }
    }

    #[test]
    fn fixture_release_parses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/flakehub/version.example.json"
        ))
        .unwrap();
        let r = parse_release(text.as_bytes()).unwrap();
        assert_eq!(
            r.version,
            "1.1.0+rev-ff81ac966bb2cae68946d5ed5fc4994f96d0ffec"
        );
        assert_eq!(
            r.published_at,
            Some("2024-12-04T12:00:00Z".parse().unwrap())
        );
        assert!(!r.yanked);
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
        let ok = |p: &str| check_store_path(p).is_ok();
        assert!(ok(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-24.11"
        ));
        assert!(ok("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a+b_c?d=e"));
        assert!(!ok("/nix/store/short-x"));
        assert!(!ok("/tmp/0123456789abcdfghijklmnpqrsvwxyz-x"));
        assert!(!ok(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x; rm -rf /"
        ));
        assert!(!ok("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-../../etc"));
        assert!(!ok("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-.hidden"));
        // 'e', 'o', 'u' and 't' are not in Nix's base 32.
        assert!(!ok("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"));
        let e = check_store_path("/nix/store/x\ny").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn versions_are_semver_and_nothing_else() {
        for v in ["0.1.42+rev-abc", "1.0.0-beta.1", "0.1.0"] {
            check_version(v).unwrap();
        }
        for v in [
            "",
            "0.1",
            "0.1.42\nX=1",
            "0.1.42 ",
            "v0.1.42",
            "0.1.42+rev/abc",
        ] {
            let e = check_version(v).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        check_version(&format!("0.1.0+{}", "a".repeat(200))).unwrap_err();
    }

    #[test]
    fn a_list_keeps_the_releases_that_pass() {
        let body = serde_json::json!([
            {"version": "0.1.1+rev-a", "yanked_at": null},
            {"version": "0.1.2\nWATCHDOG=trigger"},
            {"version": "0.1.3+rev-c", "published_at": "2026-01-01T00:00:00Z", "yanked_at": "2026-01-02T00:00:00Z"}
        ])
        .to_string();
        let all = parse_releases(body.as_bytes()).unwrap();
        let versions: Vec<&str> = all.iter().map(|r| r.version.as_str()).collect();
        assert_eq!(versions, ["0.1.1+rev-a", "0.1.3+rev-c"]);
        assert!(all[1].yanked && all[1].published_at.is_some());
        assert!(parse_releases(b"{}").is_err());
        assert_eq!(parse_output(br#"{"store_path": null}"#), Ok(None));
        assert_eq!(parse_output(br#"{"store_path": ""}"#), Ok(None));
        assert!(parse_output(br#"{"store_path": "/etc"}"#).is_err());
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
