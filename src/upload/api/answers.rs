//! What the Cloud API sends and answers, read without I/O: resources, actions, errors, pages, and what an answer means for trying again.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::ApiError;
use crate::plumbing::retry::Class;
use crate::upload::outside::one_line;

/// Largest answer read; a page of 50 servers is about 150 KiB.
pub(crate) const MAX_ANSWER_BYTES: usize = 8 << 20;

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
    pub(crate) description: Option<String>,
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

/// Pulls Hetzner's `code` and `message` out of an error body, each made one line of bounded
/// length (they reach the terminal).
pub(crate) fn parse_error_body(body: &str) -> Option<(String, String)> {
    let e: ErrorEnvelope = serde_json::from_str(body).ok()?;
    Some((one_line(&e.error.code, 64), one_line(&e.error.message, 300)))
}

/// Whether an error answer with this HTTP status and Hetzner error code may pass.
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

/// What one exchange with the API came to.
#[derive(Debug)]
pub(crate) enum Exchange {
    /// A successful answer (`null` when it had no body).
    Done(Value),
    /// An error answer: the API did nothing. `class` says whether trying again may help.
    Refused { error: ApiError, class: Class },
    /// No answer, or one cut off: the request may or may not have been carried out.
    Lost(ApiError),
    /// A complete successful answer that cannot be read: it was carried out, and asking again
    /// gets the same answer.
    Unreadable(ApiError),
}

/// What an answer with this status and body means. `wait_429` is how long a 429 asks to wait.
pub(crate) fn judge(what: &str, status: u16, body: &[u8], wait_429: Duration) -> Exchange {
    let text = String::from_utf8_lossy(body);
    if (200..300).contains(&status) {
        if text.trim().is_empty() {
            return Exchange::Done(Value::Null);
        }
        return match serde_json::from_str(&text) {
            Ok(v) => Exchange::Done(v),
            Err(e) => Exchange::Unreadable(ApiError::Decode {
                what: what.to_string(),
                reason: format!("not JSON ({e})"),
            }),
        };
    }
    let error = match parse_error_body(&text) {
        Some((code, message)) => ApiError::Hetzner {
            status,
            code,
            message,
        },
        None => ApiError::Unexpected {
            what: what.to_string(),
            status,
            body: one_line(&text, 200),
        },
    };
    let class = if !is_retryable(status, error.code()) {
        Class::Final
    } else if status == 429 {
        Class::After(wait_429)
    } else {
        Class::Passing
    };
    Exchange::Refused { error, class }
}

/// The field `key` of an answer, as a `T`.
pub(crate) fn take<T: DeserializeOwned>(
    what: &str,
    v: &mut Value,
    key: &str,
) -> Result<T, ApiError> {
    let field = v.get_mut(key).map(Value::take).unwrap_or(Value::Null);
    serde_json::from_value(field).map_err(|e| ApiError::Decode {
        what: what.to_string(),
        reason: format!("field '{key}': {}", one_line(&e.to_string(), 200)),
    })
}

/// The page after `page`, from an answer's `meta.pagination.next_page`; `None` on the last page
/// (or when the answer names no later page).
pub(crate) fn next_page(v: &Value, page: u64) -> Option<u64> {
    let n = v
        .get("meta")?
        .get("pagination")?
        .get("next_page")?
        .as_u64()?;
    (n > page).then_some(n)
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

/// Body of `POST /servers` for a temporary server: not started, labelled.
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

/// The `command` of the action a server action starts (`poweron` starts `start_server`).
pub(crate) fn action_command(action: &str) -> &str {
    match action {
        "poweron" => "start_server",
        "poweroff" => "stop_server",
        "shutdown" => "shutdown_server",
        "reset" => "reset_server",
        other => other,
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
    fn rate_limit_waits() {
        let cap = Duration::from_secs(30);
        let s = Duration::from_secs;
        assert_eq!(rate_limit_wait(Some(10), Some(100), 90, false, cap), None);
        assert_eq!(
            rate_limit_wait(Some(0), Some(100), 90, false, cap),
            Some(s(1))
        );
        assert_eq!(
            rate_limit_wait(Some(0), Some(100), 97, true, cap),
            Some(s(3))
        );
        assert_eq!(
            rate_limit_wait(Some(0), Some(100), 100, true, cap),
            Some(s(1))
        );
        assert_eq!(
            rate_limit_wait(Some(0), Some(5000), 0, true, cap),
            Some(cap)
        );
        assert_eq!(rate_limit_wait(None, None, 0, true, cap), Some(s(1)));
    }

    #[test]
    fn answers_judged() {
        let w = Duration::from_secs(3);
        let body = br#"{"error":{"code":"invalid_input","message":"invalid input in field 'broken_field': is too long","details":{}}}"#;
        match judge("POST /servers", 422, body, w) {
            Exchange::Refused { error, class } => {
                assert_eq!(
                    error.to_string(),
                    "invalid_input: invalid input in field 'broken_field': is too long"
                );
                assert_eq!(class, Class::Final);
            }
            other => panic!("{other:?}"),
        }
        let body = br#"{"error":{"code":"rate_limit_exceeded","message":"slow down"}}"#;
        assert!(matches!(
            judge("GET /x", 429, body, w),
            Exchange::Refused { class: Class::After(d), .. } if d == w
        ));
        assert!(matches!(
            judge("GET /x", 502, b"<html>\nbad gateway</html>", w),
            Exchange::Refused {
                class: Class::Passing,
                error: ApiError::Unexpected { .. }
            }
        ));
        assert!(matches!(
            judge("GET /x", 204, b"", w),
            Exchange::Done(Value::Null)
        ));
        assert!(matches!(
            judge("GET /x", 200, b"{\"a\":", w),
            Exchange::Unreadable(_)
        ));
        assert!(parse_error_body("<html>").is_none());
        let (_, m) =
            parse_error_body(r#"{"error":{"code":"x","message":"a\nb\u001b[2J"}}"#).unwrap();
        assert_eq!(m, "a b [2J");
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
        assert_eq!(action_command("poweron"), "start_server");
        assert_eq!(action_command("create_image"), "create_image");
    }

    #[test]
    fn pages() {
        let v = json!({"meta": {"pagination": {"page": 2, "next_page": 3}}});
        assert_eq!(next_page(&v, 2), Some(3));
        assert_eq!(next_page(&v, 3), None, "never backwards");
        assert_eq!(
            next_page(&json!({"meta": {"pagination": {"next_page": null}}}), 1),
            None
        );
        assert_eq!(next_page(&json!([]), 1), None);
    }
}
