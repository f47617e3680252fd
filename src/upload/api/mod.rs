//! Hetzner Cloud API client: requests tried again with the project's retry helper, rate limits, bounded answers, pagination, polling; a request that changes something is never sent twice blindly.
//!
//! Calls that are the same when made twice (GET, PUT, DELETE) are tried again whenever they fail
//! in a way that may pass. A POST is tried again only when the API answered with an error that
//! may pass (it did nothing); when no answer came, [`Client::post_once`] asks the caller's lookup
//! (by the labels the request carried) what was done before it sends the request again.

mod answers;
mod calls;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::Value;

use crate::plumbing::retry::{self, Backoff, Class, Policy};
use crate::plumbing::secret::Secret;

pub(crate) use answers::*;
pub(crate) use calls::Kind;

/// Default API endpoint; `HCLOUD_ENDPOINT` overrides it like the hcloud CLI does.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://api.hetzner.cloud/v1";

/// What to do about an error code the API gives, where the code alone does not say it.
fn hint(code: &str) -> &'static str {
    match code {
        "unauthorized" => {
            "; the Hetzner Cloud token was refused: check HCLOUD_TOKEN, --token-file or the hcloud CLI's active context (a project's API token with read and write access)"
        }
        "forbidden" => {
            "; the token may not do this (a read-only token?): use one with read and write access"
        }
        "uniqueness_error" => "; the name is taken in this project: choose another one",
        _ => "",
    }
}

/// An error from the API or from reaching it. Hetzner's errors read `code: message`, as Hetzner gives them.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{code}: {message}{}", hint(code))]
    Hetzner {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what}: HTTP {status} with a body that is not a Hetzner error: {body}")]
    Unexpected {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: cannot reach the Hetzner Cloud API at {endpoint}: {reason}")]
    Transport {
        what: String,
        endpoint: String,
        reason: String,
    },
    /// A request that changes something got no (readable) answer, and it is not known whether
    /// it was carried out.
    #[error("{what}: no answer ({reason}), and it is not known whether it was carried out")]
    Unknown { what: String, reason: String },
    #[error("{what}: the answer could not be read: {reason}")]
    Decode { what: String, reason: String },
    #[error("{what}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        what: String,
        attempts: u32,
        last: Box<ApiError>,
    },
    #[error("{what}: no result within {}", humantime::format_duration(*deadline))]
    Deadline { what: String, deadline: Duration },
    #[error("action {id} ({command}) failed: {code}: {message}")]
    ActionFailed {
        id: u64,
        command: String,
        code: String,
        message: String,
    },
}

impl ApiError {
    /// The Hetzner error code, when there is one.
    pub(crate) fn code(&self) -> Option<&str> {
        match self {
            ApiError::Hetzner { code, .. } => Some(code),
            ApiError::GaveUp { last, .. } => last.code(),
            _ => None,
        }
    }
}

/// Retry settings; tests shorten them.
#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    pub(crate) attempts: u32,
    pub(crate) base: Duration,
    pub(crate) max: Duration,
    pub(crate) request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Between attempts of one call: doubling from `base` up to `max`.
    fn backoff(&self) -> Backoff {
        Backoff::doubling(self.base, self.max)
    }

    /// Between polls of a state: from `base`, half as long again each time, up to 5 s.
    pub(crate) fn polling(&self) -> Backoff {
        Backoff {
            first: self.base,
            max: Duration::from_secs(5),
            factor: 1.5,
            jitter: 0.1,
        }
    }
}

/// The API client.
#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    endpoint: String,
    token: Secret,
    policy: RetryPolicy,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// A failed attempt of a call, and whether it may pass.
type Failed = (ApiError, Class);

/// How a poll ended without its result.
enum Polled {
    /// Not yet: ask again.
    Pending,
    Failed(ApiError),
}

impl Client {
    pub(crate) fn new(endpoint: &str, token: Secret, policy: RetryPolicy) -> anyhow::Result<Self> {
        crate::plumbing::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("hcloud-nixos/", env!("CARGO_PKG_VERSION")))
            .timeout(policy.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Client {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            policy,
        })
    }

    fn url(&self, path: &str, query: &[(String, String)]) -> Result<reqwest::Url, ApiError> {
        let mut url = reqwest::Url::parse(&format!("{}{}", self.endpoint, path)).map_err(|e| {
            ApiError::Transport {
                what: path.to_string(),
                endpoint: self.endpoint.clone(),
                reason: format!("not a valid URL ({e}); check HCLOUD_ENDPOINT"),
            }
        })?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    /// One request and what its answer means.
    async fn exchange(
        &self,
        method: &Method,
        url: &reqwest::Url,
        body: Option<&Value>,
        what: &str,
    ) -> Exchange {
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(self.token.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |e: reqwest::Error| ApiError::Transport {
            what: what.to_string(),
            endpoint: self.endpoint.clone(),
            // Never the request itself: only the kind of failure.
            reason: if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "connection failed".to_string()
            } else {
                e.without_url().to_string()
            },
        };
        let mut resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => return Exchange::Lost(transport(e)),
        };
        let status = resp.status().as_u16();
        let remaining = header_u64(resp.headers(), "ratelimit-remaining");
        let reset = header_u64(resp.headers(), "ratelimit-reset");
        let mut text = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) if text.len() + c.len() > MAX_ANSWER_BYTES => {
                    if (200..300).contains(&status) {
                        return Exchange::Unreadable(ApiError::Decode {
                            what: what.to_string(),
                            reason: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
                        });
                    }
                    break;
                }
                Ok(Some(c)) => text.extend_from_slice(&c),
                Ok(None) => break,
                Err(e) => return Exchange::Lost(transport(e)),
            }
        }
        if (200..300).contains(&status)
            && let Some(w) = rate_limit_wait(remaining, reset, now_unix(), false, self.policy.max)
        {
            tracing::debug!("rate limit nearly used up, pausing {w:?}");
            tokio::time::sleep(w).await;
        }
        let wait_429 = rate_limit_wait(remaining, reset, now_unix(), true, self.policy.max)
            .unwrap_or(self.policy.base);
        judge(what, status, &text, wait_429)
    }

    /// A call that is the same when made twice (GET, PUT, DELETE): tried again on any failure
    /// that may pass, lost answers included.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let what = format!("{method} {path}");
        let url = self.url(path, query)?;
        let policy = Policy::times(self.policy.backoff(), self.policy.attempts);
        let result = retry::retry(
            policy,
            |n| {
                let (method, url, what) = (&method, &url, &what);
                async move {
                    let failed = match self.exchange(method, url, body, what).await {
                        Exchange::Done(v) => return Ok(v),
                        Exchange::Refused { error, class } => (error, class),
                        Exchange::Lost(e) => (e, Class::Passing),
                        Exchange::Unreadable(e) => (e, Class::Final),
                    };
                    note_failure(what, n, &failed);
                    Err(failed)
                }
            },
            |(_, class): &Failed| *class,
        )
        .await;
        result.map_err(|g| gave_up(what, g))
    }

    /// A POST, tried again only when the API refused it with an error that may pass. An answer
    /// that did not come (or cannot be read) is [`ApiError::Unknown`].
    async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        let what = format!("POST {path}");
        let url = self.url(path, &[])?;
        let policy = Policy::times(self.policy.backoff(), self.policy.attempts);
        let result = retry::retry(
            policy,
            |n| {
                let (url, what) = (&url, &what);
                async move {
                    let failed = match self.exchange(&Method::POST, url, Some(body), what).await {
                        Exchange::Done(v) => return Ok(v),
                        Exchange::Refused { error, class } => (error, class),
                        Exchange::Lost(e) | Exchange::Unreadable(e) => {
                            let reason = match e {
                                ApiError::Transport { reason, .. } => reason,
                                other => other.to_string(),
                            };
                            let what = what.clone();
                            (ApiError::Unknown { what, reason }, Class::Final)
                        }
                    };
                    note_failure(what, n, &failed);
                    Err(failed)
                }
            },
            |(_, class): &Failed| *class,
        )
        .await;
        result.map_err(|g| gave_up(what, g))
    }

    /// A POST that creates or starts something, made once: when its answer is lost, `find` (a
    /// lookup by the labels the request carried, or of the server's actions) says whether it was
    /// carried out before the request is sent again. `decode` reads a successful answer.
    pub(crate) async fn post_once<T>(
        &self,
        path: &str,
        body: &Value,
        decode: impl Fn(Value) -> Result<T, ApiError>,
        find: impl AsyncFn() -> Result<Option<T>, ApiError>,
    ) -> Result<T, ApiError> {
        let what = format!("POST {path}");
        let (decode, find) = (&decode, &find);
        // A lost answer, a look, and one more request: three times at most.
        let policy = Policy::times(self.policy.backoff(), 3);
        let result = retry::retry(
            policy,
            |n| async move {
                if n > 1 {
                    match find().await {
                        Ok(Some(found)) => return Ok(found),
                        Ok(None) => {}
                        Err(e) => return Err((unknown_after_lookup(path, e), Class::Final)),
                    }
                }
                match self.post(path, body).await {
                    Ok(v) => decode(v).map_err(|e| (e, Class::Final)),
                    Err(e @ ApiError::Unknown { .. }) => {
                        tracing::warn!("{e}: looking for what it did before sending it again");
                        Err((e, Class::Passing))
                    }
                    // Sent again after a lost answer, it collides with what the first one made.
                    Err(e) if n > 1 && e.code() == Some("uniqueness_error") => {
                        Err((e, Class::Passing))
                    }
                    Err(e) => Err((e, Class::Final)),
                }
            },
            |(_, class): &Failed| *class,
        )
        .await;
        result.map_err(|g| match g.last.0 {
            e @ ApiError::Unknown { .. } => e,
            last if g.final_failure => last,
            last => ApiError::GaveUp {
                what,
                attempts: g.attempts,
                last: Box::new(last),
            },
        })
    }

    /// Asks `check` (given the poll's number, from 1) until it gives a value or fails, with the
    /// polling backoff, until `deadline` has passed.
    pub(crate) async fn poll<T>(
        &self,
        what: &str,
        deadline: Duration,
        check: impl AsyncFn(u32) -> Result<Option<T>, ApiError>,
    ) -> Result<T, ApiError> {
        let check = &check;
        let until = tokio::time::Instant::now() + deadline;
        let result = retry::retry(
            Policy::until(self.policy.polling(), until),
            |n| async move {
                match check(n).await {
                    Ok(Some(v)) => Ok(v),
                    Ok(None) => Err(Polled::Pending),
                    Err(e) => Err(Polled::Failed(e)),
                }
            },
            |p: &Polled| match p {
                Polled::Pending => Class::Passing,
                Polled::Failed(_) => Class::Final,
            },
        )
        .await;
        result.map_err(|g| match g.last {
            Polled::Failed(e) => e,
            Polled::Pending => ApiError::Deadline {
                what: what.to_string(),
                deadline,
            },
        })
    }
}

fn note_failure(what: &str, attempt: u32, (error, class): &Failed) {
    if *class != Class::Final {
        match error {
            // A transport error names the call already.
            ApiError::Transport { .. } => tracing::warn!("{error} (attempt {attempt})"),
            _ => tracing::warn!("{what}: {error} (attempt {attempt})"),
        }
    }
}

fn gave_up(what: String, g: retry::GaveUp<Failed>) -> ApiError {
    let (last, _) = g.last;
    if g.final_failure {
        return last;
    }
    ApiError::GaveUp {
        what,
        attempts: g.attempts,
        last: Box::new(last),
    }
}

fn unknown_after_lookup(path: &str, lookup: ApiError) -> ApiError {
    ApiError::Unknown {
        what: format!("POST {path}"),
        reason: format!("the answer was lost, and looking for what it did failed: {lookup}"),
    }
}
