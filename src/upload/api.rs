//! Hetzner Cloud API client for the uploader: typed calls, retries with backoff, rate limits, pagination, action polling.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::plumbing::secret::Secret;

/// Default API endpoint; `HCLOUD_ENDPOINT` overrides it like the hcloud CLI does.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://api.hetzner.cloud/v1";

/// An error from the API or from reaching it. Hetzner's errors read `code: message`, as Hetzner gives them.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{code}: {message}")]
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
    #[error("{what}: the answer could not be read: {reason}")]
    Decode { what: String, reason: String },
    #[error("{what}: gave up after {attempts} attempts; last error: {last}")]
    GaveUp {
        what: String,
        attempts: u32,
        last: Box<ApiError>,
    },
    #[error("{what}: no result within {deadline:?}")]
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

/// Whether an answer with this HTTP status and Hetzner error code is worth retrying.
pub(crate) fn is_retryable(status: u16, code: Option<&str>) -> bool {
    match code {
        Some(
            "conflict"
            | "locked"
            | "rate_limit_exceeded"
            | "timeout"
            | "server_error"
            | "unavailable",
        ) => true,
        Some(
            "invalid_input"
            | "unauthorized"
            | "token_readonly"
            | "forbidden"
            | "not_found"
            | "resource_limit_exceeded"
            | "uniqueness_error"
            | "protected"
            | "maintenance"
            | "deprecated_api_endpoint"
            | "method_not_allowed"
            | "json_error",
        ) => false,
        _ => matches!(status, 409 | 423 | 429 | 500 | 502 | 503 | 504),
    }
}

/// Exponential backoff for attempt `n` (0-based): `base * 2^n`, at most `max`.
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16)).min(max)
}

/// How long to wait before the next request, given the rate-limit headers of the last answer.
/// Hetzner refills one request a second, so when none is left one second is enough for the next;
/// after a 429 wait until the reset time, bounded by `cap`.
pub(crate) fn rate_limit_wait(
    remaining: Option<u64>,
    reset_unix: Option<u64>,
    now_unix: u64,
    was_429: bool,
    cap: Duration,
) -> Option<Duration> {
    if was_429 {
        let until_reset = reset_unix
            .map(|r| Duration::from_secs(r.saturating_sub(now_unix)))
            .unwrap_or(Duration::from_secs(1));
        return Some(until_reset.max(Duration::from_secs(1)).min(cap));
    }
    match remaining {
        Some(0) => Some(Duration::from_secs(1)),
        _ => None,
    }
}

/// Query string for one page of a list call.
pub(crate) fn list_query(
    filters: &[(&str, &str)],
    page: u64,
    per_page: u64,
) -> Vec<(String, String)> {
    let mut q: Vec<(String, String)> = filters
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    q.push(("page".into(), page.to_string()));
    q.push(("per_page".into(), per_page.to_string()));
    q
}

/// Body of `POST /servers` for a temporary upload server: not started, labelled.
pub(crate) fn create_server_body(
    name: &str,
    server_type: &str,
    image: &str,
    location: Option<&str>,
    ssh_key_id: u64,
    labels: &BTreeMap<String, String>,
) -> Value {
    let mut b = json!({
        "name": name,
        "server_type": server_type,
        "image": image,
        "start_after_create": false,
        "ssh_keys": [ssh_key_id],
        "labels": labels,
        "public_net": {"enable_ipv4": true, "enable_ipv6": true},
    });
    if let Some(l) = location {
        b["location"] = json!(l);
    }
    b
}

/// Body of `POST /servers/{id}/actions/create_image`.
pub(crate) fn create_image_body(description: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"type": "snapshot", "description": description, "labels": labels})
}

/// Body of `POST /servers/{id}/actions/enable_rescue`.
pub(crate) fn enable_rescue_body(ssh_key_id: u64) -> Value {
    json!({"type": "linux64", "ssh_keys": [ssh_key_id]})
}

/// Next delay when polling an action: grows by half each time, from `start` to `max`.
pub(crate) fn poll_delay(start: Duration, max: Duration, polls: u32) -> Duration {
    let mut d = start;
    for _ in 0..polls.min(32) {
        d = d.mul_f64(1.5);
        if d >= max {
            return max;
        }
    }
    d
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ActionErrorBody {
    pub(crate) code: String,
    pub(crate) message: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Action {
    pub(crate) id: u64,
    pub(crate) command: String,
    pub(crate) status: String,
    pub(crate) error: Option<ActionErrorBody>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Ipv4 {
    pub(crate) ip: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Ipv6 {
    pub(crate) ip: String,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PublicNet {
    pub(crate) ipv4: Option<Ipv4>,
    pub(crate) ipv6: Option<Ipv6>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Server {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) status: String,
    pub(crate) public_net: PublicNet,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SshKey {
    pub(crate) id: u64,
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Image {
    pub(crate) id: u64,
    pub(crate) status: String,
    pub(crate) architecture: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
}

#[derive(Deserialize)]
struct Pagination {
    next_page: Option<u64>,
}

#[derive(Deserialize)]
struct Meta {
    pagination: Option<Pagination>,
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

/// What one request came to.
enum Attempt {
    /// The answer (`null` when there was no body).
    Done(Value),
    /// A failure worth another try: after `wait`, or after the backoff when `None`.
    Retry {
        error: ApiError,
        wait: Option<Duration>,
    },
    /// A failure to report as it is.
    Fail(ApiError),
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

/// Pulls Hetzner's `code` and `message` out of an error body.
pub(crate) fn parse_error_body(body: &str) -> Option<(String, String)> {
    let e: ErrorEnvelope = serde_json::from_str(body).ok()?;
    Some((e.error.code, e.error.message))
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

    /// One call with retries. `body` is JSON for POST; `query` for GET.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let what = format!("{method} {path}");
        let mut url = reqwest::Url::parse(&format!("{}{}", self.endpoint, path)).map_err(|e| {
            ApiError::Transport {
                what: what.clone(),
                endpoint: self.endpoint.clone(),
                reason: format!("not a valid URL ({e}); check HCLOUD_ENDPOINT"),
            }
        })?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut attempt = 0u32;
        loop {
            let (err, wait) = match self.attempt(&method, &url, body, &what).await {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { error, wait } => (error, wait),
            };
            attempt += 1;
            if attempt >= self.policy.attempts {
                return Err(ApiError::GaveUp {
                    what,
                    attempts: attempt,
                    last: Box::new(err),
                });
            }
            let wait =
                wait.unwrap_or_else(|| backoff(self.policy.base, self.policy.max, attempt - 1));
            match &err {
                // A transport error names the call already.
                ApiError::Transport { .. } => tracing::warn!("{err}; retrying in {wait:?}"),
                _ => tracing::warn!("{what}: {err}; retrying in {wait:?}"),
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One request, and what its answer means.
    async fn attempt(
        &self,
        method: &Method,
        url: &reqwest::Url,
        body: Option<&Value>,
        what: &str,
    ) -> Attempt {
        let mut req = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(self.token.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => {
                // Never include the request itself: only the kind of failure.
                let reason = if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "connection failed".to_string()
                } else {
                    e.without_url().to_string()
                };
                // Transport errors are retried with backoff as well.
                return Attempt::Retry {
                    error: ApiError::Transport {
                        what: what.to_string(),
                        endpoint: self.endpoint.clone(),
                        reason,
                    },
                    wait: None,
                };
            }
        };
        let status = resp.status();
        let remaining = header_u64(resp.headers(), "ratelimit-remaining");
        let reset = header_u64(resp.headers(), "ratelimit-reset");
        let text = resp.text().await.unwrap_or_default();
        if status.is_success() {
            if let Some(w) = rate_limit_wait(remaining, reset, now_unix(), false, self.policy.max) {
                tracing::debug!("rate limit nearly used up, pausing {w:?}");
                tokio::time::sleep(w).await;
            }
            if status == StatusCode::NO_CONTENT || text.trim().is_empty() {
                return Attempt::Done(Value::Null);
            }
            return match serde_json::from_str(&text) {
                Ok(v) => Attempt::Done(v),
                Err(e) => Attempt::Fail(ApiError::Decode {
                    what: what.to_string(),
                    reason: e.to_string(),
                }),
            };
        }
        let error = match parse_error_body(&text) {
            Some((code, message)) => ApiError::Hetzner {
                status: status.as_u16(),
                code,
                message,
            },
            None => ApiError::Unexpected {
                what: what.to_string(),
                status: status.as_u16(),
                body: text.chars().take(200).collect(),
            },
        };
        if !is_retryable(status.as_u16(), error.code()) {
            return Attempt::Fail(error);
        }
        let wait = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            rate_limit_wait(remaining, reset, now_unix(), true, self.policy.max)
                .unwrap_or(self.policy.base)
        });
        Attempt::Retry { error, wait }
    }

    fn take<T: DeserializeOwned>(what: &str, v: &mut Value, key: &str) -> Result<T, ApiError> {
        serde_json::from_value(v[key].take()).map_err(|e| ApiError::Decode {
            what: what.to_string(),
            reason: format!("field '{key}': {e}"),
        })
    }

    /// Every item of a paginated list, following `meta.pagination.next_page` (at most 200 pages).
    pub(crate) async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        key: &str,
        filters: &[(&str, &str)],
    ) -> Result<Vec<T>, ApiError> {
        let mut out = Vec::new();
        let mut page = 1u64;
        for _ in 0..200 {
            let q = list_query(filters, page, 50);
            let mut v = self.call(Method::GET, path, &q, None).await?;
            let items: Vec<T> = Self::take(path, &mut v, key)?;
            out.extend(items);
            let meta: Option<Meta> = serde_json::from_value(v["meta"].take()).ok();
            match meta.and_then(|m| m.pagination).and_then(|p| p.next_page) {
                Some(n) if n > page => page = n,
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    pub(crate) async fn create_ssh_key(
        &self,
        name: &str,
        public_key: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<SshKey, ApiError> {
        let body = json!({"name": name, "public_key": public_key, "labels": labels});
        let mut v = self
            .call(Method::POST, "/ssh_keys", &[], Some(&body))
            .await?;
        Self::take("POST /ssh_keys", &mut v, "ssh_key")
    }

    pub(crate) async fn delete_ssh_key(&self, id: u64) -> Result<(), ApiError> {
        match self
            .call(Method::DELETE, &format!("/ssh_keys/{id}"), &[], None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("not_found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates a server; returns it and its creation action.
    pub(crate) async fn create_server(&self, body: &Value) -> Result<(Server, Action), ApiError> {
        let mut v = self.call(Method::POST, "/servers", &[], Some(body)).await?;
        let s = Self::take("POST /servers", &mut v, "server")?;
        let a = Self::take("POST /servers", &mut v, "action")?;
        Ok((s, a))
    }

    pub(crate) async fn get_server(&self, id: u64) -> Result<Server, ApiError> {
        let path = format!("/servers/{id}");
        let mut v = self.call(Method::GET, &path, &[], None).await?;
        Self::take(&path, &mut v, "server")
    }

    /// Deletes a server; `Ok(None)` when it is gone already.
    pub(crate) async fn delete_server(&self, id: u64) -> Result<Option<Action>, ApiError> {
        let path = format!("/servers/{id}");
        match self.call(Method::DELETE, &path, &[], None).await {
            Ok(mut v) => Ok(Self::take(&path, &mut v, "action").ok()),
            Err(e) if e.code() == Some("not_found") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts a server action (`poweron`, `enable_rescue`, ...), returning the action.
    pub(crate) async fn server_action(
        &self,
        id: u64,
        action: &str,
        body: Option<&Value>,
    ) -> Result<(Action, Value), ApiError> {
        let path = format!("/servers/{id}/actions/{action}");
        let empty = json!({});
        let mut v = self
            .call(Method::POST, &path, &[], Some(body.unwrap_or(&empty)))
            .await?;
        let a = Self::take(&path, &mut v, "action")?;
        Ok((a, v))
    }

    pub(crate) async fn get_action(&self, id: u64) -> Result<Action, ApiError> {
        let path = format!("/actions/{id}");
        let mut v = self.call(Method::GET, &path, &[], None).await?;
        Self::take(&path, &mut v, "action")
    }

    /// Polls an action until it succeeds, fails, or `deadline` passes.
    pub(crate) async fn wait_action(
        &self,
        action: &Action,
        deadline: Duration,
    ) -> Result<(), ApiError> {
        let start = Instant::now();
        let mut a = action.clone();
        let mut polls = 0u32;
        loop {
            match a.status.as_str() {
                "success" => return Ok(()),
                "error" => {
                    let (code, message) = a
                        .error
                        .map(|e| (e.code, e.message))
                        .unwrap_or_else(|| ("action_failed".into(), "no details".into()));
                    return Err(ApiError::ActionFailed {
                        id: a.id,
                        command: a.command,
                        code,
                        message,
                    });
                }
                _ => {}
            }
            let d = poll_delay(self.policy.base, Duration::from_secs(5), polls);
            if start.elapsed() + d > deadline {
                return Err(ApiError::Deadline {
                    what: format!("action {} ({})", a.id, a.command),
                    deadline,
                });
            }
            tokio::time::sleep(d).await;
            polls += 1;
            a = self.get_action(a.id).await?;
        }
    }

    pub(crate) async fn list_images(
        &self,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Image>, ApiError> {
        self.list_all("/images", "images", filters).await
    }

    pub(crate) async fn get_image(&self, id: u64) -> Result<Image, ApiError> {
        let path = format!("/images/{id}");
        let mut v = self.call(Method::GET, &path, &[], None).await?;
        Self::take(&path, &mut v, "image")
    }

    pub(crate) async fn list_servers(&self, label_selector: &str) -> Result<Vec<Server>, ApiError> {
        self.list_all("/servers", "servers", &[("label_selector", label_selector)])
            .await
    }

    pub(crate) async fn list_ssh_keys(
        &self,
        label_selector: &str,
    ) -> Result<Vec<SshKey>, ApiError> {
        self.list_all(
            "/ssh_keys",
            "ssh_keys",
            &[("label_selector", label_selector)],
        )
        .await
    }

    pub(crate) fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classification() {
        assert!(is_retryable(409, Some("conflict")));
        assert!(!is_retryable(409, Some("uniqueness_error")));
        assert!(is_retryable(423, Some("locked")));
        assert!(is_retryable(429, Some("rate_limit_exceeded")));
        assert!(is_retryable(500, Some("server_error")));
        assert!(is_retryable(503, Some("unavailable")));
        assert!(is_retryable(504, Some("timeout")));
        assert!(is_retryable(502, None));
        assert!(!is_retryable(422, Some("invalid_input")));
        assert!(!is_retryable(401, Some("unauthorized")));
        assert!(!is_retryable(403, Some("resource_limit_exceeded")));
        assert!(!is_retryable(404, Some("not_found")));
        assert!(!is_retryable(400, None));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Duration::from_millis(500);
        let m = Duration::from_secs(30);
        assert_eq!(backoff(b, m, 0), b);
        assert_eq!(backoff(b, m, 1), Duration::from_secs(1));
        assert_eq!(backoff(b, m, 3), Duration::from_secs(4));
        assert_eq!(backoff(b, m, 30), m);
    }

    #[test]
    fn rate_limit_waits() {
        let cap = Duration::from_secs(30);
        assert_eq!(rate_limit_wait(Some(10), Some(100), 90, false, cap), None);
        assert_eq!(
            rate_limit_wait(Some(0), Some(100), 90, false, cap),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            rate_limit_wait(Some(0), Some(100), 97, true, cap),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            rate_limit_wait(Some(0), Some(100), 100, true, cap),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            rate_limit_wait(Some(0), Some(5000), 0, true, cap),
            Some(cap)
        );
        assert_eq!(
            rate_limit_wait(None, None, 0, true, cap),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn error_bodies_from_fixtures() {
        let body = r#"{"error":{"code":"invalid_input","message":"invalid input in field 'broken_field': is too long","details":{}}}"#;
        let (code, message) = parse_error_body(body).unwrap();
        let e = ApiError::Hetzner {
            status: 422,
            code,
            message,
        };
        assert_eq!(
            e.to_string(),
            "invalid_input: invalid input in field 'broken_field': is too long"
        );
        assert!(parse_error_body("<html>").is_none());
    }

    #[test]
    fn request_bodies() {
        let labels = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let b = create_server_body("n", "cx23", "debian-12", Some("fsn1"), 7, &labels);
        assert_eq!(b["start_after_create"], false);
        assert_eq!(b["location"], "fsn1");
        assert_eq!(b["ssh_keys"][0], 7);
        assert_eq!(b["labels"]["a"], "b");
        assert!(b.get("datacenter").is_none());
        let b = create_server_body("n", "cx23", "debian-12", None, 7, &labels);
        assert!(b.get("location").is_none());
        let b = create_image_body("d", &labels);
        assert_eq!(b["type"], "snapshot");
        assert_eq!(enable_rescue_body(3)["type"], "linux64");
        let q = list_query(&[("label_selector", "a=b")], 2, 50);
        assert_eq!(q[1], ("page".to_string(), "2".to_string()));
    }

    #[test]
    fn poll_delay_grows() {
        let s = Duration::from_millis(500);
        let m = Duration::from_secs(5);
        assert_eq!(poll_delay(s, m, 0), s);
        assert!(poll_delay(s, m, 2) > poll_delay(s, m, 1));
        assert_eq!(poll_delay(s, m, 20), m);
    }
}
