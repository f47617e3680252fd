//! What every server of a local cloud boots: this machine's own Debian with the project's units
//! installed as the NixOS module installs them (`units::nixos_unit_dir`), an OpenSSH server,
//! the agent's configuration, the `fh` and `determinate-nixd` stand-ins and one real Nix store
//! holding the cloud's releases. Paths that a release bakes in (`current-system`, the activation
//! log) are the same in every server and live on each one's own `/run`; what differs per server
//! (its system profile, determinate-nixd's login, fh's log) lives in the server's directory,
//! bound at [`SERVER_DIR`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::nix_store;
use crate::scripts::{Activation, DeterminateNixd, Fh, Profile, Switch};
use crate::units;

/// Where each server sees its own directory (read-write).
pub const SERVER_DIR: &str = "/var/lib/hcloud-local";
/// FlakeHub's address in every server's network.
pub const HUB_ADDR: &str = "169.254.169.253:8080";
/// The MAC of every server's public NIC (each server has a network of its own).
pub const MAC: &str = "96:00:03:aa:bb:cc";
/// The address of every server's eth0 on its link to the metadata service and FlakeHub; it
/// stands in for the DHCPv4 lease (there is no DHCP server).
pub const LINK_ADDR: &str = "169.254.10.2/16";
/// The OpenSSH server's unit in every server.
pub const SSHD_UNIT: &str = "hcloud-local-sshd.service";
/// Where the switch-to-configuration of every release points `current-system`, and logs.
const RUN_DIR: &str = "/run/hcloud-local";

/// What a release's activation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseKind {
    /// Switches.
    Good,
    /// Switches, then fails as a switch with a failing service does (exit status 4): the agent
    /// rolls it back.
    Broken,
}

/// The image and its releases, under the cloud's directory.
pub struct Image {
    pub dir: PathBuf,
    pub package: PathBuf,
    pub unit_dir: PathBuf,
    pub network_dir: PathBuf,
    pub agent_toml: PathBuf,
    pub sshd_config: PathBuf,
    pub sysusers: PathBuf,
    pub tmpfiles: PathBuf,
    /// `/etc/pam.d/sshd`: with PAM, a root without a password (`!*`, as systemd-sysusers makes it)
    /// logs in with a key, as on NixOS; without, sshd takes the account for locked.
    pub pam: PathBuf,
    /// The system every server boots (the image's own, version 0).
    pub system0: String,
}

fn write(path: &Path, text: &str) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Image {
    /// Prepares everything under `dir` (a directory shared with the servers at the same path).
    pub fn prepare(dir: &Path, poll_interval: Duration, flakehub_token: &str) -> Image {
        let package = units::package_dir(dir);
        let nix_bin = dir.join("nix-package/bin");
        std::fs::create_dir_all(&nix_bin).unwrap();
        for program in ["nix", "nix-env", "nix-store"] {
            let _ =
                std::os::unix::fs::symlink(format!("/usr/bin/{program}"), nix_bin.join(program));
        }
        Fh {
            api: format!("http://{HUB_ADDR}"),
            token_file: Path::new(SERVER_DIR).join("nixd/token"),
            log: Path::new(SERVER_DIR).join("fh-argv.log"),
            profile: Profile::Generation(Path::new(SERVER_DIR).join("profiles/system")),
            delay_file: None,
            env: Vec::new(),
        }
        .install(&dir.join("bin/fh-standin"));
        // fh notes when it is called (the benchmark: the agent's time to its first fh call).
        crate::scripts::write_executable(
            &dir.join("bin/fh"),
            &format!(
                "#!/bin/bash\n# Local cloud: notes the call, then the fh stand-in.\ndate +%s.%N >> {SERVER_DIR}/fh-calls\nexec {} \"$@\"\n",
                dir.join("bin/fh-standin").display()
            ),
        );
        DeterminateNixd {
            dir: Path::new(SERVER_DIR).join("nixd"),
            log: Path::new(SERVER_DIR).join("nixd-argv.log"),
            valid_token: Some(flakehub_token.to_string()),
        }
        .install(&dir.join("bin/determinate-nixd"));
        let agent_toml = dir.join("agent.toml");
        write(&agent_toml, &agent_config(dir, poll_interval));
        let unit_dir = units::nixos_unit_dir(dir, &package, &dir.join("nix"));
        write(&unit_dir.join(SSHD_UNIT), SSHD_SERVICE);
        let wants = unit_dir.join("multi-user.target.wants");
        std::fs::create_dir_all(&wants).unwrap();
        let _ = std::os::unix::fs::symlink(format!("../{SSHD_UNIT}"), wants.join(SSHD_UNIT));
        let network_dir = dir.join("etc-systemd-network");
        let mac_hex = MAC.replace(':', "");
        write(
            &network_dir
                .join(format!("50-hcloud-nixos-public-{mac_hex}.network.d"))
                .join("90-local-cloud-ipv4.conf"),
            &format!(
                "# Local cloud: stands in for the DHCPv4 lease on the link to the metadata service.\n[Network]\nAddress={LINK_ADDR}\n"
            ),
        );
        let sshd_config = dir.join("sshd_config");
        write(&sshd_config, SSHD_CONFIG);
        let sysusers = dir.join("sysusers.conf");
        write(
            &sysusers,
            "# Local cloud: OpenSSH's privilege separation user (Debian's package adds it when installed).\nu sshd - \"sshd privilege separation\" /run/sshd /usr/sbin/nologin\n",
        );
        write(
            &dir.join("pam-sshd"),
            "# Local cloud: keys only (see tests/harness/src/cloud/image.rs).\nauth required pam_deny.so\naccount required pam_unix.so\npassword required pam_deny.so\nsession required pam_unix.so\n",
        );
        let mut image = Image {
            dir: dir.to_path_buf(),
            package,
            unit_dir,
            network_dir,
            agent_toml,
            sshd_config,
            sysusers,
            tmpfiles: dir.join("tmpfiles.conf"),
            pam: dir.join("pam-sshd"),
            system0: String::new(),
        };
        image.system0 = image.add_system("0.0.0-image", ReleaseKind::Good);
        write(
            &image.tmpfiles,
            &format!(
                "# Local cloud: the image's system runs when a server boots; /etc/ssh is there, as on NixOS with OpenSSH.\nd /etc/ssh 0755 root root -\nd {RUN_DIR} 0755 root root -\nL {RUN_DIR}/current-system - - - - {s}\nL {RUN_DIR}/booted-system - - - - {s}\n",
                s = image.system0
            ),
        );
        image
    }

    /// Adds a system (a real store path whose `bin/switch-to-configuration` is a script, with the
    /// hcloud-nixos module's unit and configuration) to the cloud's store; returns its path.
    pub fn add_system(&self, version: &str, kind: ReleaseKind) -> String {
        let build = self
            .dir
            .join("build")
            .join(format!("nixos-system-{version}"));
        let _ = std::fs::remove_dir_all(&build);
        Switch {
            name: version.to_string(),
            current: Path::new(RUN_DIR).join("current-system"),
            log: Path::new(RUN_DIR).join("activations.log"),
            // When each activation began, exactly (the benchmark; the agent keeps whole seconds).
            times: Some(Path::new(SERVER_DIR).join("activation-times")),
            flags: None,
            delay_file: None,
            activation: match kind {
                ReleaseKind::Good => Activation::Switches,
                ReleaseKind::Broken => Activation::Exit4,
            },
        }
        .install_into(&build);
        write(&build.join("nixos-version"), version);
        let agent = std::fs::read_to_string(&self.agent_toml).unwrap();
        units::install_module_into(&build, &agent);
        nix_store::store_add(&self.dir, &build)
    }

    /// A server's own directory, with a system profile whose first generation is the image's
    /// system.
    pub fn server_dir(&self, id: u64) -> PathBuf {
        let dir = self.dir.join("servers").join(id.to_string());
        std::fs::create_dir_all(dir.join("profiles")).unwrap();
        nix_store::profile_set(&self.dir, &dir.join("profiles/system"), &self.system0);
        dir
    }
}

/// `/etc/hcloud-nixos/agent.toml` as the module renders it: every program by absolute path.
fn agent_config(dir: &Path, poll_interval: Duration) -> String {
    let d = dir.display();
    format!(
        r#"# The local cloud's servers (see tests/harness/src/cloud/image.rs).
poll_interval = "{poll}s"
confirm_timeout = "20s"

[flakehub]
api_url = "http://{HUB_ADDR}"

[apply]
timeout = "90s"

[paths]
current_system = "{RUN_DIR}/current-system"
booted_system = "{RUN_DIR}/booted-system"
system_profile = "{SERVER_DIR}/profiles/system"
fh = "{d}/bin/fh"
determinate_nixd = "{d}/bin/determinate-nixd"
nix = "{d}/nix-package/bin/nix"
nix_env = "{d}/nix-package/bin/nix-env"
"#,
        poll = poll_interval.as_secs().max(1)
    )
}

/// Debian's OpenSSH server, configured as the NixOS module has it: root logs in with keys only,
/// the metadata's keys come from the file the network step writes, the host key from the
/// user-data (installed by the network step).
const SSHD_CONFIG: &str = "# Local cloud (see tests/harness/src/cloud/image.rs).
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile .ssh/authorized_keys /run/hcloud-nixos/authorized_keys/%u
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
StrictModes no
PidFile /run/sshd.pid
";

const SSHD_SERVICE: &str =
    "# Local cloud: the server's OpenSSH server (see tests/harness/src/cloud/image.rs).
[Unit]
Description=OpenSSH server (local cloud)
After=network.target hcloud-nixos-network.service

[Service]
RuntimeDirectory=sshd
ExecStart=/usr/sbin/sshd -D -e -f /etc/hcloud-local/sshd_config
Restart=on-failure
RestartSec=1s

[Install]
WantedBy=multi-user.target
";
