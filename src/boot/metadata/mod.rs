//! The Hetzner metadata service's documents, parsed into typed data (pure; the HTTP side is in `client`).
//!
//! Hetzner's `network-config` follows cloud-init's network configuration version 1, and has been
//! served in more than one layout over the years: with and without `type: static` on the IPv6
//! subnet, with the prefix in the address or in a separate `netmask`, with `type: nameserver`
//! entries, as a nested mapping or as a YAML string, wrapped in `network:` or not. All of them are
//! accepted here; anything that cannot be trusted (a bad address, MAC or version) is an error that
//! names the field, so that nothing is written from a document we do not understand.

pub mod client;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

/// A document from the metadata service that cannot be used, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{document}: {field}: {problem}")]
pub struct ParseError {
    /// Which document: `metadata` or `private-networks`.
    pub document: &'static str,
    /// A path such as `network-config.config[0].mac_address`, or `(document)`.
    pub field: String,
    /// What is wrong with the value, in a few words.
    pub problem: String,
}

/// A MAC address; displayed normalised (lower case, two hex digits per byte, colons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Hetzner's private-network NICs have MACs starting `86:`; public ones `96:`.
    pub fn is_hetzner_private(&self) -> bool {
        self.0[0] == 0x86
    }

    /// Twelve hex digits without separators, for file names.
    pub fn compact(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for MacAddr {
    type Err = &'static str;

    /// Accepts `96:00:03:aa:bb:cc`, `96-00-03-AA-BB-CC`, `96:0:3:aa:bb:cc` and `960003aabbcc`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parts: Vec<&str> = if s.contains(':') {
            s.split(':').collect()
        } else if s.contains('-') {
            s.split('-').collect()
        } else if s.len() == 12 {
            (0..6).map(|i| &s[2 * i..2 * i + 2]).collect()
        } else {
            return Err("is not a MAC address (six bytes in hex, separated by colons)");
        };
        if parts.len() != 6 {
            return Err("is not a MAC address (six bytes in hex, separated by colons)");
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err("is not a MAC address (six bytes in hex, separated by colons)");
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| "is not a MAC address")?;
        }
        Ok(MacAddr(bytes))
    }
}

/// An address with its prefix length, as networkd's `Address=` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl IpPrefix {
    /// Parses `addr/len`, or `addr` with a separate netmask (`255.255.255.0` or `64`). Without
    /// either, a single host (`/32` or `/128`).
    pub fn parse(address: &str, netmask: Option<&str>) -> Result<Self, String> {
        let address = address.trim();
        let (addr_part, len_part) = match address.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (address, None),
        };
        let addr = IpAddr::from_str(addr_part)
            .map_err(|_| format!("'{address}' is not an IP address with a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match (len_part, netmask.map(str::trim)) {
            (Some(l), _) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("'{address}' has an invalid prefix length"))?,
            (None, Some(mask)) => netmask_len(mask, addr.is_ipv4())
                .ok_or_else(|| format!("netmask '{mask}' is not valid for '{address}'"))?,
            (None, None) => max,
        };
        Ok(IpPrefix { addr, len })
    }
}

fn netmask_len(mask: &str, v4: bool) -> Option<u8> {
    let max = if v4 { 32 } else { 128 };
    if let Ok(len) = mask.trim_start_matches('/').parse::<u8>() {
        return (len <= max).then_some(len);
    }
    let bits: u128 = match IpAddr::from_str(mask).ok()? {
        IpAddr::V4(m) if v4 => u128::from(u32::from(m)) << 96,
        IpAddr::V6(m) if !v4 => u128::from(m),
        _ => return None,
    };
    let len = bits.leading_ones();
    // A netmask is a run of ones followed only by zeros.
    (bits.checked_shl(len).unwrap_or(0) == 0).then_some(len as u8)
}

/// A public NIC from `network-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublicInterface {
    pub mac: MacAddr,
    /// The name the metadata gives (`eth0`); informational only, the OS names NICs differently.
    pub name: Option<String>,
    pub dhcp4: bool,
    pub dhcp6: bool,
    /// Static addresses (usually the one IPv6 /64).
    pub addresses: Vec<IpPrefix>,
    /// Default gateways (usually `fe80::1`).
    pub gateways: Vec<IpAddr>,
    pub dns: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub mtu: Option<u32>,
}

/// The server's public networking, from `network-config`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NetworkConfig {
    pub interfaces: Vec<PublicInterface>,
}

/// A private network NIC, from `metadata/private-networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrivateNetwork {
    pub mac: MacAddr,
    pub ip: Option<Ipv4Addr>,
    pub alias_ips: Vec<Ipv4Addr>,
    pub network_id: Option<u64>,
    pub network_name: Option<String>,
    pub interface_num: Option<u64>,
    pub network: Option<String>,
    pub subnet: Option<String>,
    pub gateway: Option<Ipv4Addr>,
}

/// The `metadata` document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Metadata {
    pub hostname: Option<String>,
    pub instance_id: Option<u64>,
    pub region: Option<String>,
    pub availability_zone: Option<String>,
    pub public_ipv4: Option<Ipv4Addr>,
    /// OpenSSH public keys that look valid; see `rejected_keys` for the others.
    pub public_keys: Vec<String>,
    /// Entries of `public-keys` that were not a single-line OpenSSH public key, by index.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected_keys: Vec<usize>,
    /// `None` when the document has no `network-config` at all.
    pub network: Option<NetworkConfig>,
}

struct Ctx {
    document: &'static str,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> ParseError {
        ParseError {
            document: self.document,
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn yaml(&self, text: &str) -> Result<Value, ParseError> {
        let value: Value = serde_saphyr::from_str(text).map_err(|e| {
            let detail = e.to_string();
            let first = detail.lines().next().unwrap_or("").trim();
            self.err("(document)", format!("not valid YAML: {first}"))
        })?;
        Ok(value)
    }
}

/// Parses the `metadata` document.
pub fn parse_metadata(text: &str) -> Result<Metadata, ParseError> {
    let ctx = Ctx {
        document: "metadata",
    };
    let doc = ctx.yaml(text)?;
    let map = match &doc {
        Value::Object(map) => map,
        Value::Null => return Err(ctx.err("(document)", "is empty")),
        other => {
            return Err(ctx.err("(document)", format!("is a {}, not a mapping", kind(other))));
        }
    };
    let get = |key: &str| map.get(key).filter(|v| !v.is_null());

    let hostname = match get("hostname") {
        None => None,
        Some(v) => {
            let h = scalar_string(v).ok_or_else(|| ctx.err("hostname", "is not a string"))?;
            let h = h.trim().to_string();
            if h.is_empty() {
                None
            } else {
                validate_hostname(&h).map_err(|p| ctx.err("hostname", format!("'{h}' {p}")))?;
                Some(h)
            }
        }
    };
    let instance_id = match get("instance-id") {
        None => None,
        Some(v) => Some(
            scalar_string(v)
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ctx.err("instance-id", "is not a number"))?,
        ),
    };
    let text_field = |key: &str| get(key).and_then(scalar_string).filter(|s| !s.is_empty());
    let public_ipv4 = match text_field("public-ipv4") {
        None => None,
        // Placeholders and empty strings mean "none"; an IPv6-only server has no IPv4.
        Some(s) => Ipv4Addr::from_str(s.trim()).ok(),
    };
    let (public_keys, rejected_keys) = parse_public_keys(&ctx, get("public-keys"))?;
    let network = match get("network-config") {
        None => None,
        Some(v) => Some(parse_network_config(&ctx, v, "network-config")?),
    };
    Ok(Metadata {
        hostname,
        instance_id,
        region: text_field("region"),
        availability_zone: text_field("availability-zone"),
        public_ipv4,
        public_keys,
        rejected_keys,
        network,
    })
}

/// Parses a `network-config` document on its own (as served at `metadata/network-config`).
pub fn parse_network_config_document(text: &str) -> Result<NetworkConfig, ParseError> {
    let ctx = Ctx {
        document: "network-config",
    };
    let doc = ctx.yaml(text)?;
    parse_network_config(&ctx, &doc, "(document)")
}

/// Parses the `metadata/private-networks` document.
pub fn parse_private_networks(text: &str) -> Result<Vec<PrivateNetwork>, ParseError> {
    let ctx = Ctx {
        document: "private-networks",
    };
    let doc = ctx.yaml(text)?;
    let items = match &doc {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => {
            return Err(ctx.err("(document)", format!("is a {}, not a list", kind(other))));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |k: &str| format!("[{i}].{k}");
            let map = item
                .as_object()
                .ok_or_else(|| ctx.err(format!("[{i}]"), "is not a mapping"))?;
            let get = |key: &str| map.get(key).filter(|v| !v.is_null());
            let mac_text = get("mac_address")
                .and_then(scalar_string)
                .ok_or_else(|| ctx.err(at("mac_address"), "is missing"))?;
            let mac = MacAddr::from_str(&mac_text)
                .map_err(|p| ctx.err(at("mac_address"), format!("'{mac_text}' {p}")))?;
            let ipv4 = |key: &str| -> Result<Option<Ipv4Addr>, ParseError> {
                match get(key).and_then(scalar_string).filter(|s| !s.is_empty()) {
                    None => Ok(None),
                    Some(s) => Ipv4Addr::from_str(s.trim())
                        .map(Some)
                        .map_err(|_| ctx.err(at(key), format!("'{s}' is not an IPv4 address"))),
                }
            };
            let alias_ips = match get("alias_ips") {
                None => Vec::new(),
                Some(Value::Array(list)) => list
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        let s = scalar_string(v).unwrap_or_default();
                        Ipv4Addr::from_str(s.trim()).map_err(|_| {
                            ctx.err(
                                format!("[{i}].alias_ips[{j}]"),
                                format!("'{s}' is not an IPv4 address"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(ctx.err(at("alias_ips"), "is not a list")),
            };
            let number = |key: &str| {
                get(key)
                    .and_then(scalar_string)
                    .and_then(|s| s.parse().ok())
            };
            let text = |key: &str| get(key).and_then(scalar_string);
            Ok(PrivateNetwork {
                mac,
                ip: ipv4("ip")?,
                alias_ips,
                network_id: number("network_id"),
                network_name: text("network_name"),
                interface_num: number("interface_num"),
                network: text("network"),
                subnet: text("subnet"),
                gateway: ipv4("gateway")?,
            })
        })
        .collect()
}

fn parse_network_config(ctx: &Ctx, value: &Value, path: &str) -> Result<NetworkConfig, ParseError> {
    let field = |sub: &str| {
        if path == "(document)" {
            sub.to_string()
        } else {
            format!("{path}.{sub}")
        }
    };
    // Some layouts carry the network configuration as a YAML string inside the document.
    let nested;
    let value = match value {
        Value::String(text) => {
            nested = ctx
                .yaml(text)
                .map_err(|e| ctx.err(path, format!("embedded document: {}", e.problem)))?;
            &nested
        }
        v => v,
    };
    // cloud-init's own files wrap it in `network:`.
    let value = match value.as_object().and_then(|m| m.get("network")) {
        Some(inner) if inner.is_object() => inner,
        _ => value,
    };
    let (version, entries) = match value {
        Value::Object(map) => (map.get("version"), map.get("config")),
        // A bare list of entries, without the version wrapper.
        Value::Array(_) => (None, Some(value)),
        Value::Null => (None, None),
        other => {
            return Err(ctx.err(path, format!("is a {}, not a mapping", kind(other))));
        }
    };
    if let Some(v) = version.filter(|v| !v.is_null()) {
        let text = scalar_string(v).unwrap_or_default();
        if text.trim() != "1" {
            return Err(ctx.err(
                field("version"),
                format!(
                    "version '{}' is not supported (only cloud-init network config version 1)",
                    display_value(v)
                ),
            ));
        }
    }
    let entries = match entries.filter(|v| !v.is_null()) {
        None => return Ok(NetworkConfig::default()),
        Some(Value::Array(entries)) => entries,
        Some(other) => {
            return Err(ctx.err(field("config"), format!("is a {}, not a list", kind(other))));
        }
    };

    let mut interfaces = Vec::new();
    let mut global_dns = Vec::new();
    let mut global_search = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = |k: &str| field(&format!("config[{i}].{k}"));
        let map = entry
            .as_object()
            .ok_or_else(|| ctx.err(field(&format!("config[{i}]")), "is not a mapping"))?;
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());
        let kind_text = get("type").and_then(scalar_string).unwrap_or_default();
        match kind_text.as_str() {
            "nameserver" => {
                global_dns.extend(ip_list(ctx, get("address"), &at("address"))?);
                global_search.extend(string_list(get("search")));
            }
            // Older documents leave out `type` on the physical entry; a MAC says what it is.
            "physical" | "" if get("mac_address").is_some() || kind_text == "physical" => {
                interfaces.push(parse_interface(ctx, map, &at)?);
            }
            // Bonds, VLANs, routes: not something Hetzner sends; cloud-init's business.
            _ => {}
        }
    }
    for iface in &mut interfaces {
        for dns in &global_dns {
            if !iface.dns.contains(dns) {
                iface.dns.push(*dns);
            }
        }
        for s in &global_search {
            if !iface.dns_search.contains(s) {
                iface.dns_search.push(s.clone());
            }
        }
    }
    Ok(NetworkConfig { interfaces })
}

fn parse_interface(
    ctx: &Ctx,
    map: &serde_json::Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<PublicInterface, ParseError> {
    let get = |key: &str| map.get(key).filter(|v| !v.is_null());
    let mac_text = get("mac_address")
        .and_then(scalar_string)
        .ok_or_else(|| ctx.err(at("mac_address"), "is missing (NICs are matched by MAC)"))?;
    let mac = MacAddr::from_str(&mac_text)
        .map_err(|p| ctx.err(at("mac_address"), format!("'{mac_text}' {p}")))?;
    let mtu = match get("mtu") {
        None => None,
        Some(v) => Some(
            scalar_string(v)
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| {
                    ctx.err(at("mtu"), format!("'{}' is not an MTU", display_value(v)))
                })?,
        ),
    };
    let mut iface = PublicInterface {
        mac,
        name: get("name").and_then(scalar_string),
        dhcp4: false,
        dhcp6: false,
        addresses: Vec::new(),
        gateways: Vec::new(),
        dns: Vec::new(),
        dns_search: Vec::new(),
        mtu,
    };
    let subnets = match get("subnets") {
        None => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ctx.err(at("subnets"), "is not a list")),
    };
    for (j, subnet) in subnets.iter().enumerate() {
        let sat = |k: &str| at(&format!("subnets[{j}].{k}"));
        let s = subnet
            .as_object()
            .ok_or_else(|| ctx.err(at(&format!("subnets[{j}]")), "is not a mapping"))?;
        let sget = |key: &str| s.get(key).filter(|v| !v.is_null());
        let flag = |key: &str| {
            sget(key).is_some_and(|v| {
                v.as_bool() == Some(true) || scalar_string(v).as_deref() == Some("true")
            })
        };
        let subnet_type = sget("type").and_then(scalar_string).unwrap_or_default();
        iface.dns.extend(ip_list(
            ctx,
            sget("dns_nameservers"),
            &sat("dns_nameservers"),
        )?);
        iface.dns_search.extend(string_list(sget("dns_search")));
        match subnet_type.as_str() {
            "dhcp" | "dhcp4" if !flag("ipv6") || flag("ipv4") => iface.dhcp4 = true,
            "dhcp" | "dhcp6" | "ipv6_dhcpv6-stateful" | "ipv6_dhcpv6-stateless" => {
                iface.dhcp6 = true
            }
            // `type: static` is missing on the IPv6 subnet of some documents.
            "static" | "static6" | "" => {
                static_subnet(ctx, s, &subnet_type, &sat, &mut iface)?;
            }
            _ => {}
        }
    }
    Ok(iface)
}

/// A static subnet: its address (prefix in the address or in `netmask`) and gateway (Hetzner's
/// IPv6 gateway is always the link-local fe80::1). A subnet without `type` and without an address
/// claims nothing and is skipped.
fn static_subnet(
    ctx: &Ctx,
    subnet: &serde_json::Map<String, Value>,
    subnet_type: &str,
    sat: &dyn Fn(&str) -> String,
    iface: &mut PublicInterface,
) -> Result<(), ParseError> {
    let sget = |key: &str| subnet.get(key).filter(|v| !v.is_null());
    let Some(address) = sget("address").and_then(scalar_string) else {
        if subnet_type.is_empty() {
            return Ok(());
        }
        return Err(ctx.err(sat("address"), "is missing on a static subnet"));
    };
    let netmask = sget("netmask").and_then(scalar_string);
    let prefix =
        IpPrefix::parse(&address, netmask.as_deref()).map_err(|p| ctx.err(sat("address"), p))?;
    if subnet_type == "static6" && !prefix.addr.is_ipv6() {
        return Err(ctx.err(
            sat("address"),
            format!("'{address}' is not an IPv6 address"),
        ));
    }
    iface.addresses.push(prefix);
    let gateway = match sget("gateway").and_then(scalar_string) {
        Some(gw) => {
            let gw_addr = IpAddr::from_str(gw.trim())
                .map_err(|_| ctx.err(sat("gateway"), format!("'{gw}' is not an IP address")))?;
            if gw_addr.is_ipv6() != prefix.addr.is_ipv6() {
                return Err(ctx.err(
                    sat("gateway"),
                    format!("'{gw}' is not of the address family of '{address}'"),
                ));
            }
            Some(gw_addr)
        }
        None if prefix.addr.is_ipv6() => {
            Some(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)))
        }
        None => None,
    };
    if let Some(gw) = gateway
        && !iface.gateways.contains(&gw)
    {
        iface.gateways.push(gw);
    }
    Ok(())
}

fn parse_public_keys(
    ctx: &Ctx,
    value: Option<&Value>,
) -> Result<(Vec<String>, Vec<usize>), ParseError> {
    let items: Vec<Value> = match value {
        None => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(items)) => items.clone(),
        Some(Value::String(s)) => vec![Value::String(s.clone())],
        // The EC2 layout: {name: {openssh-key: "..."}} or {name: "..."}.
        Some(Value::Object(map)) => map
            .values()
            .map(|v| match v {
                Value::Object(inner) => inner.get("openssh-key").cloned().unwrap_or(Value::Null),
                other => other.clone(),
            })
            .collect(),
        Some(other) => {
            return Err(ctx.err("public-keys", format!("is a {}, not a list", kind(other))));
        }
    };
    let mut keys = Vec::new();
    let mut rejected = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match scalar_string(item).and_then(|k| normalise_public_key(&k)) {
            Some(key) if !keys.contains(&key) => keys.push(key),
            Some(_) => {}
            None => rejected.push(i),
        }
    }
    Ok((keys, rejected))
}

/// A single-line OpenSSH public key (`type base64 [comment]`), with white space folded, or
/// `None` when the text is not one. Options (`command=...`) are not accepted from metadata.
pub fn normalise_public_key(text: &str) -> Option<String> {
    if text.contains(['\n', '\r', '\0']) {
        return None;
    }
    let mut words = text.split_whitespace();
    let key_type = words.next()?;
    let blob = words.next()?;
    let known = key_type.starts_with("ssh-")
        || key_type.starts_with("ecdsa-sha2-")
        || key_type.starts_with("sk-ssh-")
        || key_type.starts_with("sk-ecdsa-sha2-");
    let type_ok = key_type
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"-@._".contains(&c));
    let blob_ok = blob.len() >= 16
        && blob
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=');
    if !(known && type_ok && blob_ok) {
        return None;
    }
    let comment: Vec<&str> = words.collect();
    let mut key = format!("{key_type} {blob}");
    if !comment.is_empty() {
        key.push(' ');
        key.push_str(&comment.join(" "));
    }
    Some(key)
}

/// Checks a hostname as the kernel and hostnamed take it: at most 64 characters, labels of
/// letters, digits and hyphens, separated by dots.
pub fn validate_hostname(name: &str) -> Result<(), &'static str> {
    if name.len() > 64 {
        return Err("is longer than 64 characters");
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
    });
    if ok {
        Ok(())
    } else {
        Err("is not a valid hostname (letters, digits, hyphens and dots)")
    }
}

fn ip_list(ctx: &Ctx, value: Option<&Value>, field: &str) -> Result<Vec<IpAddr>, ParseError> {
    string_list(value)
        .into_iter()
        .map(|s| {
            IpAddr::from_str(s.trim())
                .map_err(|_| ctx.err(field, format!("'{s}' is not an IP address")))
        })
        .collect()
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().filter_map(scalar_string).collect(),
        Some(v) => scalar_string(v)
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn display_value(v: &Value) -> String {
    scalar_string(v).unwrap_or_else(|| kind(v).to_string())
}

fn kind(v: &Value) -> &'static str {
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
mod tests;
