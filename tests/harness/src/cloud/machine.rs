//! One server of a local cloud: a container booted with systemd as PID 1 in a network namespace
//! of its own. Its eth0 leads to a namespace of stand-ins (the metadata service at
//! 169.254.169.254 serving this server's documents, the cloud's FlakeHub at 169.254.169.253:8080);
//! its eth1 is its public IPv4 address, on a veth pair whose other end is this machine's
//! (a /30 in 198.18.0.0/15). Dropping it kills the container by PID, stops the
//! stand-ins and deletes the namespaces (and with them both veth pairs).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::container::{Container, ContainerNet, More, NspawnSettings, Spec};
use crate::flakehub::FlakeHub;
use crate::hcloud_api::Boot;
use crate::http::Server;
use crate::metadata::{Documents, MetadataServer};
use crate::netns;

use super::image::{HUB_ADDR, Image, LINK_ADDR, MAC, SERVER_DIR, SSHD_UNIT};

/// A booted server. Fields drop in order: the container first.
pub struct Machine {
    pub container: Container,
    _hub: Server,
    _metadata: MetadataServer,
    _settings: NspawnSettings,
    _net: ContainerNet,
    pub id: u64,
    pub name: String,
    pub ipv4: String,
    /// The /64 Hetzner reports (the server's address is `::1` in it).
    pub ipv6_net: String,
    pub dir: PathBuf,
    /// From the boot request to `is-system-running` saying running (or degraded).
    pub boot_time: Duration,
}

/// A public address pair for the next machine: `(this machine's end, the server's)`, both /30,
/// in 198.18.0.0/15 (RFC 2544's benchmarking range: not a network a CI machine lives in).
fn next_public() -> (String, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    // Third octet from the process ID, so that two clouds' processes seldom meet; 63 servers per
    // /24 (a /30 each), then the other half of the range.
    let (b, c) = (18 + (n / 63) % 2, std::process::id() % 256);
    let d = (n % 63) * 4 + 4;
    (
        format!("198.{b}.{c}.{}", d + 1),
        format!("198.{b}.{c}.{}", d + 2),
    )
}

/// The metadata document: the recorded full example with this server's name, ID, address, keys.
fn metadata(boot: &Boot, ipv4: &str, ipv6_net: &str) -> String {
    let text = std::fs::read_to_string(crate::fixture(
        "hetzner-metadata/metadata.full-example.yaml",
    ))
    .expect("the metadata fixture");
    let ipv6 = format!("{}1/64", ipv6_net.trim_end_matches("/64"));
    let keys = if boot.ssh_keys.is_empty() {
        "public-keys: []\n".to_string()
    } else {
        let mut k = String::from("public-keys:\n");
        for key in &boot.ssh_keys {
            k.push_str(&format!("- {}\n", key.trim()));
        }
        k
    };
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.starts_with("hostname:") {
            out.push_str(&format!("hostname: {}\n", boot.name));
        } else if line.starts_with("instance-id:") {
            out.push_str(&format!("instance-id: {}\n", boot.id));
        } else if line.starts_with("public-ipv4:") {
            out.push_str(&format!("public-ipv4: {ipv4}\n"));
        } else if line.starts_with("public-keys:") {
            out.push_str(&keys);
            while lines.peek().is_some_and(|l| l.starts_with("- ")) {
                lines.next();
            }
        } else {
            out.push_str(&line.replace("2a01:4f8:c012:abcd::1/64", &ipv6));
            out.push('\n');
        }
    }
    out
}

/// The server's network: its namespace and the stand-ins', joined on eth0 (link-local), and
/// eth1 with the public IPv4 address on a veth pair to this machine. Returns the server's address.
fn network(id: &str) -> (ContainerNet, String) {
    let net = ContainerNet::new(
        id,
        LINK_ADDR,
        &[
            "169.254.169.254/16",
            &format!("{}/16", HUB_ADDR.split(':').next().unwrap()),
        ],
    );
    net.guest.ip(&["link", "set", "eth0", "down"]);
    net.guest.ip(&["link", "set", "eth0", "address", MAC]);
    net.guest.ip(&["link", "set", "eth0", "up"]);
    let (host_end, server_end) = next_public();
    let veth = format!("hcp{id}");
    netns::ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &net.guest.name,
    ]);
    netns::ip(&["addr", "add", &format!("{host_end}/30"), "dev", &veth]);
    netns::ip(&["link", "set", &veth, "up"]);
    net.guest
        .ip(&["addr", "add", &format!("{server_end}/30"), "dev", "eth1"]);
    net.guest.ip(&["link", "set", "eth1", "up"]);
    (net, server_end)
}

impl Machine {
    /// Boots server `boot` (panics, cleaning up, when it does not come up).
    /// `started` is told the server's public IPv4 address and /64 as soon as its systemd runs.
    pub fn boot(
        image: &Image,
        hub: &FlakeHub,
        boot: &Boot,
        mask_sshd: bool,
        started: impl FnOnce(&str, &str) + Send + 'static,
    ) -> Machine {
        let t0 = Instant::now();
        let id = netns::unique();
        let (net, server_end) = network(&id);
        let ipv6_net = format!("2a01:4f8:c0c:{:x}::/64", boot.id % 0xffff);
        let dir = image.server_dir(boot.id);
        let mut docs = Documents::default();
        docs.docs.insert(
            "metadata".into(),
            metadata(boot, &server_end, &ipv6_net).into_bytes(),
        );
        docs.docs
            .insert("metadata/private-networks".into(), b"[]\n".to_vec());
        docs.docs
            .insert("userdata".into(), boot.user_data.clone().into_bytes());
        let metadata =
            MetadataServer::start_in_netns(&net.standins.name, "169.254.169.254:80", docs)
                .expect("the server's metadata service");
        let hub = hub
            .also_serve_in_netns(&net.standins.name, HUB_ADDR)
            .expect("FlakeHub in the server's network");
        let machine = format!("hcl-{}-{id}", boot.id);
        let settings = NspawnSettings::net_admin(&machine);
        let spec = Spec {
            machine,
            netns: net.guest.name.clone(),
            bind_ro: vec![
                (image.unit_dir.clone(), "/etc/systemd/system".into()),
                (
                    image.agent_toml.clone(),
                    "/etc/hcloud-nixos/agent.toml".into(),
                ),
                (image.network_dir.clone(), "/etc/systemd/network".into()),
                ("/etc/ssl".into(), "/etc/ssl".into()),
                (image.package.join("bin"), "/usr/local/bin".into()),
                (
                    image.sshd_config.clone(),
                    "/etc/hcloud-local/sshd_config".into(),
                ),
                (
                    image.sysusers.clone(),
                    "/etc/sysusers.d/hcloud-local.conf".into(),
                ),
                (
                    image.tmpfiles.clone(),
                    "/etc/tmpfiles.d/hcloud-local.conf".into(),
                ),
                (image.pam.clone(), "/etc/pam.d/sshd".into()),
            ],
            bind: vec![image.dir.clone()],
            console_log: dir.join("console.log"),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (ip4, ip6) = (server_end.clone(), ipv6_net.clone());
        std::thread::spawn(move || {
            if rx.recv().is_ok() {
                started(&ip4, &ip6);
            }
        });
        let more = More {
            started: Some(tx),
            bind_to: vec![(dir.clone(), SERVER_DIR.into())],
            mask: if mask_sshd {
                vec![SSHD_UNIT.to_string()]
            } else {
                Vec::new()
            },
        };
        let container = Container::boot_with(&spec, &more);
        Machine {
            container,
            _hub: hub,
            _metadata: metadata,
            _settings: settings,
            _net: net,
            id: boot.id,
            name: boot.name.clone(),
            ipv4: server_end,
            ipv6_net,
            dir,
            boot_time: t0.elapsed(),
        }
    }

    /// `journalctl ARGS` in the server (through a file: more than a pipe's worth of output).
    pub fn journal(&self, args: &[&str]) -> String {
        let file = self.dir.join("journal.out");
        let quoted: Vec<String> = args.iter().map(|a| crate::scripts::sq(a)).collect();
        let _ = self.container.exec(
            Duration::from_secs(30),
            "sh",
            &[
                "-c",
                &format!(
                    "journalctl --no-pager {} > {SERVER_DIR}/journal.out 2>&1",
                    quoted.join(" ")
                ),
            ],
        );
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        text
    }
}
