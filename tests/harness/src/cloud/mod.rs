//! A local cloud: the Hetzner Cloud API stand-in ([`crate::hcloud_api`]) on loopback whose
//! started servers are machines that boot ([`machine`]): containers with systemd as PID 1, each
//! in a network namespace of its own with its metadata service, a public IPv4 address this
//! machine reaches, sshd, and the agent following the cloud's one FlakeHub stand-in, whose
//! releases live in one real Nix store ([`image`]). Rescue mode for `upload` is a real sshd on
//! loopback ([`crate::rescue_sshd`]); a snapshot is bookkeeping (every server boots this
//! machine's own system).
//!
//! A server is `initializing` until its container has booted (`systemctl is-system-running`
//! says running or degraded), then `running` with its addresses in `public_net`. Power-off and
//! deletion stop its container. Everything the cloud started (containers, namespaces, veth
//! pairs, stand-ins, sshd) is stopped by PID and removed when the cloud is dropped.

pub mod image;
pub mod machine;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::flakehub::FlakeHub;
use crate::hcloud_api::{Boot, Event, HcloudApi, Inner};
use crate::rescue_sshd::RescueSshd;

pub use image::{Image, ReleaseKind};
pub use machine::Machine;

/// The Cloud API token the local cloud takes.
pub const TOKEN: &str = crate::hcloud_api::TOKEN;

/// Programs (and files) the local cloud needs on this machine, with the Debian package of each.
pub const PREREQUISITES: &[(&str, &str)] = &[
    ("systemd-nspawn", "systemd-container"),
    ("nsenter", "util-linux"),
    ("ip", "iproute2"),
    ("/usr/sbin/sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    ("nix-store", "nix-bin"),
    ("nix-env", "nix-bin"),
    ("nft", "nftables"),
    ("/lib/systemd/systemd-networkd", "systemd"),
    ("dpkg", "dpkg"),
    ("qemu-img", "qemu-utils"),
    ("zstd", "zstd"),
    ("xz", "xz-utils"),
    ("bzip2", "bzip2"),
    ("curl", "curl"),
    ("blkdiscard", "util-linux"),
];

/// What is missing to run a local cloud: one line naming the packages, or `None`.
pub fn missing() -> Option<String> {
    let mut packages: Vec<&str> = PREREQUISITES
        .iter()
        .filter(|(program, _)| !crate::on_path(program))
        .map(|(_, package)| *package)
        .collect();
    packages.dedup();
    let root = nix::unistd::geteuid().is_root();
    match (packages.is_empty(), root) {
        (true, true) => None,
        (true, false) => {
            Some("the local cloud runs as root (containers, network namespaces)".into())
        }
        (false, _) => Some(format!(
            "the local cloud needs these packages: apt-get install {}{}",
            packages.join(" "),
            if root { "" } else { " (and runs as root)" }
        )),
    }
}

/// Settings of a cloud.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agent's `poll_interval` on every server.
    pub poll_interval: Duration,
    /// The only FlakeHub token the cloud's FlakeHub (and determinate-nixd) takes.
    pub flakehub_token: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            poll_interval: Duration::from_secs(5),
            flakehub_token: "flakehub1_localcloud_0123456789abcdef".into(),
        }
    }
}

/// What happened to the machines, for a person (the example prints it) or a benchmark.
#[derive(Clone, Debug)]
pub struct Note {
    pub at: Instant,
    pub text: String,
}

#[derive(Default)]
struct Machines {
    running: Mutex<BTreeMap<u64, Machine>>,
    booting: Mutex<Vec<JoinHandle<()>>>,
    closing: AtomicBool,
    mask_sshd: Mutex<HashSet<String>>,
    notes: Mutex<Vec<Note>>,
}

impl Machines {
    fn note(&self, text: String) {
        crate::lock(&self.notes).push(Note {
            at: Instant::now(),
            text,
        });
    }
}

/// A running local cloud. Dropping it stops and removes everything it started.
pub struct LocalCloud {
    pub api: HcloudApi,
    pub hub: Arc<FlakeHub>,
    pub rescue: RescueSshd,
    pub image: Arc<Image>,
    pub options: Options,
    machines: Arc<Machines>,
    worker: Option<JoinHandle<()>>,
    /// The rescue system's "disk" (what `upload --rescue-device` writes).
    pub rescue_disk: PathBuf,
    /// Removed last (fields drop in order, after `drop` stopped the machines).
    _dir: tempfile::TempDir,
}

impl LocalCloud {
    /// Starts the API and FlakeHub on loopback, the rescue sshd, and prepares the image.
    /// Panics when a prerequisite is missing ([`missing`] says which).
    pub async fn start(options: Options) -> LocalCloud {
        if let Some(why) = missing() {
            panic!("{why}");
        }
        let dir = crate::container::shared_tempdir("cloud-");
        let image = Arc::new(Image::prepare(
            dir.path(),
            options.poll_interval,
            &options.flakehub_token,
        ));
        let hub = Arc::new(FlakeHub::start("127.0.0.1:0").expect("the FlakeHub stand-in"));
        hub.require_token(Some(&options.flakehub_token));
        let rescue_dir = dir.path().join("rescue");
        std::fs::create_dir_all(&rescue_dir).unwrap();
        let rescue = RescueSshd::start(&rescue_dir, None);
        let rescue_disk = dir.path().join("rescue-disk");
        std::fs::write(&rescue_disk, b"").unwrap();
        let api = HcloudApi::start().await;
        let (tx, rx) = channel();
        api.with(|s| {
            s.authorized_keys = Some(rescue.authorized_keys.clone());
            s.machines = Some(tx);
        });
        let machines = Arc::new(Machines::default());
        let worker = {
            let (machines, image, state, hub) = (
                machines.clone(),
                image.clone(),
                api.state.clone(),
                hub.clone(),
            );
            std::thread::spawn(move || work(rx, machines, image, hub, state))
        };
        LocalCloud {
            api,
            hub,
            rescue,
            image,
            options,
            machines,
            worker: Some(worker),
            rescue_disk,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT/v1`, for `HCLOUD_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        self.api.endpoint()
    }

    /// FlakeHub's API on loopback (servers reach it at 169.254.169.253:8080).
    pub fn flakehub_url(&self) -> String {
        self.hub.url()
    }

    /// The cloud's directory (shared with every server at the same path).
    pub fn dir(&self) -> PathBuf {
        self.image.dir.clone()
    }

    /// `upload`'s arguments for the rescue system: `--rescue-ssh-port P --rescue-device FILE`.
    pub fn upload_args(&self) -> Vec<String> {
        vec![
            "--rescue-ssh-port".into(),
            self.rescue.port.to_string(),
            "--rescue-device".into(),
            self.rescue_disk.display().to_string(),
        ]
    }

    /// Publishes a release of `org/flake` whose output `attr` is a new system in the cloud's store.
    pub fn publish(
        &self,
        org: &str,
        flake: &str,
        attr: &str,
        version: &str,
        kind: ReleaseKind,
    ) -> String {
        let path = self.image.add_system(version, kind);
        self.hub.publish(org, flake, version, attr, &path);
        self.machines.note(format!(
            "published {org}/{flake} {version} ({attr} -> {path})"
        ));
        path
    }

    /// Servers with this name boot without sshd (a server that never answers SSH).
    pub fn mask_sshd(&self, name: &str) {
        crate::lock(&self.machines.mask_sshd).insert(name.to_string());
    }

    /// The machines that run: `(server ID, name, public IPv4)`.
    pub fn machines(&self) -> Vec<(u64, String, String)> {
        crate::lock(&self.machines.running)
            .values()
            .map(|m| (m.id, m.name.clone(), m.ipv4.clone()))
            .collect()
    }

    /// Machines still booting.
    pub fn booting(&self) -> usize {
        let mut booting = crate::lock(&self.machines.booting);
        booting.retain(|h| !h.is_finished());
        booting.len()
    }

    /// Runs `f` on the running machine of server `id`.
    pub fn with_machine<T>(&self, id: u64, f: impl FnOnce(&Machine) -> T) -> Option<T> {
        crate::lock(&self.machines.running).get(&id).map(f)
    }

    /// Runs a program in server `id` (its every namespace), within `timeout`.
    pub fn exec(&self, id: u64, timeout: Duration, program: &str, args: &[&str]) -> Option<Output> {
        self.with_machine(id, |m| m.container.exec(timeout, program, args))
    }

    /// What happened so far (booted, stopped, published, failed).
    pub fn notes(&self) -> Vec<Note> {
        crate::lock(&self.machines.notes).clone()
    }

    /// Waits until no machine is booting (a deletion during the boot lets it finish first).
    pub fn settle(&self, timeout: Duration) -> bool {
        crate::netns::poll(timeout, Duration::from_millis(100), || self.booting() == 0)
    }
}

impl Drop for LocalCloud {
    fn drop(&mut self) {
        self.machines.closing.store(true, Ordering::SeqCst);
        // The API no longer reaches the machines; the worker sees its channel closed.
        self.api.with(|s| s.machines = None);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        let booting: Vec<JoinHandle<()>> = crate::lock(&self.machines.booting).drain(..).collect();
        for handle in booting {
            let _ = handle.join();
        }
        let running: Vec<Machine> = std::mem::take(&mut *crate::lock(&self.machines.running))
            .into_values()
            .collect();
        drop(running);
    }
}

/// The machines' side of the API: boots, power-offs and deletions, each in a thread of its own.
fn work(
    rx: Receiver<Event>,
    machines: Arc<Machines>,
    image: Arc<Image>,
    hub: Arc<FlakeHub>,
    state: Arc<Mutex<Inner>>,
) {
    loop {
        let event = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) if !machines.closing.load(Ordering::SeqCst) => continue,
            Err(_) => return,
        };
        match event {
            Event::Boot(boot) => {
                let (m, i, h, s) = (machines.clone(), image.clone(), hub.clone(), state.clone());
                let handle = std::thread::spawn(move || boot_one(&m, &i, &h, &s, boot));
                crate::lock(&machines.booting).push(handle);
            }
            Event::PowerOff(id) | Event::Delete(id) => {
                let gone = crate::lock(&machines.running).remove(&id);
                if let Some(machine) = gone {
                    let name = machine.name.clone();
                    // Stopping takes a moment; the API answers meanwhile.
                    let m = machines.clone();
                    std::thread::spawn(move || {
                        drop(machine);
                        m.note(format!(
                            "server {name} ({id}): container stopped and removed"
                        ));
                    });
                }
            }
        }
    }
}

fn boot_one(
    machines: &Machines,
    image: &Image,
    hub: &FlakeHub,
    state: &Arc<Mutex<Inner>>,
    boot: Boot,
) {
    let (id, name) = (boot.id, boot.name.clone());
    let mask = crate::lock(&machines.mask_sshd).contains(&name);
    machines.note(format!(
        "server {name} ({id}): booting{}",
        if mask { " (sshd masked)" } else { "" }
    ));
    // `running` as soon as the container's systemd runs (Hetzner: once the VM is started); the
    // boot goes on, as on Hetzner, until sshd answers.
    let running = {
        let state = state.clone();
        move |ipv4: &str, ipv6: &str| {
            let mut s = crate::lock(&state);
            if s.servers
                .get(&id)
                .is_some_and(|x| x.status == "initializing")
            {
                s.set_running(id, ipv4, ipv6);
            }
        }
    };
    let booted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Machine::boot(image, hub, &boot, mask, running)
    }));
    match booted {
        Ok(machine) => {
            // Under the API's lock: a deletion after this finds the machine.
            let s = crate::lock(state);
            let wanted = s.servers.get(&id).is_some_and(|x| x.status == "running");
            if !wanted || machines.closing.load(Ordering::SeqCst) {
                drop(s);
                drop(machine);
                machines.note(format!(
                    "server {name} ({id}): deleted or powered off while booting; stopped"
                ));
                return;
            }
            machines.note(format!(
                "server {name} ({id}): booted, at {}, in {:.1} s",
                machine.ipv4,
                machine.boot_time.as_secs_f64()
            ));
            crate::lock(&machines.running).insert(id, machine);
            drop(s);
        }
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            crate::lock(state).set_status(id, "off");
            machines.note(format!("server {name} ({id}): did not boot: {why}"));
        }
    }
}

/// A key pair for root's login on the servers, registered in the project as `name`: returns
/// the private key's path.
pub fn user_key(cloud: &LocalCloud, name: &str) -> PathBuf {
    let key = cloud.dir().join(format!("id_ed25519_{name}"));
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
    cloud.api.with(|s| s.add_ssh_key(name, &public));
    key
}

/// `ssh root@ADDRESS` as the user runs it after `create`: batch mode, the server's host key
/// checked strictly against the `known_hosts` file create wrote, logging in with `key` (from
/// [`user_key`]). The caller adds the remote command.
pub fn user_ssh(known_hosts: &Path, key: &Path, address: &str) -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
    ])
    .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
    .args(["-o", "ConnectTimeout=5", "-i"])
    .arg(key)
    .arg(format!("root@{address}"));
    c
}
