//! Benchmark of `hcloud-nixos upload` against `cat image | ssh ... dd` with the OpenSSH client,
//! over loopback. Ignored by default; run it with `tests/bench/upload.sh`.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{hcloud_api, rescue_sshd};
use hcloud_api::{HcloudApi, TOKEN};
use rescue_sshd::{RescueSshd, prerequisites_or_skip};

fn size_mib() -> u64 {
    std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// Incompressible data, so neither side profits from compression or sparse writes.
fn write_random_image(path: &std::path::Path, mib: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E3779B97F4A7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

/// Runs a command under `/usr/bin/time`, returning (wall seconds, max RSS in KiB, stderr).
fn timed(cmd: &mut Command) -> (f64, u64, String) {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let rss = err
        .lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("MAXRSS_KB=")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    (secs, rss, err)
}

/// Flushes dirty pages so that no run pays for the previous run's writeback.
fn settle() {
    assert!(Command::new("sync").status().unwrap().success());
    std::thread::sleep(Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run tests/bench/upload.sh"]
async fn bench_upload_against_openssh() {
    if !prerequisites_or_skip("bench") {
        return;
    }
    let mib = size_mib();
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or("/var/tmp".into())).unwrap();
    let sshd_dir = dir.path().join("sshd");
    std::fs::create_dir(&sshd_dir).unwrap();
    let sshd = RescueSshd::start(&sshd_dir, None);
    let api = HcloudApi::start().await;
    api.with(|s| {
        s.authorized_keys = Some(sshd.authorized_keys.clone());
        s.action_duration = Duration::from_millis(50);
    });
    let img = dir.path().join("image.raw");
    write_random_image(&img, mib);
    let disk = dir.path().join("disk");
    std::fs::write(&disk, b"").unwrap();

    // OpenSSH baseline.
    let key = dir.path().join("client_key");
    assert!(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    let openssh = |label: &str| {
        std::fs::copy(key.with_extension("pub"), &sshd.authorized_keys).unwrap();
        let script = format!(
            "cat {img} | /usr/bin/time -f 'CPU_S=%U+%S' ssh -p {port} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1 'dd of={disk} bs=4M status=none'",
            img = img.display(),
            port = sshd.port,
            key = key.display(),
            disk = disk.display()
        );
        settle();
        let (secs, _, err) = timed(Command::new("bash").arg("-c").arg(&script));
        let cpu = err
            .lines()
            .find(|l| l.starts_with("CPU_S="))
            .unwrap_or("")
            .to_string();
        eprintln!(
            "openssh ({label}): {secs:.2} s, {:.1} MiB/s, ssh client {cpu}",
            mib as f64 / secs
        );
        secs
    };

    let ours = |transfer: &str, force: bool| {
        let mut c = Command::new("/usr/bin/time");
        c.args([
            "-f",
            "CPU_S=%U+%S\nMAXRSS_KB=%M",
            env!("CARGO_BIN_EXE_hcloud-nixos"),
            "upload",
        ])
        .arg("--image")
        .arg(&img)
        .args(["--architecture", "x86", "--transfer", transfer])
        .args(["--rescue-ssh-port", &sshd.port.to_string()])
        .arg("--rescue-device")
        .arg(&disk)
        .env("HCLOUD_TOKEN", TOKEN)
        .env("HCLOUD_ENDPOINT", api.endpoint())
        .env("HOME", dir.path());
        if force {
            c.arg("--force");
        }
        settle();
        let (secs, rss, err) = timed(&mut c);
        let stream = err
            .lines()
            .find_map(|l| {
                let i = l.find("streamed ")?;
                let rest = &l[i..];
                let s = rest.split(" in ").nth(1)?.split(' ').next()?;
                s.parse::<f64>().ok()
            })
            .unwrap_or(f64::NAN);
        let cpu = err
            .lines()
            .find(|l| l.starts_with("CPU_S="))
            .unwrap_or("")
            .to_string();
        eprintln!(
            "ours ({transfer}): whole {secs:.2} s, stream {stream:.2} s, {:.1} MiB/s, {cpu}, max RSS {} MiB",
            mib as f64 / stream,
            rss / 1024
        );
        (secs, stream, rss)
    };

    // Alternate the two, three rounds, and take the best of each: the machine is shared.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut base = f64::MAX;
    let (mut total_none, mut stream_none, mut rss_none) = (f64::MAX, f64::MAX, 0);
    for r in 0..rounds {
        base = base.min(openssh(&format!("round {}", r + 1)));
        let (t, s, m) = ours("none", true);
        total_none = total_none.min(t);
        stream_none = stream_none.min(s);
        rss_none = rss_none.max(m);
    }
    let (total_zstd, stream_zstd, rss_zstd) = ours("zstd", true);
    let (again, _, rss_again) = ours("none", false);

    println!(
        "image: {mib} MiB of incompressible data, loopback sshd, best of {rounds} alternating runs"
    );
    println!(
        "openssh cat|ssh|dd:           {base:.2} s  {:.1} MiB/s",
        mib as f64 / base
    );
    println!(
        "ours --transfer none: stream {stream_none:.2} s {:.1} MiB/s -> ratio {:.2}; whole command {total_none:.2} s (hash, API, verify incl.); max RSS {} MiB",
        mib as f64 / stream_none,
        base / stream_none,
        rss_none / 1024
    );
    println!(
        "ours --transfer zstd: stream {stream_zstd:.2} s {:.1} MiB/s -> ratio {:.2}; whole command {total_zstd:.2} s; max RSS {} MiB",
        mib as f64 / stream_zstd,
        base / stream_zstd,
        rss_zstd / 1024
    );
    println!(
        "re-upload of the same image (reused): {again:.2} s, max RSS {} MiB",
        rss_again / 1024
    );
}
