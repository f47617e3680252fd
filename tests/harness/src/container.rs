//! A whole systemd machine for the root-only tests: the host's own Debian booted by
//! `systemd-nspawn --volatile=yes -D /` (systemd as PID 1, journald, D-Bus, on a tmpfs root with
//! a read-only /usr), in a network namespace of the test's own that a veth pair joins to a
//! second namespace for the stand-ins. Everything is killed and removed by PID and path when
//! dropped, also when a test panics.
//!
//! The namespaces are [`crate::netns`]'s (re-exported as `container::netns`).
//!
//! Safety notes: systemd never runs as PID 1 over the real root (nspawn gives it a tmpfs root);
//! directories shared with the container live in [`SHARED_BASE`], never under /tmp, wherever the
//! checkout lies (inside the container /tmp is a fresh tmpfs that hides a bind below it, and its
//! tmpfiles rules empty /tmp at boot); each container gets a cgroup of its
//! own (nspawn with `--keep-unit` creates `payload`/`supervisor` below the caller's cgroup,
//! which two containers must not share).

pub use crate::netns;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use netns::{Netns, poll};

/// Programs a container test needs on the host.
pub const HOST_TOOLS: &[&str] = &["systemd-nspawn", "nsenter", "ip", "sh"];

/// PATH inside the container.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long booting to `running`/`degraded` may take.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Seconds since the test started, for log lines a newcomer can follow.
pub fn elapsed(start: Instant) -> String {
    format!("{:6.1}s", start.elapsed().as_secs_f64())
}

/// Where directories shared with containers are made: a fixed place outside /tmp, so that no test
/// depends on where the checkout lies (a clone made with `mktemp -d` is under /tmp), and that no
/// tmpfiles rule of the host or the container cleans.
pub const SHARED_BASE: &str = "/var/lib/hcloud-nixos-tests";

/// A directory shared with a container (bind-mounted at the same path) under [`SHARED_BASE`];
/// removed when dropped.
pub fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    let base = Path::new(SHARED_BASE);
    std::fs::create_dir_all(base).unwrap_or_else(|e| panic!("create {SHARED_BASE}: {e}"));
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .expect("create a temporary directory")
}

pub use crate::scripts::write_executable;

/// The container's network: namespace `guest` (the container's, with `eth0`) and namespace
/// `standins` (where in-process servers listen), joined by a veth pair. Only link-local
/// addresses (169.254.0.0/16) are used. Dropping deletes both namespaces.
pub struct ContainerNet {
    pub standins: Netns,
    pub guest: Netns,
}

impl ContainerNet {
    /// `guest_addr` (e.g. `169.254.10.2/16`) on the container's eth0; each of `standin_addrs`
    /// (e.g. `169.254.169.254/16`) on the stand-ins' end.
    pub fn new(id: &str, guest_addr: &str, standin_addrs: &[&str]) -> Self {
        // Namespace names stay short: interface and namespace names have length limits.
        let net = ContainerNet {
            standins: Netns::new(format!("hcs-{id}")),
            guest: Netns::new(format!("hcg-{id}")),
        };
        net.standins.ip(&[
            "link",
            "add",
            "sv0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &net.guest.name,
        ]);
        for addr in standin_addrs {
            net.standins.ip(&["addr", "add", addr, "dev", "sv0"]);
        }
        net.standins.ip(&["link", "set", "sv0", "up"]);
        net.guest.ip(&["addr", "add", guest_addr, "dev", "eth0"]);
        net.guest.ip(&["link", "set", "eth0", "up"]);
        net
    }
}

/// What to boot.
/// Host units that have no business in the test machine.
pub const MASKED: &[&str] = &["ssh.service", "ssh.socket", "nftables.service"];

pub struct Spec {
    /// Machine name (also the container's hostname); unique per test run.
    pub machine: String,
    /// Name of the network namespace to join (`/run/netns/NAME`).
    pub netns: String,
    /// Read-only bind mounts `(host path, container path)`.
    pub bind_ro: Vec<(PathBuf, PathBuf)>,
    /// Read-write bind mounts at the same path inside.
    pub bind: Vec<PathBuf>,
    /// Where nspawn's own output (the boot console) goes.
    pub console_log: PathBuf,
}

/// A booted container. Dropping it SIGKILLs nspawn and the container's PID 1 (PID 1 ignores
/// SIGTERM) by PID, waits for nspawn, and removes the container's cgroups.
pub struct Container {
    child: Child,
    /// PID (in our namespace) of the container's systemd.
    pub init: i32,
    pub machine: String,
    console_log: PathBuf,
    cgroups: Vec<PathBuf>,
}

/// Cgroup directories for one container, one per mounted hierarchy that systemd uses, below
/// our own cgroup there.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path_in = |key: &str| {
        own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            (ctrl == key).then(|| path.trim_start_matches('/').to_string())
        })
    };
    let mut dirs = Vec::new();
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // Pure cgroup v2.
        if let Some(p) = path_in("") {
            dirs.push(Path::new("/sys/fs/cgroup").join(p).join(name));
        }
    } else {
        // Hybrid (v2 at /sys/fs/cgroup/unified) or legacy with a name=systemd hierarchy.
        if Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
            && let Some(p) = path_in("")
        {
            dirs.push(Path::new("/sys/fs/cgroup/unified").join(p).join(name));
        }
        if Path::new("/sys/fs/cgroup/systemd/cgroup.procs").exists()
            && let Some(p) = path_in("name=systemd")
        {
            dirs.push(Path::new("/sys/fs/cgroup/systemd").join(p).join(name));
        }
    }
    dirs
}

/// Removes a cgroup directory tree, leaves first (only empty cgroups can be removed).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// PIDs whose parent is `pid` (from /proc/*/stat).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // pid (comm) state ppid ...; comm may contain spaces and parentheses.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn kill9(pid: i32) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// More for a container than [`Spec`] says (a local cloud's servers).
#[derive(Debug, Default, Clone)]
pub struct More {
    /// Read-write bind mounts `(host path, container path)`.
    pub bind_to: Vec<(PathBuf, PathBuf)>,
    /// Units masked on the kernel command line, besides [`MASKED`].
    pub mask: Vec<String>,
    /// Told the PID of the container's systemd as soon as it runs (before the boot completes).
    pub started: Option<std::sync::mpsc::Sender<i32>>,
}

impl Container {
    /// Boots the container and waits (up to [`BOOT_TIMEOUT`]) until `systemctl
    /// is-system-running` says `running` or `degraded`. Panics with the console's tail when it
    /// does not come up (the container is cleaned up all the same).
    pub fn boot(spec: &Spec) -> Container {
        Self::boot_with(spec, &More::default())
    }

    /// [`boot`](Self::boot) with more binds and masks.
    pub fn boot_with(spec: &Spec, more: &More) -> Container {
        let cgroups = cgroup_dirs(&format!("hcloud-nixos-test-{}", spec.machine));
        for dir in &cgroups {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
        }
        let mut args: Vec<String> = vec![
            "--volatile=yes".into(),
            "--directory=/".into(),
            "--boot".into(),
            "--register=no".into(),
            "--keep-unit".into(),
            format!("--network-namespace-path=/run/netns/{}", spec.netns),
            format!("--machine={}", spec.machine),
        ];
        for (from, to) in &spec.bind_ro {
            args.push(format!("--bind-ro={}:{}", from.display(), to.display()));
        }
        for dir in &spec.bind {
            args.push(format!("--bind={}", dir.display()));
        }
        for (from, to) in &more.bind_to {
            args.push(format!("--bind={}:{}", from.display(), to.display()));
        }
        // Arguments after `--` go to the container's systemd.
        // The host's own services that the tests install (openssh-server for the uploader,
        // nftables for the firewall test) fail in a container with a bare /etc; masked, they
        // cannot pass for units a deploy broke.
        args.extend(["--".into(), "systemd.firstboot=off".into()]);
        args.extend(
            MASKED
                .iter()
                .map(|u| u.to_string())
                .chain(more.mask.iter().cloned())
                .map(|u| format!("systemd.mask={u}")),
        );
        // A small shell moves itself into the container's own cgroups, then becomes nspawn.
        let mut script = String::from("set -e\n");
        for dir in &cgroups {
            script.push_str(&format!("echo $$ > '{}/cgroup.procs'\n", dir.display()));
        }
        script.push_str("exec systemd-nspawn \"$@\"\n");
        let log = File::create(&spec.console_log).expect("create the console log");
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log)
            .spawn()
            .expect("start systemd-nspawn");
        // From here on, Drop cleans up whatever happens.
        let mut container = Container {
            child,
            init: 0,
            machine: spec.machine.clone(),
            console_log: spec.console_log.clone(),
            cgroups,
        };
        let nspawn = container.child.id() as i32;
        let mut init = None;
        poll(Duration::from_secs(20), Duration::from_millis(50), || {
            // nspawn's child is the container's PID 1 once it has exec'ed systemd.
            init = children(nspawn).into_iter().find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            });
            init.is_some()
        });
        container.init = init.unwrap_or_else(|| {
            panic!(
                "systemd-nspawn did not start the container's systemd within 20 s\n{}",
                container.console_tail()
            )
        });
        if let Some(started) = &more.started {
            let _ = started.send(container.init);
        }
        let mut state = String::new();
        let up = poll(BOOT_TIMEOUT, Duration::from_millis(250), || {
            state = container.system_state();
            state == "running" || state == "degraded"
        });
        assert!(
            up,
            "the container did not boot within {BOOT_TIMEOUT:?} (is-system-running: '{state}')\n{}",
            container.console_tail()
        );
        container
    }

    /// What `systemctl is-system-running` says (`starting`, `running`, `degraded`, ...).
    pub fn system_state(&self) -> String {
        let out = self.exec(Duration::from_secs(10), "systemctl", &["is-system-running"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The last lines nspawn printed (the boot console).
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- console (last lines) ---\n{}", lines[from..].join("\n"))
    }

    /// `nsenter -t INIT -a PROGRAM ARGS...` (every namespace of the container) with a clean
    /// environment; killed after `timeout`.
    pub fn exec(&self, timeout: Duration, program: &str, args: &[&str]) -> Output {
        netns::output_within(
            Command::new("nsenter")
                .args(["-t", &self.init.to_string(), "-a", program])
                .args(args)
                .env_clear()
                .env("PATH", GUEST_PATH)
                .env("LANG", "C.UTF-8"),
            timeout,
        )
    }

    /// Like [`exec`](Self::exec), but panics when the command fails; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(Duration::from_secs(30), program, args);
        assert!(
            out.status.success(),
            "in the container: {program} {} failed: {}\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A shell script in the container (`sh -c SCRIPT`); panics when it fails.
    pub fn sh(&self, script: &str) -> String {
        self.run("sh", &["-c", script])
    }

    /// One property of a unit (`systemctl show -p NAME --value`); empty when it cannot be read.
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        let out = self.exec(
            Duration::from_secs(10),
            "systemctl",
            &["show", "-p", property, "--value", unit],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `ActiveState/SubState` of a unit, e.g. `active/running`.
    pub fn unit_state(&self, unit: &str) -> String {
        let out = self.exec(
            Duration::from_secs(10),
            "systemctl",
            &["show", "-p", "ActiveState", "-p", "SubState", unit],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or("")
                .to_string()
        };
        format!("{}/{}", get("ActiveState="), get("SubState="))
    }

    /// Loaded units matching a pattern (`systemctl list-units --all --plain PATTERN`), by name.
    pub fn units(&self, pattern: &str) -> Vec<String> {
        let out = self.run(
            "systemctl",
            &[
                "list-units",
                "--all",
                "--plain",
                "--no-legend",
                "--no-pager",
                pattern,
            ],
        );
        out.lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // PID 1 ignores SIGTERM; SIGKILL to the namespace's init ends every process in it.
        let nspawn = self.child.id() as i32;
        kill9(self.init);
        for pid in children(nspawn) {
            kill9(pid);
        }
        kill9(nspawn);
        let _ = self.child.wait();
        // The cgroups empty themselves once the processes are reaped; give them a moment.
        for dir in &self.cgroups {
            let _ = poll(Duration::from_secs(5), Duration::from_millis(50), || {
                remove_cgroup(dir);
                !dir.exists()
            });
        }
    }
}

/// Extra privileges for one container. `systemd-nspawn --network-namespace-path=` does not grant
/// CAP_NET_ADMIN (only `--private-network` and friends do), so systemd-networkd is skipped
/// (`ConditionCapability=CAP_NET_ADMIN`) and neither `ip link set up` nor nft work. A trusted
/// settings file, `/run/systemd/nspawn/<machine>.nspawn`, grants it; it is removed when dropped.
pub struct NspawnSettings(pub PathBuf);

impl NspawnSettings {
    pub fn net_admin(machine: &str) -> Self {
        let dir = Path::new("/run/systemd/nspawn");
        std::fs::create_dir_all(dir).expect("create /run/systemd/nspawn");
        let path = dir.join(format!("{machine}.nspawn"));
        std::fs::write(
            &path,
            "# Written by the hcloud-nixos system test; removed when it ends.\n[Exec]\nCapability=CAP_NET_ADMIN\n",
        )
        .expect("write the .nspawn file");
        NspawnSettings(path)
    }
}

impl Drop for NspawnSettings {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
