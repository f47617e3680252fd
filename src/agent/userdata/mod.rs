//! The server's user-data: the `hcloud_nixos` section of a cloud-config document.
//!
//! User-data reaches the server the way the tool that created it wrote it, so [`parse`] accepts
//! what real tools send: a cloud-config document with or without its `#cloud-config` line; that
//! document in base64, gzip, or base64 of gzip (the Hetzner API takes text only, so binary
//! user-data is sent base64-encoded, and cloud-init's Hetzner datasource decodes it); a MIME
//! multipart archive as Terraform's `cloudinit_config` or `hcloud server create` with several
//! `--user-data-from-file` render it (parts in 7bit or base64, the whole optionally gzip+base64),
//! with the cloud-config inside.
//!
//! ```yaml
//! #cloud-config
//! hcloud_nixos:
//!   flakehub_token: flakehub1_...
//!   flake: my-org/infra/0.1#nixosConfigurations.web
//!   poll_interval: 5m        # optional
//!   operation: switch        # optional: switch, boot or test
//! ```
//!
//! Every other top-level key belongs to cloud-init; they are listed in [`UserData::other_keys`]
//! so that the agent can say once that it ignores them. Nothing here panics or reaches a shell,
//! and the token never appears in a message.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use serde_json::Value;

use crate::plumbing::text::one_line;

pub(crate) mod hostkey;
mod section;

pub(crate) use hostkey::HostKey;

pub(crate) use section::known_keys;
use section::{FIELDS, kind, parse_section};

#[cfg(test)]
mod tests;

/// Hetzner accepts at most 32 KiB of user-data.
pub(crate) const MAX_RAW: usize = 32 * 1024;
/// The most a document may grow to while decoding (gzip, base64): a guard against gzip bombs.
pub(crate) const MAX_DECODED: usize = 1024 * 1024;
/// How many base64/gzip layers are peeled at most.
const MAX_LAYERS: usize = 4;
/// The section of the cloud-config document that is ours.
pub(crate) const SECTION: &str = "hcloud_nixos";
/// The longest message about the document, in characters.
const MAX_MESSAGE: usize = 500;
/// The longest key shown in a message (the longest we know has 24). A longer one is no typo of
/// ours, and a mangled line can make a token part of a key: its length is shown instead.
const MAX_KEY_SHOWN: usize = 32;

/// A key of the document for a message: itself on one line, or how long it is.
fn shown_key(key: &str) -> String {
    match key.chars().count() {
        n if n > MAX_KEY_SHOWN => format!("(a key of {n} characters)"),
        _ => one_line(key, MAX_KEY_SHOWN),
    }
}

/// Why user-data could not be decoded into a text document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("user-data is {0} bytes; Hetzner accepts at most 32 KiB (32768 bytes)")]
    TooLarge(usize),
    #[error(
        "user-data decompresses to more than {} bytes; refusing it (a gzip bomb?)",
        MAX_DECODED
    )]
    DecompressedTooLarge,
    #[error("user-data looks gzip-compressed but does not decompress: {0}")]
    Gzip(String),
    #[error("user-data is wrapped in more than {MAX_LAYERS} layers of base64/gzip")]
    TooManyLayers,
    #[error(
        "user-data is not UTF-8 text after decoding (binary user-data must be gzip, sent base64-encoded)"
    )]
    NotText,
}

/// The `hcloud_nixos` settings from user-data, in the configuration's raw shape (the keys in
/// [`known_keys`] only). A key is `None` when it is not set or when its value is invalid (then
/// [`UserData::problems`] says why); the values present passed the configuration's own checks
/// (the `fleet` mapping's are checked once the configuration file is merged in).
pub(crate) type UserSettings = crate::agent::config::RawConfig;

/// What the user-data says, as far as hcloud-nixos is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserData {
    /// `None`: there is no `hcloud_nixos` section (or no user-data at all).
    pub settings: Option<UserSettings>,
    /// One line per problem: where, what is wrong, what to do. Never contains the token.
    pub problems: Vec<String>,
    /// Top-level cloud-config keys that belong to cloud-init (ignored by hcloud-nixos).
    pub other_keys: Vec<String>,
    /// Other cloud-init user-data hcloud-nixos does not read, one line each (a
    /// `text/x-shellscript` part, an `#include` document, ...).
    pub other_parts: Vec<String>,
    /// The server's SSH host key (cloud-init's `ssh_keys`, as `create` passes it), installed by
    /// the boot step before sshd starts.
    pub(crate) host_key: Option<HostKey>,
}

// ---------------------------------------------------------------------------------------------
// Decoding: base64 / gzip layers, then MIME multipart.

fn is_gzip(data: &[u8]) -> bool {
    data.starts_with(&[0x1f, 0x8b])
}

/// Decompresses gzip data, refusing to produce more than `limit` bytes.
fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let decoder = flate2::read::MultiGzDecoder::new(data);
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Gzip(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::DecompressedTooLarge);
    }
    Ok(out)
}

/// Text that a cloud-config document could be: UTF-8 without control characters other than
/// tab, newline and carriage return.
fn is_text(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(|s| {
        !s.chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    })
}

/// `data` base64-decoded, if it is base64 (standard alphabet, padding optional, whitespace and
/// line breaks ignored) of something that is gzip or text. Plain text documents are not: a
/// cloud-config document has `:`, `#` or spaces, which base64 has not.
fn unbase64(data: &[u8]) -> Option<Vec<u8>> {
    let compact: Vec<u8> = data
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if compact.len() < 4
        || !compact
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    {
        return None;
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let decoded = engine.decode(&compact).ok()?;
    (is_gzip(&decoded) || is_text(&decoded)).then_some(decoded)
}

/// Peels base64 and gzip layers off `data`; what is left is the document. Decompression stops
/// beyond `limit` bytes.
fn peel(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut current = data.to_vec();
    for _ in 0..=MAX_LAYERS {
        if is_gzip(&current) {
            current = gunzip(&current, limit)?;
        } else if let Some(decoded) = unbase64(&current) {
            current = decoded;
        } else {
            if let Some(rest) = current.strip_prefix("\u{feff}".as_bytes()) {
                current = rest.to_vec();
            }
            if std::str::from_utf8(&current).is_err() {
                return Err(DecodeError::NotText);
            }
            return Ok(current);
        }
    }
    Err(DecodeError::TooManyLayers)
}

/// Peels base64 / gzip / base64-of-gzip layers (at most a few) off raw user-data and returns the
/// text document, which may still be a MIME multipart archive. Raw user-data over 32 KiB and
/// anything that decompresses to more than 1 MiB are refused. The result is valid UTF-8.
pub(crate) fn decode(raw: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if raw.len() > MAX_RAW {
        return Err(DecodeError::TooLarge(raw.len()));
    }
    peel(raw, MAX_DECODED)
}

/// Whether a decoded document is a MIME archive, as cloud-init decides it (`mime-version:` in
/// the first 4096 bytes), or starts with a `Content-Type:` header.
fn is_mime(text: &str) -> bool {
    let head: String = text
        .bytes()
        .take(4096)
        .map(|b| b.to_ascii_lowercase() as char)
        .collect();
    head.contains("mime-version:") || head.starts_with("content-type:")
}

/// The first line of a document decides what it is for cloud-init (when no MIME type does).
fn kind_by_first_line(text: &str) -> Option<&'static str> {
    const STARTS: &[(&str, &str)] = &[
        ("#cloud-config-archive", "text/cloud-config-archive"),
        ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
        ("#cloud-config", "text/cloud-config"),
        ("#!", "text/x-shellscript"),
        ("#include-once", "text/x-include-once-url"),
        ("#include", "text/x-include-url"),
        ("#cloud-boothook", "text/cloud-boothook"),
        ("#part-handler", "text/part-handler"),
        ("#upstart-job", "text/upstart-job"),
        ("## template: jinja", "text/jinja2"),
    ];
    let text = text.trim_start_matches('\u{feff}');
    STARTS
        .iter()
        .find(|(prefix, _)| {
            text.len() >= prefix.len()
                && text.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        })
        .map(|(_, kind)| *kind)
}

/// A piece of user-data after decoding: a cloud-config document or something else.
enum Piece {
    CloudConfig { label: String, text: String },
    Other { label: String, text: String },
}

fn classify_document(text: String) -> Piece {
    match kind_by_first_line(&text) {
        // With or without `#cloud-config`: a document cloud-init would not read still can be
        // ours (cloud-init needs the line; hcloud-nixos does not).
        Some("text/cloud-config") | None => Piece::CloudConfig {
            label: "user-data".into(),
            text,
        },
        Some(kind) => Piece::Other {
            label: format!("user-data ({kind})"),
            text,
        },
    }
}

fn split_mime(text: &str, problems: &mut Vec<String>) -> Vec<Piece> {
    use mail_parser::MimeHeaders as _;

    let Some(message) = mail_parser::MessageParser::default().parse(text.as_bytes()) else {
        problems.push("user-data: looks like a MIME archive but cannot be parsed".into());
        return Vec::new();
    };
    let mut pieces = Vec::new();
    let mut number = 0;
    let mut total = 0usize;
    for part in &message.parts {
        if part.is_multipart() {
            continue;
        }
        number += 1;
        let ctype = part
            .content_type()
            .map(|ct| {
                let sub = ct.subtype().unwrap_or("");
                format!("{}/{}", ct.ctype(), sub).to_ascii_lowercase()
            })
            .unwrap_or_else(|| "text/plain".into());
        let label = format!("user-data part {number} ({ctype})");
        // All parts together stay within the limit: many small gzip parts could otherwise
        // each grow to the limit.
        let body = match peel(part.contents(), MAX_DECODED.saturating_sub(total)) {
            Ok(body) if total + body.len() > MAX_DECODED => {
                problems.push(format!("{label}: {}", DecodeError::DecompressedTooLarge));
                break;
            }
            Ok(body) => body,
            Err(e @ DecodeError::DecompressedTooLarge) => {
                problems.push(format!("{label}: {e}"));
                break;
            }
            Err(e) => {
                problems.push(format!("{label}: {e}"));
                continue;
            }
        };
        total += body.len();
        // peel() returns UTF-8 only.
        let body = String::from_utf8(body).unwrap_or_default();
        let is_cloud_config = match ctype.as_str() {
            "text/cloud-config" => true,
            // cloud-init decides these by the first line.
            "text/plain"
            | "text/x-not-multipart"
            | "application/octet-stream"
            | "application/gzip"
            | "application/x-gzip" => kind_by_first_line(&body) == Some("text/cloud-config"),
            _ => false,
        };
        pieces.push(if is_cloud_config {
            Piece::CloudConfig { label, text: body }
        } else {
            Piece::Other { label, text: body }
        });
    }
    pieces
}

/// The YAML parser's message, first line only, with anything token-like taken out: the parser
/// may quote the source around a mistake, and that may be the token's line.
fn yaml_error(e: &serde_saphyr::Error, text: &str) -> String {
    let message = e.to_string();
    let mut first = message.lines().next().unwrap_or("").trim();
    first = first.strip_prefix("error: ").unwrap_or(first);
    // Advice meant for programmers using the parser, not for the user.
    if let Some(at) = first.find(", set DuplicateKeyPolicy") {
        first = &first[..at];
    }
    let mut first = first.to_string();
    for secret in token_candidates(text) {
        first = first.replace(&secret, "[redacted]");
    }
    first
}

/// Strings in a document that may be a token: the value on any `flakehub_token` line, and any
/// word that contains `flakehub1_`.
fn token_candidates(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        if let Some(at) = line.find("flakehub_token")
            && let Some((_, value)) = line[at..].split_once(':')
        {
            let value = value
                .split(" #")
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches(|c| c == '"' || c == '\'');
            if value.len() >= 4 {
                found.push(value.to_string());
            }
        }
        for word in line.split(|c: char| c.is_whitespace() || "\"':,[]{}".contains(c)) {
            if word.contains("flakehub1_") {
                found.push(word.to_string());
            }
        }
    }
    found
}

fn redact(lines: &mut [String], secrets: &[String]) {
    for line in lines {
        for secret in secrets {
            if !secret.is_empty() && line.contains(secret.as_str()) {
                *line = line.replace(secret.as_str(), "[redacted]");
            }
        }
    }
}

/// Parses raw user-data (as the metadata service serves it). Never panics; empty input is "no
/// user-data". Invalid values are left `None` in the settings and reported in `problems`, so the
/// valid rest can still be used.
pub fn parse(raw: &[u8]) -> UserData {
    let mut data = UserData::default();
    if raw.iter().all(u8::is_ascii_whitespace) {
        return data;
    }
    let text = match decode(raw) {
        Ok(text) => String::from_utf8(text).unwrap_or_default(),
        Err(e) => {
            data.problems.push(e.to_string());
            return data;
        }
    };
    // A document that starts like one of cloud-init's formats is that format, whatever headers
    // its content quotes further down (cloud-init reads it the same way).
    let pieces = if is_mime(&text) && kind_by_first_line(&text).is_none() {
        split_mime(&text, &mut data.problems)
    } else {
        vec![classify_document(text)]
    };

    let mut sections: Vec<(String, Value)> = Vec::new();
    let mut secrets: Vec<String> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Other { label, text } => {
                if text.contains(&format!("{SECTION}:")) {
                    data.problems.push(format!(
                        "{label}: has an {SECTION} section, but hcloud-nixos reads only cloud-config; \
                         put it in a #cloud-config document (or a text/cloud-config part)"
                    ));
                }
                data.other_parts.push(label);
            }
            Piece::CloudConfig { label, text } => {
                secrets.extend(token_candidates(&text));
                let value: Value = if text.trim().is_empty() {
                    Value::Null
                } else {
                    match serde_saphyr::from_str(&text) {
                        Ok(value) => value,
                        Err(e) => {
                            data.problems.push(format!(
                                "{label}: not valid YAML: {}",
                                yaml_error(&e, &text)
                            ));
                            continue;
                        }
                    }
                };
                match value {
                    Value::Null => {}
                    Value::Object(map) => {
                        for (key, value) in map {
                            if key == SECTION {
                                sections.push((label.clone(), value));
                            } else if key == "ssh_keys" {
                                if let Some(host_key) =
                                    hostkey::from_ssh_keys(&value, &mut data.problems)
                                {
                                    secrets.push(host_key.private.expose().to_string());
                                    data.host_key.get_or_insert(host_key);
                                }
                            } else if !data.other_keys.contains(&key) {
                                data.other_keys.push(key);
                            }
                        }
                    }
                    other => data.problems.push(format!(
                        "{label}: the cloud-config document is {}, not a mapping of keys",
                        kind(&other)
                    )),
                }
            }
        }
    }

    if sections.len() > 1 {
        let labels: Vec<&str> = sections.iter().map(|(l, _)| l.as_str()).collect();
        data.problems.push(format!(
            "{SECTION}: appears in {} cloud-config parts ({}); hcloud-nixos reads the first, keep it in one",
            sections.len(),
            labels.join(", ")
        ));
    }
    if let Some((_, section)) = sections.first() {
        data.settings = Some(parse_section(section, &mut data.problems));
    }

    fit_for_the_log(&mut data, secrets);
    data
}

/// What is said about the document goes to the log: no message, no key carries the token, and
/// each is one line, whatever the document (a key, a MIME type, a parser's quote) holds.
fn fit_for_the_log(data: &mut UserData, mut secrets: Vec<String>) {
    if let Some(token) = data
        .settings
        .as_ref()
        .and_then(|s| s.flakehub_token.as_ref())
    {
        secrets.push(token.expose().to_string());
    }
    // A token's random part alone is secret too: a message may quote a value that holds it
    // without its prefix (a mangled line).
    let parts: Vec<String> = (secrets.iter())
        .filter_map(|t| t.split_once("flakehub1_").map(|(_, part)| part.to_string()))
        .filter(|part| part.len() >= 8)
        .collect();
    secrets.extend(parts);
    secrets.retain(|s| s.len() >= 4);
    // Longest first, so that a shorter secret inside a longer one does not leave a tail.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    redact(&mut data.problems, &secrets);
    redact(&mut data.other_keys, &secrets);
    for line in data.problems.iter_mut().chain(&mut data.other_parts) {
        *line = one_line(line, MAX_MESSAGE);
    }
    for key in &mut data.other_keys {
        *key = shown_key(key);
    }
}

/// The effective settings as `hcloud-nixos userdata check` prints them: the token as
/// `[redacted]` with its length, unset settings as such, and what is left to cloud-init.
pub fn describe(data: &UserData) -> String {
    let mut out = String::new();
    match &data.settings {
        None => {
            let _ = writeln!(
                out,
                "No {SECTION} section: the agent stays idle (nothing to deploy)."
            );
        }
        Some(settings) => {
            let _ = writeln!(out, "{SECTION}:");
            let width = known_keys().map(str::len).max().unwrap_or(0);
            for field in FIELDS {
                let value = (field.show)(settings).unwrap_or_else(|| "(not set)".into());
                let _ = writeln!(
                    out,
                    "  {:<width$}  {value}",
                    format!("{}:", field.key),
                    width = width + 1
                );
            }
        }
    }
    if let Some(key) = &data.host_key {
        let _ = writeln!(
            out,
            "SSH host key (installed at boot, before sshd starts): {}",
            key.public_line()
        );
    }
    if !data.other_keys.is_empty() {
        let _ = writeln!(
            out,
            "Left to cloud-init (ignored by hcloud-nixos): {}",
            data.other_keys.join(", ")
        );
    }
    for part in &data.other_parts {
        let _ = writeln!(out, "Left to cloud-init (ignored by hcloud-nixos): {part}");
    }
    out
}

/// `hcloud-nixos userdata check FILE`: the description when the file is fine, else one line per
/// problem. A file that cannot be read or is over 32 KiB is one problem.
pub fn check_file(path: &Path) -> Result<String, Vec<String>> {
    let shown_path = path.display();
    let file =
        std::fs::File::open(path).map_err(|e| vec![format!("{shown_path}: cannot read: {e}")])?;
    let mut raw = Vec::new();
    file.take(MAX_RAW as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|e| vec![format!("{shown_path}: cannot read: {e}")])?;
    if raw.len() > MAX_RAW {
        return Err(vec![format!(
            "{shown_path}: more than 32 KiB (32768 bytes); Hetzner accepts at most 32 KiB of user-data (gzip and base64 it, or shorten it)"
        )]);
    }
    let data = parse(&raw);
    if data.problems.is_empty() {
        Ok(describe(&data))
    } else {
        Err(data.problems)
    }
}
