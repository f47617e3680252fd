//! HTTP client for the metadata service: per-request timeouts, retries with backoff, one deadline.

use std::time::Duration;

use tokio::time::Instant;

use crate::plumbing::http::{BodyError, describe};
use crate::plumbing::retry::{Backoff, Class, GaveUp, Policy, retry};

/// Where the metadata service lives on every Hetzner Cloud server.
pub const DEFAULT_URL: &str = "http://169.254.169.254/hetzner/v1/";

/// Documents are small (user-data is at most 32 KiB); anything much larger is refused unread.
pub(crate) const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// How the client talks to the metadata service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL ending in `/`, such as [`DEFAULT_URL`].
    pub base_url: String,
    /// Time allowed for one request, headers and body.
    pub request_timeout: Duration,
    /// First pause between attempts; doubled after each failure up to `max_backoff`.
    pub initial_backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
    /// Largest body accepted.
    pub max_body: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            base_url: DEFAULT_URL.to_string(),
            request_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// Why a document could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No usable answer before the deadline (no connection, timeouts, 5xx or 429 throughout).
    #[error(
        "the metadata service at {url} gave no usable answer within {secs}s after {attempts} attempts (last: {last}); check that this is a Hetzner Cloud server whose network is up, or pass --metadata-url"
    )]
    Deadline {
        /// The URL asked.
        url: String,
        /// The time it was asked for, in seconds.
        secs: u64,
        /// Attempts made.
        attempts: u32,
        /// Why the last attempt failed, one line.
        last: String,
    },
    /// An answer that is neither a success, 404, 429 nor 5xx (it would not change on retry).
    #[error(
        "the metadata service answered {url} with HTTP {status}; this is not a Hetzner metadata service, or the path is wrong"
    )]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// A body over [`Settings::max_body`]; it is not read further.
    #[error("the metadata service's answer to {url} is larger than {limit} bytes; refusing it")]
    TooLarge {
        /// The URL asked.
        url: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// A base URL that does not parse, is not http(s) or has no host: the URL as given.
    #[error("invalid metadata URL '{0}': give an http:// or https:// URL ending in /hetzner/v1/")]
    BadUrl(String),
    /// The HTTP client could not be built: reqwest's reason.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

/// A metadata service client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: Settings,
}

/// The result of one attempt: a final answer, a reason to try again, or a failure for good.
enum Attempt {
    Done(Option<Vec<u8>>),
    Retry(String),
    Failed(FetchError),
}

impl Client {
    /// A client with these settings (a `/` is added to the base URL if missing). Fails on a
    /// base URL that is not http(s) with a host ([`FetchError::BadUrl`]).
    pub fn new(mut settings: Settings) -> Result<Self, FetchError> {
        if !settings.base_url.ends_with('/') {
            settings.base_url.push('/');
        }
        let url = reqwest::Url::parse(&settings.base_url)
            .map_err(|_| FetchError::BadUrl(settings.base_url.clone()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(FetchError::BadUrl(settings.base_url.clone()));
        }
        let mut builder = crate::plumbing::tls::client_builder()
            .connect_timeout(settings.request_timeout)
            .timeout(settings.request_timeout)
            // The service is link-local: a proxy from the environment must not be used.
            .no_proxy();
        if url.scheme() == "http" {
            // Plain HTTP, as on every Hetzner server: no certificate store to load (it costs
            // memory and start-up time at boot, and may not be there yet).
            builder = builder.tls_certs_only(Vec::<reqwest::Certificate>::new());
        }
        let http = builder
            .build()
            .map_err(|e| FetchError::Setup(e.to_string()))?;
        Ok(Client { http, settings })
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.settings.base_url
    }

    /// Fetches `path` below the base URL, retrying until `deadline`. `Ok(None)` means the
    /// service answered 404 (the document does not exist); an empty body (or 204) is `Some([])`.
    pub async fn get(&self, path: &str, deadline: Instant) -> Result<Option<Vec<u8>>, FetchError> {
        let url = format!("{}{}", self.settings.base_url, path);
        let started = Instant::now();
        let backoff = Backoff::doubling(self.settings.initial_backoff, self.settings.max_backoff);
        let attempt = |n: u32| {
            let url = &url;
            async move {
                if n > 1 {
                    tracing::debug!(url = %url, attempt = n, "metadata service not ready; retrying");
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(Attempt::Retry("no time left".into()));
                }
                let budget = remaining.min(self.settings.request_timeout);
                match tokio::time::timeout(budget, self.attempt(url)).await {
                    Ok(Ok(Attempt::Done(body))) => Ok(body),
                    Ok(Ok(retry)) => Err(retry),
                    Ok(Err(e)) => Err(Attempt::Failed(e)),
                    Err(_) => Err(Attempt::Retry(format!(
                        "no answer within {} ms",
                        budget.as_millis()
                    ))),
                }
            }
        };
        let classify = |a: &Attempt| match a {
            Attempt::Failed(_) => Class::Final,
            _ => Class::Passing,
        };
        match retry(Policy::until(backoff, deadline), attempt, classify).await {
            Ok(body) => Ok(body),
            Err(GaveUp {
                last: Attempt::Failed(e),
                ..
            }) => Err(e),
            Err(GaveUp { last, attempts, .. }) => Err(FetchError::Deadline {
                url,
                secs: deadline.saturating_duration_since(started).as_secs().max(1),
                attempts,
                last: match last {
                    Attempt::Retry(why) => why,
                    _ => String::new(),
                },
            }),
        }
    }

    async fn attempt(&self, url: &str) -> Result<Attempt, FetchError> {
        let resp = match self.http.get(url).send().await {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Retry(describe(&e))),
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Attempt::Done(None));
        }
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Ok(Attempt::Retry(format!("HTTP {}", status.as_u16())));
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        match crate::plumbing::http::read_limited(resp, self.settings.max_body).await {
            Ok(body) => Ok(Attempt::Done(Some(body))),
            Err(BodyError::TooLarge) => Err(FetchError::TooLarge {
                url: url.to_string(),
                limit: self.settings.max_body,
            }),
            // A body cut short is a passing fault: ask again.
            Err(BodyError::Cut(why)) => Ok(Attempt::Retry(format!("body cut short: {why}"))),
        }
    }
}
