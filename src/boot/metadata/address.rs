//! MAC addresses and IP prefixes as the metadata writes them, parsed without trusting the text.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::Serialize;

use super::text::quote;

/// A MAC address; displayed normalised (lower case, two hex digits per byte, colons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct MacAddr(pub(crate) [u8; 6]);

impl MacAddr {
    /// Hetzner's private-network NICs have MACs starting `86:`; public ones `96:`.
    #[cfg(test)]
    pub(crate) fn is_hetzner_private(&self) -> bool {
        self.0[0] == 0x86
    }

    /// Twelve hex digits without separators, for file names.
    pub(crate) fn compact(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// All zeros: what loopback and placeholders carry; it names no NIC.
    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0; 6]
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

const NOT_A_MAC: &str = "is not a MAC address (six bytes in hex, separated by colons)";

impl FromStr for MacAddr {
    type Err = &'static str;

    /// Accepts `96:00:03:aa:bb:cc`, `96-00-03-AA-BB-CC`, `96:0:3:aa:bb:cc` and `960003aabbcc`.
    /// Works on bytes after an ASCII check, so no input can split a character.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().as_bytes();
        if s.is_empty() || s.len() > 17 || !s.is_ascii() {
            return Err(NOT_A_MAC);
        }
        let parts: Vec<&[u8]> = if s.contains(&b':') {
            s.split(|c| *c == b':').collect()
        } else if s.contains(&b'-') {
            s.split(|c| *c == b'-').collect()
        } else if s.len() == 12 {
            s.chunks(2).collect()
        } else {
            return Err(NOT_A_MAC);
        };
        if parts.len() != 6 {
            return Err(NOT_A_MAC);
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.is_empty() || part.len() > 2 {
                return Err(NOT_A_MAC);
            }
            let mut value = 0u8;
            for c in part {
                let digit = (*c as char).to_digit(16).ok_or(NOT_A_MAC)?;
                value = value * 16 + digit as u8;
            }
            *byte = value;
        }
        Ok(MacAddr(bytes))
    }
}

/// An address with its prefix length, as networkd's `Address=` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpPrefix {
    pub(crate) addr: IpAddr,
    pub(crate) len: u8,
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
    pub(crate) fn parse(address: &str, netmask: Option<&str>) -> Result<Self, String> {
        let address = address.trim();
        let (addr_part, len_part) = match address.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (address, None),
        };
        let addr = IpAddr::from_str(addr_part).map_err(|_| {
            format!(
                "{} is not an IP address with a prefix length",
                quote(address)
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match (len_part, netmask.map(str::trim)) {
            (Some(l), _) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{} has an invalid prefix length", quote(address)))?,
            (None, Some(mask)) => netmask_len(mask, addr.is_ipv4()).ok_or_else(|| {
                format!(
                    "netmask {} is not valid for {}",
                    quote(mask),
                    quote(address)
                )
            })?,
            (None, None) => max,
        };
        Ok(IpPrefix { addr, len })
    }
}

/// The prefix length a netmask stands for (`255.255.255.0`, `ffff:ffff::`, `24` or `/24`).
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
