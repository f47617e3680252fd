//! A real OpenSSH server on 127.0.0.1 standing in for the Hetzner rescue system (test-bench recipe 3),
//! stopped by its PID when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

/// Whether the prerequisites are here. When they are not: fail under CI=true, else skip.
pub fn prerequisites_or_skip(test: &str) -> bool {
    let mut missing = Vec::new();
    if !Path::new(SSHD).exists() {
        missing.push("sshd (apt-get install openssh-server)".to_string());
    }
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    for tool in [
        "zstd",
        "xz",
        "bzip2",
        "qemu-img",
        "curl",
        "sha256sum",
        "blkdiscard",
    ] {
        if !crate::on_path(tool) {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    crate::skip(test, &format!("missing {}", missing.join(", ")))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The running sshd.
pub struct RescueSshd {
    pub port: u16,
    pub dir: PathBuf,
    pub authorized_keys: PathBuf,
    pid_file: PathBuf,
}

impl RescueSshd {
    /// Starts sshd in `dir`; `force_command` wraps every command (to simulate faults).
    pub fn start(dir: &Path, force_command: Option<&str>) -> Self {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let hostkey = dir.join("hostkey");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&hostkey)
            .status()
            .unwrap();
        assert!(st.success());
        let authorized_keys = dir.join("authorized_keys");
        std::fs::write(&authorized_keys, "").unwrap();
        let pid_file = dir.join("sshd.pid");
        let port = free_port();
        let mut cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile {}\nLogLevel VERBOSE\nMaxStartups 100\n",
            hostkey.display(),
            authorized_keys.display(),
            pid_file.display()
        );
        if let Some(fc) = force_command {
            cfg.push_str(&format!("ForceCommand {fc}\n"));
        }
        let cfg_path = dir.join("sshd_config");
        std::fs::write(&cfg_path, cfg).unwrap();
        let st = Command::new(SSHD)
            .arg("-f")
            .arg(&cfg_path)
            .arg("-E")
            .arg(dir.join("sshd.log"))
            .status()
            .unwrap();
        assert!(st.success(), "sshd did not start");
        let me = RescueSshd {
            port,
            dir: dir.to_path_buf(),
            authorized_keys,
            pid_file,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "sshd is not listening: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for RescueSshd {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}
