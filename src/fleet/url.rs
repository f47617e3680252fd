//! A fleet backend's URL as configured: requests use it whole, credentials included; every
//! message, status, record and `Debug` shows it with the credentials replaced by `[redacted]`.

use std::fmt;

/// What stands where the credentials were.
const REDACTED: &str = "[redacted]";

/// A backend's URL (`http://user:password@host:port`): [`ServerUrl::expose`] for requests only;
/// `Display` and `Debug` print [`ServerUrl::shown`].
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ServerUrl {
    full: String,
}

impl ServerUrl {
    pub(crate) fn new(text: &str) -> Self {
        ServerUrl {
            full: text.trim_end_matches('/').to_string(),
        }
    }

    /// The URL with its credentials: for requests, never for messages.
    pub(crate) fn expose(&self) -> &str {
        &self.full
    }

    /// The URL with the credentials replaced by `[redacted]`.
    pub(crate) fn shown(&self) -> String {
        redact(&self.full)
    }

    /// The URL without any credentials (what a gRPC channel connects to).
    pub(crate) fn without_credentials(&self) -> String {
        match split_userinfo(&self.full) {
            Some((head, _, tail)) => format!("{head}{tail}"),
            None => self.full.clone(),
        }
    }

    /// The user and password the URL carries (percent-decoded), if any.
    pub(crate) fn credentials(&self) -> Option<(String, String)> {
        let (_, userinfo, _) = split_userinfo(&self.full)?;
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        Some((percent_decode(user), percent_decode(password)))
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.shown())
    }
}

impl PartialEq<&str> for ServerUrl {
    fn eq(&self, other: &&str) -> bool {
        self.full == *other
    }
}

/// `(before, userinfo, from '@' on)` when the authority of `text` carries `userinfo@`. Works on
/// any text, a URL or not, so that a value refused as a URL is shown without its password too.
fn split_userinfo(text: &str) -> Option<(&str, &str, &str)> {
    let start = text.find("://").map_or(0, |i| i + 3);
    let rest = &text[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..end].rfind('@')?;
    Some((&text[..start], &rest[..at], &rest[at + 1..]))
}

/// `text` with the credentials of its authority (`user:password@`) replaced by `[redacted]`. Text
/// that is no URL loses everything up to its last `@`: it may be a URL mistyped.
pub(crate) fn redact(text: &str) -> String {
    let parsed = reqwest::Url::parse(text)
        .ok()
        .filter(reqwest::Url::has_host);
    if parsed
        .as_ref()
        .is_some_and(|u| u.username().is_empty() && u.password().is_none())
    {
        return text.to_string();
    }
    if parsed.is_some()
        && let Some((head, _, tail)) = split_userinfo(text)
    {
        return format!("{head}{REDACTED}@{tail}");
    }
    let start = text.find("://").map_or(0, |i| i + 3);
    match text[start..].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &text[..start], &text[start + at..]),
        None => text.to_string(),
    }
}

/// `%XX` decoded; anything else kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_used_and_never_shown() {
        let u = ServerUrl::new("http://agent:s3cr%40t@127.0.0.1:8080/");
        assert_eq!(u.expose(), "http://agent:s3cr%40t@127.0.0.1:8080");
        assert_eq!(u.shown(), "http://[redacted]@127.0.0.1:8080");
        assert_eq!(
            format!("{u} {u:?}"),
            "http://[redacted]@127.0.0.1:8080 \"http://[redacted]@127.0.0.1:8080\""
        );
        assert_eq!(u.without_credentials(), "http://127.0.0.1:8080");
        assert_eq!(u.credentials(), Some(("agent".into(), "s3cr@t".into())));
        let plain = ServerUrl::new("https://10.0.0.5:2379");
        assert_eq!(plain.shown(), "https://10.0.0.5:2379");
        assert_eq!(plain.credentials(), None);
        // An '@' in the path is not userinfo; text that is no URL is redacted all the same.
        assert_eq!(redact("http://h:1/a@b"), "http://h:1/a@b");
        assert_eq!(redact("htp//u:pw@h:1"), "[redacted]@h:1");
        assert_eq!(redact("htp://u:pw@h:1/x"), "htp://[redacted]@h:1/x");
        assert_eq!(redact("u:pw@h"), "[redacted]@h");
        assert_eq!(redact("http://a@b@h"), "http://[redacted]@h");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
