//! End-to-end tests of `hcloud-nixos upload` and `cleanup`: the real binary against the stand-in
//! Hetzner Cloud API and a real OpenSSH server on loopback as the rescue system.
//!
//! | file | what |
//! |---|---|
//! | `flows.rs` | raw, compressed, qcow2 and URL images; verification; API errors; SSH waits; signals; cleanup; several images |
//! | `hostile_images.rs` | crafted qcow2 images (backing files, external data files, other formats) never reach the rescue system |
//! | `lost_answers.rs` | answers lost after the work was done: nothing is created twice; what a run created is deleted or listed |
//! | `liveness.rs` | a run's lease: `cleanup` leaves live runs alone, and takes what a dead run left |

mod flows;
mod hostile_images;
mod liveness;
mod lost_answers;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use harness::{hcloud_api, rescue_sshd};
use hcloud_api::{HcloudApi, TOKEN};
use rescue_sshd::{RescueSshd, prerequisites_or_skip};
use sha2::{Digest, Sha256};

/// Stand-in API, sshd and a disk, for one test.
pub(crate) struct Bench {
    pub(crate) api: HcloudApi,
    pub(crate) sshd: RescueSshd,
    pub(crate) disk: PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) async fn bench(test: &str, force_command: Option<&str>) -> Option<Bench> {
    if !prerequisites_or_skip(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let sshd_dir = dir.path().join("sshd");
    std::fs::create_dir(&sshd_dir).unwrap();
    let sshd = RescueSshd::start(&sshd_dir, force_command);
    let api = HcloudApi::start().await;
    api.with(|s| s.authorized_keys = Some(sshd.authorized_keys.clone()));
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"old disk contents").unwrap();
    Some(Bench {
        api,
        sshd,
        disk,
        dir,
    })
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A test image: pseudo-random blocks with runs of zeros (to exercise sparse writes).
pub(crate) fn image_bytes(size: usize, seed: u32) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut x = seed.wrapping_mul(2654435761).max(1);
    for (i, chunk) in v.chunks_mut(64 * 1024).enumerate() {
        if i % 3 == 1 {
            continue; // zeros
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    v
}

pub(crate) fn upload_cmd(b: &Bench, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
    c.arg("upload")
        .args(args)
        .arg("--rescue-ssh-port")
        .arg(b.sshd.port.to_string())
        .arg("--rescue-device")
        .arg(&b.disk);
    if !args.contains(&"--ssh-timeout") {
        c.args(["--ssh-timeout", "60s"]);
    }
    env(&mut c, b);
    c
}

pub(crate) fn env(c: &mut tokio::process::Command, b: &Bench) {
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", b.dir.path())
        .env("HCLOUD_TOKEN", TOKEN)
        .env("HCLOUD_ENDPOINT", b.api.endpoint())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
}

pub(crate) async fn run(mut c: tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .expect("the upload took more than 120 s")
        .unwrap()
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns the snapshot ID printed on stdout.
pub(crate) fn snapshot_id(out: &Output) -> u64 {
    assert!(
        out.status.success(),
        "upload failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("stdout is not one snapshot ID: {:?}", text(&out.stdout)))
}

/// Nothing temporary is left on the stand-in.
pub(crate) fn assert_nothing_left(b: &Bench) {
    b.api.with(|s| {
        assert!(s.servers.is_empty(), "servers left: {:?}", s.servers.keys());
        assert!(s.keys.is_empty(), "keys left: {:?}", s.keys.keys());
    });
}

pub(crate) fn assert_disk_holds(b: &Bench, raw: &[u8]) {
    let disk = std::fs::read(&b.disk).unwrap();
    assert!(disk.len() >= raw.len(), "disk shorter than the image");
    assert!(
        disk[..raw.len()] == *raw,
        "disk contents differ from the image"
    );
}

pub(crate) fn assert_snapshot(b: &Bench, id: u64, raw: &[u8], arch: &str) {
    let hash = sha256_hex(raw);
    b.api.with(|s| {
        let img = s.images.get(&id).expect("the printed ID is a snapshot");
        assert_eq!(img.status, "available");
        assert_eq!(img.architecture, arch);
        assert_eq!(img.labels["hcloud-nixos/image-sha256"], hash[..63]);
        assert_eq!(img.labels["hcloud-nixos/image-size"], raw.len().to_string());
    });
}

pub(crate) fn write(path: &Path, data: &[u8]) {
    std::fs::File::create(path)
        .unwrap()
        .write_all(data)
        .unwrap();
}
