//! The Hetzner metadata service's documents, parsed into typed data (pure; the HTTP side is in `client`).
//!
//! Hetzner's `network-config` follows cloud-init's network configuration version 1, and has been
//! served in more than one layout over the years: with and without `type: static` on the IPv6
//! subnet, with the prefix in the address or in a separate `netmask`, with `type: nameserver`
//! entries, with the IPv6 subnet on an alias entry (`eth0:0`) beside the NIC's own, as a nested
//! mapping or as a YAML string, wrapped in `network:` or not. All of them are accepted here.
//!
//! The service is trusted to say what this server is; the text in its documents is not. Every
//! value is checked here, where it enters, into a type that only the check makes (`address`,
//! `text`). A bad value costs the smallest part it belongs to, and is reported as a `Problem`
//! naming its field: a NIC's bad MAC, address, gateway, MTU, DNS server or search domain costs
//! that NIC; a bad name, region or id is dropped; a bad key costs that key; a bad hostname
//! costs the hostname. Only a document that is not a YAML mapping at all is an error. Sizes are
//! bounded (the document, and the number of NICs, subnets, servers, keys and problems), so no
//! input takes more than linear time or memory.

mod address;
pub mod client;
mod network_config;
pub(crate) mod text;

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

pub(crate) use address::{IpPrefix, MacAddr};
pub(crate) use network_config::{NetworkConfig, PublicInterface};
#[cfg(test)]
pub(crate) use text::DomainName;
pub(crate) use text::{Hostname, Label, SshKey, quote};

/// The largest document parsed (the client refuses larger bodies before they are read).
pub(crate) const MAX_DOCUMENT_BYTES: usize = client::DEFAULT_MAX_BODY;
/// Problems kept per document; the rest are counted in one last problem.
const MAX_PROBLEMS: usize = 32;
/// Entries of `public-keys` looked at.
const MAX_KEYS: usize = 4096;
/// Private network NICs (Hetzner attaches a server to at most a few networks).
const MAX_PRIVATE_NICS: usize = 16;
/// Alias IPs of one private network NIC.
const MAX_ALIAS_IPS: usize = 64;

/// Something wrong in a document, with the field at fault: an error when it makes the whole
/// document unusable, otherwise a warning about the part it cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{document}: {field}: {problem}")]
pub(crate) struct Problem {
    /// Which document: `metadata`, `private-networks` or `network-config`.
    pub(crate) document: &'static str,
    /// A path such as `network-config.config[0].mac_address`, or `(document)`.
    pub(crate) field: String,
    /// What is wrong and what it cost, in a few words; document text only through [`quote`].
    pub(crate) problem: String,
}

/// A document that cannot be used at all.
pub(crate) type ParseError = Problem;

/// A parsed document and the problems that cost parts of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed<T> {
    pub(crate) value: T,
    pub(crate) problems: Vec<Problem>,
}

/// A private network NIC, from `metadata/private-networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PrivateNetwork {
    pub(crate) mac: MacAddr,
    pub(crate) ip: Option<Ipv4Addr>,
    pub(crate) alias_ips: Vec<Ipv4Addr>,
    pub(crate) network_id: Option<u64>,
    pub(crate) network_name: Option<Label>,
    pub(crate) interface_num: Option<u64>,
    pub(crate) network: Option<IpPrefix>,
    pub(crate) subnet: Option<IpPrefix>,
    pub(crate) gateway: Option<Ipv4Addr>,
}

/// The `metadata` document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub(crate) struct Metadata {
    pub(crate) hostname: Option<Hostname>,
    pub(crate) instance_id: Option<u64>,
    pub(crate) region: Option<Label>,
    pub(crate) availability_zone: Option<Label>,
    pub(crate) public_ipv4: Option<Ipv4Addr>,
    /// OpenSSH public keys, one line each, without duplicates.
    pub(crate) public_keys: Vec<SshKey>,
    /// `None` when the document has no usable `network-config` (files are then left alone).
    pub(crate) network: Option<NetworkConfig>,
}

/// One document being parsed: its name for messages, and the problems found so far.
pub(crate) struct Ctx {
    document: &'static str,
    problems: RefCell<Vec<Problem>>,
    more: RefCell<usize>,
}

impl Ctx {
    fn new(document: &'static str) -> Self {
        Ctx {
            document,
            problems: RefCell::new(Vec::new()),
            more: RefCell::new(0),
        }
    }

    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> Problem {
        Problem {
            document: self.document,
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// Records a problem that cost a part of the document.
    fn warn(&self, field: impl Into<String>, problem: impl Into<String>) {
        let mut problems = self.problems.borrow_mut();
        if problems.len() < MAX_PROBLEMS {
            problems.push(self.err(field, problem));
        } else {
            *self.more.borrow_mut() += 1;
        }
    }

    fn finish<T>(self, value: T) -> Parsed<T> {
        let more = *self.more.borrow();
        let mut problems = self.problems.into_inner();
        if more > 0 {
            problems.push(Problem {
                document: self.document,
                field: "(document)".into(),
                problem: format!("{more} more problems not listed"),
            });
        }
        Parsed { value, problems }
    }

    /// The document as YAML (JSON is YAML too), refused beyond [`MAX_DOCUMENT_BYTES`].
    fn yaml(&self, text: &str) -> Result<Value, Problem> {
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(self.err(
                "(document)",
                format!("is larger than {MAX_DOCUMENT_BYTES} bytes"),
            ));
        }
        serde_saphyr::from_str(text).map_err(|e| {
            let detail = e.to_string();
            let first = detail.lines().next().unwrap_or("").trim();
            self.err(
                "(document)",
                format!("not valid YAML: {}", text::quote(first)),
            )
        })
    }

    /// A scalar as checked text: `None` (silently) when absent or empty, `None` with a problem
    /// when it is no scalar or fails `check`.
    fn checked<T>(
        &self,
        value: Option<&Value>,
        field: &str,
        check: impl Fn(&str) -> Result<T, &'static str>,
    ) -> Option<T> {
        let value = value?;
        let Some(text) = scalar_string(value) else {
            self.warn(field, format!("is a {}, not text; dropped", kind(value)));
            return None;
        };
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        match check(text) {
            Ok(v) => Some(v),
            Err(p) => {
                self.warn(field, format!("{} {p}; dropped", quote(text)));
                None
            }
        }
    }
}

fn number(text: &str) -> Result<u64, &'static str> {
    text.parse().map_err(|_| "is not a number")
}

fn ipv4(text: &str) -> Result<Ipv4Addr, &'static str> {
    Ipv4Addr::from_str(text).map_err(|_| "is not an IPv4 address")
}

fn prefix(text: &str) -> Result<IpPrefix, &'static str> {
    IpPrefix::parse(text, None).map_err(|_| "is not an address with a prefix length")
}

/// Parses the `metadata` document.
pub(crate) fn parse_metadata(text: &str) -> Result<Parsed<Metadata>, ParseError> {
    let ctx = Ctx::new("metadata");
    let doc = ctx.yaml(text)?;
    let map = match &doc {
        Value::Object(map) => map,
        Value::Null => return Err(ctx.err("(document)", "is empty")),
        other => {
            return Err(ctx.err("(document)", format!("is a {}, not a mapping", kind(other))));
        }
    };
    let get = |key: &str| map.get(key).filter(|v| !v.is_null());
    let metadata = Metadata {
        hostname: ctx.checked(get("hostname"), "hostname", Hostname::parse),
        instance_id: ctx.checked(get("instance-id"), "instance-id", number),
        region: ctx.checked(get("region"), "region", Label::parse),
        availability_zone: ctx.checked(get("availability-zone"), "availability-zone", Label::parse),
        public_ipv4: public_ipv4(&ctx, get("public-ipv4")),
        public_keys: parse_public_keys(&ctx, get("public-keys")),
        network: get("network-config")
            .and_then(|v| network_config::parse_in_metadata(&ctx, v, "network-config")),
    };
    Ok(ctx.finish(metadata))
}

/// `public-ipv4`: a placeholder such as `<public-address>` (redacted dumps) or an empty string
/// means none, as on an IPv6-only server.
fn public_ipv4(ctx: &Ctx, value: Option<&Value>) -> Option<Ipv4Addr> {
    let placeholder = value
        .and_then(scalar_string)
        .is_some_and(|s| s.trim().starts_with('<'));
    if placeholder {
        return None;
    }
    ctx.checked(value, "public-ipv4", ipv4)
}

/// Parses a `network-config` document on its own (as served at `metadata/network-config`).
#[cfg(test)]
pub(crate) fn parse_network_config_document(
    text: &str,
) -> Result<Parsed<NetworkConfig>, ParseError> {
    let ctx = Ctx::new("network-config");
    let doc = ctx.yaml(text)?;
    let network = network_config::parse(&ctx, &doc, "(document)")?;
    Ok(ctx.finish(network))
}

/// Parses the `metadata/private-networks` document.
pub(crate) fn parse_private_networks(
    text: &str,
) -> Result<Parsed<Vec<PrivateNetwork>>, ParseError> {
    let ctx = Ctx::new("private-networks");
    let doc = ctx.yaml(text)?;
    let items = match &doc {
        Value::Null => return Ok(ctx.finish(Vec::new())),
        Value::Array(items) => items,
        other => {
            return Err(ctx.err("(document)", format!("is a {}, not a list", kind(other))));
        }
    };
    if items.len() > MAX_PRIVATE_NICS {
        ctx.warn(
            "(document)",
            format!("lists more than {MAX_PRIVATE_NICS} NICs; only the first are used"),
        );
    }
    let mut networks: Vec<PrivateNetwork> = Vec::new();
    for (i, item) in items.iter().take(MAX_PRIVATE_NICS).enumerate() {
        let Some(map) = item.as_object() else {
            ctx.warn(format!("[{i}]"), "is not a mapping; skipped");
            continue;
        };
        let Some(net) = private_network(&ctx, i, map) else {
            continue;
        };
        if networks.iter().any(|n| n.mac == net.mac) {
            ctx.warn(
                format!("[{i}].mac_address"),
                format!("{} is listed twice; skipped", net.mac),
            );
            continue;
        }
        networks.push(net);
    }
    Ok(ctx.finish(networks))
}

/// One private network NIC; `None` (with a problem) when its MAC or alias IPs are bad.
fn private_network(
    ctx: &Ctx,
    i: usize,
    map: &serde_json::Map<String, Value>,
) -> Option<PrivateNetwork> {
    let at = |k: &str| format!("[{i}].{k}");
    let get = |key: &str| map.get(key).filter(|v| !v.is_null());
    let Some(mac_text) = get("mac_address").and_then(scalar_string) else {
        ctx.warn(at("mac_address"), "is missing; this NIC is skipped");
        return None;
    };
    let mac = match MacAddr::from_str(&mac_text) {
        Ok(mac) => mac,
        Err(p) => {
            ctx.warn(
                at("mac_address"),
                format!("{} {p}; this NIC is skipped", quote(&mac_text)),
            );
            return None;
        }
    };
    let alias_ips = match get("alias_ips") {
        None => Vec::new(),
        Some(Value::Array(list)) if list.len() <= MAX_ALIAS_IPS => {
            let mut ips = Vec::new();
            for (j, v) in list.iter().enumerate() {
                let s = scalar_string(v).unwrap_or_default();
                match ipv4(s.trim()) {
                    Ok(ip) => ips.push(ip),
                    Err(p) => {
                        ctx.warn(
                            format!("[{i}].alias_ips[{j}]"),
                            format!("{} {p}; NIC {mac} is skipped", quote(&s)),
                        );
                        return None;
                    }
                }
            }
            ips
        }
        Some(Value::Array(_)) => {
            ctx.warn(
                at("alias_ips"),
                format!("has more than {MAX_ALIAS_IPS} addresses; NIC {mac} is skipped"),
            );
            return None;
        }
        Some(other) => {
            ctx.warn(
                at("alias_ips"),
                format!("is a {}, not a list; NIC {mac} is skipped", kind(other)),
            );
            return None;
        }
    };
    Some(PrivateNetwork {
        mac,
        ip: ctx.checked(get("ip"), &at("ip"), ipv4),
        alias_ips,
        network_id: ctx.checked(get("network_id"), &at("network_id"), number),
        network_name: ctx.checked(get("network_name"), &at("network_name"), Label::parse),
        interface_num: ctx.checked(get("interface_num"), &at("interface_num"), number),
        network: ctx.checked(get("network"), &at("network"), prefix),
        subnet: ctx.checked(get("subnet"), &at("subnet"), prefix),
        gateway: ctx.checked(get("gateway"), &at("gateway"), ipv4),
    })
}

/// `public-keys`: a list of keys (the Hetzner layout), one key as text, or the EC2 layout
/// `{name: {openssh-key: "..."}}`. An entry may hold several lines (a pasted file): blank and
/// `#` lines are skipped, every other line must be a key. A bad line costs that key.
fn parse_public_keys(ctx: &Ctx, value: Option<&Value>) -> Vec<SshKey> {
    let items: Vec<&Value> = match value {
        None => return Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        Some(Value::Object(map)) => map
            .values()
            .map(|v| match v {
                Value::Object(inner) => inner.get("openssh-key").unwrap_or(&Value::Null),
                other => other,
            })
            .collect(),
        Some(other) => {
            ctx.warn(
                "public-keys",
                format!("is a {}, not a list; no key taken", kind(other)),
            );
            return Vec::new();
        }
    };
    if items.len() > MAX_KEYS {
        ctx.warn(
            "public-keys",
            format!("has more than {MAX_KEYS} entries; only the first are used"),
        );
    }
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    for (i, item) in items.into_iter().take(MAX_KEYS).enumerate() {
        let field = format!("public-keys[{i}]");
        let Some(text) = scalar_string(item) else {
            ctx.warn(field, format!("is a {}, not a key; skipped", kind(item)));
            continue;
        };
        let mut found = false;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            found = true;
            match SshKey::parse(line) {
                Ok(key) => {
                    if seen.insert(key.clone()) {
                        keys.push(key);
                    }
                }
                Err(p) => ctx.warn(&field, format!("{} {p}; skipped", quote(line))),
            }
        }
        if !found {
            ctx.warn(field, "holds no key; skipped");
        }
    }
    keys
}

/// A scalar's text (`Value`s of YAML scalars are strings, numbers or booleans).
pub(crate) fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What kind of value this is, for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "mapping",
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
