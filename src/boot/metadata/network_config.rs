//! `network-config` into the public NICs to configure; a bad entry costs its own NIC only.
//!
//! It is cloud-init's network configuration version 1, as Hetzner serves it.

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use serde::Serialize;
use serde_json::{Map, Value};

use super::text::{DomainName, IfName, quote};
use super::{Ctx, IpPrefix, MacAddr, Problem, kind, scalar_string};

/// Public NICs taken from one document (Hetzner gives a server one).
const MAX_NICS: usize = 16;
/// Subnets of one NIC, its aliases' included.
const MAX_SUBNETS: usize = 16;
/// DNS servers of one NIC, and in `nameserver` entries together.
const MAX_DNS: usize = 8;
/// Search domains of one NIC, and in `nameserver` entries together.
const MAX_SEARCH: usize = 16;

/// A public NIC from `network-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PublicInterface {
    pub(crate) mac: MacAddr,
    /// The name the metadata gives (`eth0`); informational only, the OS names NICs differently.
    pub(crate) name: Option<IfName>,
    pub(crate) dhcp4: bool,
    pub(crate) dhcp6: bool,
    /// Static addresses (usually the one IPv6 /64).
    pub(crate) addresses: Vec<IpPrefix>,
    /// Default gateways (usually `fe80::1`).
    pub(crate) gateways: Vec<IpAddr>,
    pub(crate) dns: Vec<IpAddr>,
    pub(crate) dns_search: Vec<DomainName>,
    pub(crate) mtu: Option<u32>,
}

/// The server's public networking, from `network-config`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub(crate) struct NetworkConfig {
    pub(crate) interfaces: Vec<PublicInterface>,
}

/// `network-config` inside the metadata: `None`, with a problem, when it cannot be used at all
/// (another version, not a mapping); the network files are then left as they are.
pub(super) fn parse_in_metadata(ctx: &Ctx, value: &Value, path: &str) -> Option<NetworkConfig> {
    match parse(ctx, value, path) {
        Ok(network) => Some(network),
        Err(p) => {
            ctx.warn(
                p.field,
                format!("{}; network files are left as they are", p.problem),
            );
            None
        }
    }
}

/// An entry of `config` that is a NIC's own (with a MAC) or an alias of one (`eth0:0`).
struct Entry<'a> {
    index: usize,
    map: &'a Map<String, Value>,
}

/// The whole `network-config`; an error only when it cannot be used at all.
pub(super) fn parse(ctx: &Ctx, value: &Value, path: &str) -> Result<NetworkConfig, Problem> {
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
        let text = scalar_string(v).unwrap_or_else(|| kind(v).to_string());
        if text.trim() != "1" {
            return Err(ctx.err(
                field("version"),
                format!(
                    "version {} is not supported (only cloud-init network config version 1)",
                    quote(&text)
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
    Ok(parse_entries(ctx, entries, &field))
}

/// The NICs of `config`, with their aliases' subnets and the `nameserver` entries' servers.
fn parse_entries(ctx: &Ctx, entries: &[Value], field: &dyn Fn(&str) -> String) -> NetworkConfig {
    let mut nics: Vec<Entry> = Vec::new();
    let mut aliases: Vec<(Entry, IfName)> = Vec::new();
    let mut dns = Vec::new();
    let mut search = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let at = |k: &str| field(&format!("config[{index}].{k}"));
        let Some(map) = entry.as_object() else {
            ctx.warn(
                field(&format!("config[{index}]")),
                "is not a mapping; skipped",
            );
            continue;
        };
        let get = |key: &str| map.get(key).filter(|v| !v.is_null());
        let entry_type = get("type").and_then(scalar_string).unwrap_or_default();
        let has_mac = get("mac_address").is_some();
        match entry_type.as_str() {
            "nameserver" => nameserver(ctx, map, &at, &mut dns, &mut search),
            // Older documents leave out `type` on the physical entry; a MAC says what it is.
            "physical" | "" if has_mac => nics.push(Entry { index, map }),
            // The older layout: IPv6 on an alias entry without a MAC of its own.
            "physical" => match get("name").and_then(scalar_string).map(|n| IfName::parse(&n)) {
                Some(Ok(name)) if name.alias_of().is_some() => {
                    aliases.push((Entry { index, map }, name));
                }
                _ => ctx.warn(
                    at("mac_address"),
                    "is missing (NICs are matched by MAC, and this is no alias such as eth0:0); entry skipped",
                ),
            },
            // Bonds, VLANs, routes: not something Hetzner sends; cloud-init's business.
            _ => {}
        }
    }
    if nics.len() > MAX_NICS {
        ctx.warn(
            field("config"),
            format!("lists more than {MAX_NICS} NICs; only the first are used"),
        );
    }
    let mut interfaces: Vec<PublicInterface> = Vec::new();
    let mut claimed = vec![false; aliases.len()];
    for nic in nics.iter().take(MAX_NICS) {
        let at = |k: &str| field(&format!("config[{}].{k}", nic.index));
        match interface(ctx, nic, &aliases, &mut claimed, field) {
            Ok(iface) if interfaces.iter().any(|i| i.mac == iface.mac) => ctx.warn(
                at("mac_address"),
                format!("{} is another entry's MAC too; skipped", iface.mac),
            ),
            Ok(iface) => interfaces.push(iface),
            Err(p) => ctx.warn(p.field, format!("{}; this NIC is skipped", p.problem)),
        }
    }
    for ((alias, name), claimed) in aliases.iter().zip(claimed) {
        if !claimed {
            ctx.warn(
                field(&format!("config[{}].name", alias.index)),
                format!(
                    "{} is an alias of no NIC named {}; skipped",
                    quote(name.as_str()),
                    quote(name.alias_of().unwrap_or_default())
                ),
            );
        }
    }
    for iface in &mut interfaces {
        for server in &dns {
            if !iface.dns.contains(server) && iface.dns.len() < MAX_DNS {
                iface.dns.push(*server);
            }
        }
        for domain in &search {
            if !iface.dns_search.contains(domain) && iface.dns_search.len() < MAX_SEARCH {
                iface.dns_search.push(domain.clone());
            }
        }
    }
    NetworkConfig { interfaces }
}

/// A `type: nameserver` entry: its servers and search domains apply to every NIC. A bad value
/// costs the entry.
fn nameserver(
    ctx: &Ctx,
    map: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
    dns: &mut Vec<IpAddr>,
    search: &mut Vec<DomainName>,
) {
    let get = |key: &str| map.get(key).filter(|v| !v.is_null());
    let servers = match ip_list(ctx, get("address"), &at("address")) {
        Ok(servers) => servers,
        Err(p) => return ctx.warn(p.field, format!("{}; entry skipped", p.problem)),
    };
    let domains = match domain_list(ctx, get("search"), &at("search")) {
        Ok(domains) => domains,
        Err(p) => return ctx.warn(p.field, format!("{}; entry skipped", p.problem)),
    };
    for server in servers {
        if !dns.contains(&server) && dns.len() < MAX_DNS {
            dns.push(server);
        }
    }
    for domain in domains {
        if !search.contains(&domain) && search.len() < MAX_SEARCH {
            search.push(domain);
        }
    }
}

/// One NIC from its own entry and the entries of its aliases (`eth0:0` for `eth0`).
fn interface(
    ctx: &Ctx,
    nic: &Entry,
    aliases: &[(Entry, IfName)],
    claimed: &mut [bool],
    field: &dyn Fn(&str) -> String,
) -> Result<PublicInterface, Problem> {
    let at = |k: &str| field(&format!("config[{}].{k}", nic.index));
    let get = |key: &str| nic.map.get(key).filter(|v| !v.is_null());
    let mac_text = get("mac_address")
        .and_then(scalar_string)
        .ok_or_else(|| ctx.err(at("mac_address"), "is not text"))?;
    let mac = MacAddr::from_str(&mac_text)
        .map_err(|p| ctx.err(at("mac_address"), format!("{} {p}", quote(&mac_text))))?;
    let mtu = match get("mtu") {
        None => None,
        Some(v) => Some(
            scalar_string(v)
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| {
                    let text = scalar_string(v).unwrap_or_else(|| kind(v).to_string());
                    ctx.err(at("mtu"), format!("{} is not an MTU", quote(&text)))
                })?,
        ),
    };
    let name = ctx.checked(get("name"), &at("name"), IfName::parse);
    let mut iface = PublicInterface {
        mac,
        name,
        dhcp4: false,
        dhcp6: false,
        addresses: Vec::new(),
        gateways: Vec::new(),
        dns: Vec::new(),
        dns_search: Vec::new(),
        mtu,
    };
    let mut sources = vec![(nic.index, get("subnets"))];
    if let Some(name) = &iface.name {
        for ((alias, alias_name), claimed) in aliases.iter().zip(claimed.iter_mut()) {
            if alias_name.alias_of() == Some(name.as_str()) {
                *claimed = true;
                sources.push((alias.index, alias.map.get("subnets")));
            }
        }
    }
    let mut count = 0;
    for (index, subnets) in sources {
        let at = |k: &str| field(&format!("config[{index}].{k}"));
        let list = match subnets.filter(|v| !v.is_null()) {
            None => continue,
            Some(Value::Array(list)) => list,
            Some(other) => {
                return Err(ctx.err(at("subnets"), format!("is a {}, not a list", kind(other))));
            }
        };
        for (j, subnet) in list.iter().enumerate() {
            count += 1;
            if count > MAX_SUBNETS {
                return Err(ctx.err(
                    at("subnets"),
                    format!("more than {MAX_SUBNETS} subnets for one NIC"),
                ));
            }
            let sat = |k: &str| at(&format!("subnets[{j}].{k}"));
            let s = subnet
                .as_object()
                .ok_or_else(|| ctx.err(at(&format!("subnets[{j}]")), "is not a mapping"))?;
            subnet_into(ctx, s, &sat, &mut iface)?;
        }
    }
    Ok(iface)
}

/// One subnet: DHCP flags, or a static address and gateway, and its DNS servers and domains.
fn subnet_into(
    ctx: &Ctx,
    s: &Map<String, Value>,
    sat: &dyn Fn(&str) -> String,
    iface: &mut PublicInterface,
) -> Result<(), Problem> {
    let sget = |key: &str| s.get(key).filter(|v| !v.is_null());
    let flag = |key: &str| {
        sget(key).is_some_and(|v| {
            v.as_bool() == Some(true) || scalar_string(v).as_deref() == Some("true")
        })
    };
    let subnet_type = sget("type").and_then(scalar_string).unwrap_or_default();
    for server in ip_list(ctx, sget("dns_nameservers"), &sat("dns_nameservers"))? {
        if !iface.dns.contains(&server) {
            if iface.dns.len() == MAX_DNS {
                return Err(ctx.err(
                    sat("dns_nameservers"),
                    format!("more than {MAX_DNS} DNS servers"),
                ));
            }
            iface.dns.push(server);
        }
    }
    for domain in domain_list(ctx, sget("dns_search"), &sat("dns_search"))? {
        if !iface.dns_search.contains(&domain) {
            if iface.dns_search.len() == MAX_SEARCH {
                return Err(ctx.err(
                    sat("dns_search"),
                    format!("more than {MAX_SEARCH} search domains"),
                ));
            }
            iface.dns_search.push(domain);
        }
    }
    match subnet_type.as_str() {
        "dhcp" | "dhcp4" if !flag("ipv6") || flag("ipv4") => iface.dhcp4 = true,
        "dhcp" | "dhcp6" | "ipv6_dhcpv6-stateful" | "ipv6_dhcpv6-stateless" => iface.dhcp6 = true,
        // `type: static` is missing on the IPv6 subnet of some documents.
        "static" | "static6" | "" => static_subnet(ctx, s, &subnet_type, sat, iface)?,
        _ => {}
    }
    Ok(())
}

/// A static subnet: its address (prefix in the address or in `netmask`) and gateway (Hetzner's
/// IPv6 gateway is always the link-local fe80::1). A subnet without `type` and without an address
/// claims nothing and is skipped.
fn static_subnet(
    ctx: &Ctx,
    subnet: &Map<String, Value>,
    subnet_type: &str,
    sat: &dyn Fn(&str) -> String,
    iface: &mut PublicInterface,
) -> Result<(), Problem> {
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
            format!("{} is not an IPv6 address", quote(&address)),
        ));
    }
    if !iface.addresses.contains(&prefix) {
        iface.addresses.push(prefix);
    }
    let gateway = match sget("gateway").and_then(scalar_string) {
        Some(gw) => {
            let gw_addr = gateway_address(gw.trim()).ok_or_else(|| {
                ctx.err(
                    sat("gateway"),
                    format!("{} is not an IP address", quote(&gw)),
                )
            })?;
            if gw_addr.is_ipv6() != prefix.addr.is_ipv6() {
                return Err(ctx.err(
                    sat("gateway"),
                    format!(
                        "{} is not of the address family of {}",
                        quote(&gw),
                        quote(&address)
                    ),
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

/// A gateway's address; a link-local IPv6 one may carry its link (`fe80::1%eth0`, as in the
/// older layout's routes): the file for the NIC says `GatewayOnLink=yes` anyway.
fn gateway_address(text: &str) -> Option<IpAddr> {
    match text.split_once('%') {
        None => IpAddr::from_str(text).ok(),
        Some((addr, link)) => {
            IfName::parse(link).ok()?;
            Ipv6Addr::from_str(addr)
                .ok()
                .filter(Ipv6Addr::is_unicast_link_local)
                .map(IpAddr::V6)
        }
    }
}

/// The texts of a list (or of one whitespace-separated string); an item that is no scalar is a
/// problem. At most 64 items are looked at: every list here is bounded below that.
fn text_list(ctx: &Ctx, value: Option<&Value>, field: &str) -> Result<Vec<String>, Problem> {
    const MAX_ITEMS: usize = 64;
    let items: Vec<String> = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MAX_ITEMS {
                return Err(ctx.err(field, format!("has more than {MAX_ITEMS} entries")));
            }
            items
                .iter()
                .map(|v| {
                    scalar_string(v).ok_or_else(|| {
                        ctx.err(field, format!("has a {} among its entries", kind(v)))
                    })
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => {
            let text = scalar_string(v)
                .ok_or_else(|| ctx.err(field, format!("is a {}, not a list", kind(v))))?;
            let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
            if words.len() > MAX_ITEMS {
                return Err(ctx.err(field, format!("has more than {MAX_ITEMS} entries")));
            }
            words
        }
    };
    Ok(items)
}

fn ip_list(ctx: &Ctx, value: Option<&Value>, field: &str) -> Result<Vec<IpAddr>, Problem> {
    text_list(ctx, value, field)?
        .into_iter()
        .map(|s| {
            IpAddr::from_str(s.trim())
                .map_err(|_| ctx.err(field, format!("{} is not an IP address", quote(&s))))
        })
        .collect()
}

fn domain_list(ctx: &Ctx, value: Option<&Value>, field: &str) -> Result<Vec<DomainName>, Problem> {
    text_list(ctx, value, field)?
        .into_iter()
        .map(|s| {
            DomainName::parse(s.trim()).map_err(|p| ctx.err(field, format!("{} {p}", quote(&s))))
        })
        .collect()
}
