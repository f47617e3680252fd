//! Making 169.254.169.254 reachable before DHCP: a temporary link-local address via netlink.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{Handle, LinkUnspec};

use crate::boot::metadata::MacAddr;

/// The address we borrow, as cloud-init and the peers do.
pub(crate) const TEMPORARY_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
pub(crate) const TEMPORARY_PREFIX: u8 = 16;

/// What we need to know of a NIC to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) up: bool,
    pub(crate) has_ipv4: bool,
    /// Its hardware address, when it has an Ethernet one (not all zeros, as loopback's).
    pub(crate) mac: Option<MacAddr>,
}

/// Ethernet NICs as the kernel names them on servers (`eth0`, `ens3`, `enp1s0`).
pub(crate) fn is_ethernet_name(name: &str) -> bool {
    name.starts_with("en") || name.starts_with("eth")
}

/// The link to borrow an address on, or `None` when some NIC can already reach the service
/// (it has an IPv4 address) or when there is no ethernet NIC at all.
pub(crate) fn link_to_borrow(links: &[Link]) -> Option<&Link> {
    let ethernet: Vec<&Link> = links.iter().filter(|l| is_ethernet_name(&l.name)).collect();
    if ethernet.iter().any(|l| l.has_ipv4) {
        return None;
    }
    ethernet.into_iter().min_by_key(|l| l.index)
}

/// Is this URL's host a link-local IPv4 address (so that only a NIC on the link reaches it)?
pub(crate) fn url_needs_link(url: &str) -> bool {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().and_then(|h| h.parse::<Ipv4Addr>().ok()))
        .is_some_and(|ip| ip.is_link_local())
}

/// A netlink session.
pub(crate) struct Netlink {
    handle: Handle,
}

/// An address we added, and how to put the link back as it was.
#[derive(Debug)]
pub(crate) struct Borrowed {
    link: Link,
}

impl Borrowed {
    pub(crate) fn link_name(&self) -> &str {
        &self.link.name
    }
}

impl Netlink {
    pub(crate) fn connect() -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// All links with their state, and whether each has an IPv4 address.
    pub(crate) async fn links(&self) -> Result<Vec<Link>> {
        let mut links = Vec::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .context("cannot list network links")?
        {
            let name = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            let mac = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice())
                    .ok()
                    .map(MacAddr)
                    .filter(|m| !m.is_zero()),
                _ => None,
            });
            if let Some(name) = name {
                links.push(Link {
                    index: msg.header.index,
                    name,
                    up: msg.header.flags.contains(LinkFlags::Up),
                    has_ipv4: false,
                    mac,
                });
            }
        }
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.context("cannot list addresses")? {
            if msg.header.family == AddressFamily::Inet
                && let Some(link) = links.iter_mut().find(|l| l.index == msg.header.index)
            {
                link.has_ipv4 = true;
            }
        }
        Ok(links)
    }

    /// Brings `link` up and adds the temporary address to it.
    pub(crate) async fn borrow(&self, link: &Link) -> Result<Borrowed> {
        let borrowed = Borrowed { link: link.clone() };
        if !link.up {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(link.index).up().build())
                .execute()
                .await
                .with_context(|| format!("cannot bring {} up", link.name))?;
        }
        if let Err(e) = self
            .handle
            .address()
            .add(link.index, IpAddr::V4(TEMPORARY_ADDRESS), TEMPORARY_PREFIX)
            .execute()
            .await
        {
            self.restore_state(&borrowed).await;
            return Err(e).with_context(|| {
                format!(
                    "cannot add {TEMPORARY_ADDRESS}/{TEMPORARY_PREFIX} to {}",
                    link.name
                )
            });
        }
        Ok(borrowed)
    }

    /// Removes the temporary address and puts the link back in the state it was found in.
    pub(crate) async fn give_back(&self, borrowed: Borrowed) -> Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = TEMPORARY_PREFIX;
        msg.header.index = borrowed.link.index;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(TEMPORARY_ADDRESS)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(TEMPORARY_ADDRESS)));
        let removed = self.handle.address().del(msg).execute().await;
        self.restore_state(&borrowed).await;
        removed.with_context(|| {
            format!(
                "cannot remove the temporary address {TEMPORARY_ADDRESS} from {}",
                borrowed.link.name
            )
        })
    }

    async fn restore_state(&self, borrowed: &Borrowed) {
        if borrowed.link.up {
            return;
        }
        if let Err(e) = self
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(borrowed.link.index)
                    .down()
                    .build(),
            )
            .execute()
            .await
        {
            tracing::warn!(link = %borrowed.link.name, error = %e, "cannot set the link down again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, has_ipv4: bool) -> Link {
        Link {
            index,
            name: name.into(),
            up: false,
            has_ipv4,
            mac: None,
        }
    }

    #[test]
    fn borrows_the_first_ethernet_link_when_none_has_ipv4() {
        let links = [
            link(1, "lo", true),
            link(3, "enp7s0", false),
            link(2, "eth0", false),
        ];
        assert_eq!(link_to_borrow(&links).unwrap().name, "eth0");
    }

    #[test]
    fn borrows_nothing_when_an_ethernet_link_has_ipv4() {
        let links = [
            link(1, "lo", true),
            link(2, "eth0", false),
            link(3, "ens10", true),
        ];
        assert_eq!(link_to_borrow(&links), None);
    }

    #[test]
    fn loopback_and_other_links_do_not_count() {
        let links = [
            link(1, "lo", true),
            link(2, "docker0", true),
            link(3, "wg0", true),
        ];
        assert_eq!(link_to_borrow(&links), None);
        let links = [
            link(1, "lo", true),
            link(2, "docker0", true),
            link(4, "ens3", false),
        ];
        assert_eq!(link_to_borrow(&links).unwrap().name, "ens3");
    }

    #[test]
    fn only_link_local_urls_need_a_link() {
        assert!(url_needs_link("http://169.254.169.254/hetzner/v1/"));
        assert!(!url_needs_link("http://127.0.0.1:8080/hetzner/v1/"));
        assert!(!url_needs_link("http://metadata.example/hetzner/v1/"));
    }
}
