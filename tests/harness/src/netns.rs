//! Network namespaces for the root-only tests: named namespaces, a "guest" with its own mount,
//! UTS and PID namespaces running real D-Bus, systemd-networkd and systemd-hostnamed, and
//! cleanup by PID that also runs when a test panics.

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Programs the guest needs (absolute paths are checked as files, others looked up in PATH).
pub const GUEST_TOOLS: &[&str] = &[
    "ip",
    "nsenter",
    "unshare",
    "mount",
    "busctl",
    "dbus-daemon",
    "/lib/systemd/systemd-networkd",
    "/lib/systemd/systemd-hostnamed",
];

/// Whether the test can run here: root and every tool present. When not, fails under `CI=true`
/// (a CI run must not pass by skipping) and otherwise prints `SKIP: ...` and returns false.
pub fn can_run(test: &str, tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    missing.extend(
        tools
            .iter()
            .filter(|t| !crate::on_path(t))
            .map(|t| t.to_string()),
    );
    if missing.is_empty() {
        return true;
    }
    crate::skip(test, &format!("needs {}", missing.join(", ")))
}

/// A name suffix unique to this process and call: `<pid>-<n>`.
pub fn unique() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs a command to completion; panics with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `ip ARGS...`, panicking on failure.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// Calls `f` every `every` until it returns true or `timeout` passes; returns its last answer.
pub fn poll(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Runs a command, killing it when it has not finished within `timeout`. Its output is read
/// while it runs, so a command that prints more than a pipe holds does not stall.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let done = poll(timeout, Duration::from_millis(50), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    assert!(
        done,
        "command did not finish within {timeout:?}: {cmd:?}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`/run/netns/NAME`), deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// What the guest runs: private /run and /etc/hostname (content `$2`), read-only /sys (networkd
/// then does not wait for udev), a private system bus, hostnamed and (when `$1` is 1) networkd;
/// then it waits to be killed.
const GUEST_SETUP: &str = r#"
set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mount -o remount,ro /sys
mkdir -p /run/systemd/network /run/systemd/netif /run/dbus
chown systemd-network:systemd-network /run/systemd/netif
printf '%s' "$2" > /run/hostname.guest
mount --bind /run/hostname.guest /etc/hostname
dbus-daemon --system --fork --nopidfile
if [ "$1" = 1 ]; then /lib/systemd/systemd-networkd & fi
/lib/systemd/systemd-hostnamed &
exec sleep 600
"#;

/// How a guest starts.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// Start systemd-networkd (hostnamed and D-Bus always run).
    pub networkd: bool,
    /// What the guest's /etc/hostname contains (empty: no static hostname).
    pub etc_hostname: String,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            networkd: true,
            etc_hostname: String::new(),
        }
    }
}

/// A guest in network namespace `netns`: its own mount, UTS and PID namespaces, with a private
/// system D-Bus, systemd-networkd and systemd-hostnamed. Dropping it kills the PID namespace's
/// init (and so everything in it) by PID.
pub struct Guest {
    child: Child,
    /// PID (in our namespace) of the guest's PID namespace init.
    pub init: i32,
}

impl Guest {
    pub fn start(netns: &Netns, options: &GuestOptions) -> Self {
        let networkd = if options.networkd { "1" } else { "0" };
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "sh",
                "-c",
                GUEST_SETUP,
                "sh",
                networkd,
                &options.etc_hostname,
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("start the guest");
        let mut guest = Guest { child, init: 0 };
        let root = guest.child.id() as i32;
        let mut init = None;
        poll(Duration::from_secs(10), Duration::from_millis(20), || {
            init = init_below(root);
            init.is_some()
        });
        guest.init = init.expect("the guest's PID namespace did not come up");
        guest
    }

    /// `nsenter -t INIT -a PROGRAM ARGS...` with a clean environment; killed after `timeout`.
    pub fn exec(&self, timeout: Duration, program: &str, args: &[&str]) -> Output {
        output_within(
            Command::new("nsenter")
                .args(["-t", &self.init.to_string(), "-a", program])
                .args(args)
                .env_clear()
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                ),
            timeout,
        )
    }

    /// stdout of a command in the guest (empty when it failed).
    pub fn text(&self, program: &str, args: &[&str]) -> String {
        let out = self.exec(Duration::from_secs(10), program, args);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            String::new()
        }
    }

    /// Whether `name` has an owner on the guest's system bus.
    pub fn bus_name_owned(&self, name: &str) -> bool {
        self.text(
            "busctl",
            &[
                "--system",
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameHasOwner",
                "s",
                name,
            ],
        )
        .trim()
            == "b true"
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.init > 0 {
            // SIGKILL to a PID namespace's init ends every process in it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.init),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first process below `root` (inclusive) whose PID namespace differs from ours.
fn init_below(root: i32) -> Option<i32> {
    let ours = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let mut queue = vec![root];
    for _ in 0..64 {
        let pid = queue.pop()?;
        match std::fs::read_link(format!("/proc/{pid}/ns/pid")) {
            Ok(ns) if ns != ours => return Some(pid),
            _ => {}
        }
        queue.extend(children(pid));
    }
    None
}

/// PIDs whose parent is `pid` (from /proc/*/stat).
fn children(pid: i32) -> Vec<i32> {
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
