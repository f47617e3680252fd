//! Running the agent in a bench: `hcloud-nixos ARGS --config FILE` to its end ([`Run`]) or as a
//! service ([`Agent`]), in the bench's own PID namespace, whose init reaps orphans as systemd
//! would.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Bench;
use crate::scripts::sq;

/// A finished command.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn all(&self) -> String {
        format!(
            "exit: {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}
/// A service-mode agent; killed (SIGKILL) and reaped when dropped. `child` is the `nsenter`
/// that started it in the bench's PID namespace, `pid` the agent itself (as this process sees it).
pub struct Agent {
    child: Option<Child>,
    pid: u32,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid as i32), sig).expect("signal the agent");
    }

    /// Is it still running (not exited)?
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL after that.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for it to exit by itself; panics after that.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.child.as_mut().expect("agent already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How it ended (when it did), and everything it printed.
    pub fn output(&mut self) -> String {
        let status = match &mut self.child {
            Some(c) => format!("{:?}", c.try_wait()),
            None => "reaped".to_string(),
        };
        format!(
            "exit status: {status}\n{}{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Bench {
    /// `hcloud-nixos ARGS --config FILE` in the bench's PID namespace.
    fn command(&self, args: &[&str]) -> Command {
        self.command_split(args, &[])
    }

    /// `hcloud-nixos ARGS --config FILE AFTER` in the bench's PID namespace.
    fn command_split(&self, args: &[&str], after: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.init_pid))
            .args(["--pid", "--mount"])
            .args(self.opts.hostname.is_some().then_some("--uts"))
            // fh (bash) finds its script `apply` here.
            .arg(format!("--wd={}", self.root.join("fh-lib").display()))
            .arg("--")
            .arg(crate::binary())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .args(after)
            .env(
                "PATH",
                format!("{}:{}", self.root.join("fh-lib").display(), super::PATH),
            )
            .env("NIX_CONF_DIR", self.root.join("nix-conf"))
            .env("HOME", self.root.join("home"))
            // Never the machine's own logind: a reboot the agent asks for must not reach it.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                format!("unix:path={}", self.root.join("no-system-bus").display()),
            )
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null());
        cmd
    }

    fn log_files(&self, label: &str) -> (PathBuf, PathBuf) {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        (
            self.root.join(format!("logs/{n:03}-{label}.out")),
            self.root.join(format!("logs/{n:03}-{label}.err")),
        )
    }

    /// Runs `hcloud-nixos ARGS --config ...` to its end (at most `timeout`; killed after that).
    pub fn run(&self, args: &[&str], timeout: Duration) -> Run {
        self.run_split(args, &[], timeout)
    }

    /// Runs `hcloud-nixos ARGS --config ... AFTER` to its end, like [`Bench::run`] (for
    /// subcommands of subcommands: `fleet --config ... status`).
    pub fn run_split(&self, args: &[&str], after: &[&str], timeout: Duration) -> Run {
        let label = args.iter().chain(after).copied().collect::<Vec<_>>();
        let (out, err) = self.log_files(&label.join("-").replace("--", ""));
        let mut child = self
            .command_split(args, after)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("run hcloud-nixos");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hcloud-nixos {args:?} did not finish within {timeout:?}:\n{}{}",
                    std::fs::read_to_string(&out).unwrap_or_default(),
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            status,
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        }
    }

    /// Starts `argv` in the bench's PID namespace (an operator's command, say); the caller waits
    /// for it (the namespace's end kills it at the latest).
    pub fn spawn_in_namespace(&self, argv: &[&str]) -> Child {
        Command::new("nsenter")
            .arg(format!("--target={}", self.init_pid))
            .args(["--pid", "--mount"])
            .args(self.opts.hostname.is_some().then_some("--uts"))
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .spawn()
            .expect("nsenter")
    }

    /// `hcloud-nixos agent --once`.
    pub fn once(&self) -> Run {
        self.run(&["agent", "--once"], Duration::from_secs(90))
    }

    /// `hcloud-nixos agent --once`, started in the background.
    pub fn spawn_once(&self) -> Agent {
        self.spawn(&["agent", "--once"])
    }

    /// `hcloud-nixos agent` (the service).
    pub fn start_agent(&self) -> Agent {
        self.spawn(&["agent"])
    }

    fn spawn(&self, args: &[&str]) -> Agent {
        let (out, err) = self.log_files(&args.join("-").replace("--", ""));
        let child = self
            .command(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start hcloud-nixos agent");
        let pid = only_child(child.id()).expect("nsenter started no agent");
        self.agents.lock().unwrap().push(pid);
        Agent {
            child: Some(child),
            pid,
            stdout: out,
            stderr: err,
        }
    }
}

/// A PID namespace with its own /proc for the bench's agents, fh and everything they start:
/// the agent looks for `fh apply` processes machine-wide, and must see only this bench's. Its
/// init reaps orphans (an fh whose agent was killed) as systemd would. With `hostname`, it is
/// also a UTS namespace with that hostname. Returns `unshare` (kill it and the namespace goes)
/// and the init's PID.
pub(super) fn pid_namespace(hostname: Option<&str>) -> (Child, u32) {
    let init = match hostname {
        // Set by the init as it starts (waited for below).
        Some(h) => format!(
            "printf %s {} >/proc/sys/kernel/hostname || exit 1; while :; do sleep 1 & wait; done",
            sq(h)
        ),
        None => "while :; do sleep 1 & wait; done".to_string(),
    };
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
        .args(hostname.map(|_| "--uts"))
        .args(["--", "/bin/bash", "-c", &init])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run unshare (util-linux)");
    match only_child(child.id()) {
        Some(init) => {
            if let Some(h) = hostname {
                wait_for_hostname(init, h);
            }
            (child, init)
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unshare --pid --fork started no init");
        }
    }
}

/// Waits (up to 5 s) until the UTS namespace of `init` has `hostname`.
fn wait_for_hostname(init: u32, hostname: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = Command::new("nsenter")
            .arg(format!("--target={init}"))
            .args(["--uts", "--", "cat", "/proc/sys/kernel/hostname"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if seen == hostname {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the bench's UTS namespace did not get the hostname {hostname} (it has '{seen}')"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The one child of `pid`, once it has one (within 5 s).
fn only_child(pid: u32) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = text.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Kills a process by PID if its command line still names `root` (not a reused PID).
pub(super) fn kill_ours(pid: u32, root: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(root) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}
