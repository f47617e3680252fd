//! Benchmark of `hcloud-nixos upload` against OpenSSH's `cat image | ssh ... dd` over loopback, raw
//! and with zstd, alternating the contenders in one run. Ignored by default; run it with
//! `tests/bench/upload.sh`, which says what the figures mean.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{hcloud_api, rescue_sshd};
use hcloud_api::{HcloudApi, TOKEN};
use rescue_sshd::{RescueSshd, prerequisites_or_skip};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Incompressible data, so neither side profits from compression or sparse writes.
fn write_random_image(path: &Path, mib: u64) {
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

/// A `NAME=U+S` line of GNU time's output, in seconds.
fn cpu_of(err: &str, name: &str) -> f64 {
    err.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .map(|v| {
            v.split('+')
                .filter_map(|x| x.trim().parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(f64::NAN)
}

fn kib_of(err: &str, name: &str) -> u64 {
    err.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('=')?.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs a command, returning (wall seconds, stderr); the run must succeed.
fn timed(cmd: &mut Command) -> (f64, String) {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (secs, err)
}

/// Writes back the previous run's dirty pages and empties the page cache, so that every run
/// reads the image from the disk and starts with nothing to write back.
fn settle() {
    assert!(Command::new("sync").status().unwrap().success());
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .expect("cannot drop the page cache: the benchmark runs as root");
    std::thread::sleep(Duration::from_millis(300));
}

/// One measured run.
#[derive(Clone, Copy, Default)]
struct Run {
    /// Seconds the image took to cross (for OpenSSH: wall time less the round's connect time).
    secs: f64,
    /// CPU seconds on the sending side during the transfer (ours: the stream; OpenSSH: cat or
    /// zstd, and ssh).
    cpu: f64,
    /// CPU seconds of the sending program alone (ours: the whole command, hashing and API
    /// included; OpenSSH: the ssh client).
    cpu_alone: f64,
    rss_kib: u64,
}

struct Setup {
    img: PathBuf,
    disk: PathBuf,
    key: PathBuf,
    dir: PathBuf,
    port: u16,
    endpoint: String,
}

impl Setup {
    fn ssh_args(&self) -> String {
        format!(
            "-p {} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1",
            self.port,
            self.key.display()
        )
    }

    /// The time OpenSSH takes to connect, log in and run nothing.
    fn ssh_connect_secs(&self) -> f64 {
        let (secs, _) = timed(
            Command::new("bash")
                .arg("-c")
                .arg(format!("ssh {} true", self.ssh_args())),
        );
        secs
    }

    fn openssh(&self, zstd: bool, connect: f64) -> Run {
        let (src, sink) = if zstd {
            ("zstd -q -3 -T0 -c", "zstd -dc | dd")
        } else {
            ("cat", "dd")
        };
        let script = format!(
            "{src} {img} | /usr/bin/time -f 'SSH_CPU=%U+%S\nSSH_KIB=%M' ssh {args} '{sink} of={disk} bs=4M iflag=fullblock status=none'",
            img = self.img.display(),
            args = self.ssh_args(),
            disk = self.disk.display()
        );
        settle();
        let (wall, err) = timed(
            Command::new("/usr/bin/time")
                .args(["-f", "ALL_CPU=%U+%S", "bash", "-c"])
                .arg(&script),
        );
        Run {
            secs: (wall - connect).max(0.001),
            cpu: cpu_of(&err, "ALL_CPU"),
            cpu_alone: cpu_of(&err, "SSH_CPU"),
            rss_kib: kib_of(&err, "SSH_KIB"),
        }
    }

    fn ours(&self, bin: &Path, zstd: bool, force: bool) -> Run {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "CPU_S=%U+%S\nMAXRSS_KB=%M"])
            .arg(bin)
            .arg("upload")
            .arg("--image")
            .arg(&self.img)
            .args(["--architecture", "x86", "--transfer"])
            .arg(if zstd { "zstd" } else { "none" })
            .args(["--rescue-ssh-port", &self.port.to_string()])
            .arg("--rescue-device")
            .arg(&self.disk)
            .env("HCLOUD_TOKEN", TOKEN)
            .env("HCLOUD_ENDPOINT", &self.endpoint)
            .env("HOME", &self.dir);
        if force {
            c.arg("--force");
        }
        settle();
        let (wall, err) = timed(&mut c);
        // "streamed N bytes in S s (R MiB/s, C s of CPU)"; older builds print no CPU.
        let streamed = err.lines().find_map(|l| Some(&l[l.find("streamed ")?..]));
        let secs = streamed
            .and_then(|l| l.split(" in ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or(wall);
        let whole = cpu_of(&err, "CPU_S");
        let cpu = streamed
            .and_then(|l| l.split(", ").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN);
        Run {
            secs,
            cpu,
            cpu_alone: whole,
            rss_kib: kib_of(&err, "MAXRSS_KB"),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Best and median throughput (MiB/s), median CPU per GiB (both measures), peak RSS (MiB).
fn summary(runs: &[Run], mib: u64) -> (f64, f64, f64, f64, u64) {
    let rate: Vec<f64> = runs.iter().map(|r| mib as f64 / r.secs).collect();
    let gib = mib as f64 / 1024.0;
    (
        rate.iter().cloned().fold(0.0, f64::max),
        median(rate),
        median(runs.iter().map(|r| r.cpu / gib).collect()),
        median(runs.iter().map(|r| r.cpu_alone / gib).collect()),
        runs.iter().map(|r| r.rss_kib).max().unwrap_or(0) / 1024,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run tests/bench/upload.sh"]
async fn bench_upload_against_openssh() {
    if !prerequisites_or_skip("bench") {
        return;
    }
    let mib = env_num("BENCH_MIB", 1024);
    let rounds = env_num("BENCH_ROUNDS", 5).max(1) as usize;
    let ours_bin = PathBuf::from(env!("CARGO_BIN_EXE_hcloud-nixos"));
    // Another build of the uploader (say, main's) to run alongside: before and after in one run.
    let baseline = std::env::var_os("BENCH_BASELINE_BIN").map(PathBuf::from);
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
    let setup = Setup {
        img: dir.path().join("image.raw"),
        disk: dir.path().join("disk"),
        key,
        dir: dir.path().to_path_buf(),
        port: sshd.port,
        endpoint: api.endpoint(),
    };
    write_random_image(&setup.img, mib);
    std::fs::write(&setup.disk, b"").unwrap();

    // The stand-in API hands the uploader's key to sshd; OpenSSH's key is added beside it.
    let with_openssh_key = || {
        let ours = std::fs::read_to_string(&sshd.authorized_keys).unwrap_or_default();
        let theirs = std::fs::read_to_string(setup.key.with_extension("pub")).unwrap();
        if !ours.contains(theirs.trim()) {
            std::fs::write(&sshd.authorized_keys, format!("{ours}{theirs}")).unwrap();
        }
    };

    // Contenders: 0 OpenSSH, 1 ours, 2 the baseline build; each raw and zstd.
    let names = ["openssh", "ours", "baseline"];
    let mut runs: Vec<[Vec<Run>; 2]> = (0..3).map(|_| [Vec::new(), Vec::new()]).collect();
    let mut connects = Vec::new();
    for round in 0..rounds {
        with_openssh_key();
        let connect = setup.ssh_connect_secs();
        connects.push(connect);
        let mut order: Vec<usize> = vec![0, 1];
        if baseline.is_some() {
            order.push(2);
        }
        // Start with a different contender each round: none always runs first.
        let n = order.len();
        order.rotate_left(round % n);
        for (t, zstd) in [false, true].into_iter().enumerate() {
            for &who in &order {
                let run = match who {
                    0 => {
                        with_openssh_key();
                        setup.openssh(zstd, connect)
                    }
                    1 => setup.ours(&ours_bin, zstd, true),
                    _ => setup.ours(baseline.as_deref().unwrap(), zstd, true),
                };
                eprintln!(
                    "round {} {} {}: {:.2} s, {:.1} MiB/s, CPU {:.2} s ({:.2} s), {} MiB",
                    round + 1,
                    names[who],
                    if zstd { "zstd" } else { "raw" },
                    run.secs,
                    mib as f64 / run.secs,
                    run.cpu,
                    run.cpu_alone,
                    run.rss_kib / 1024
                );
                runs[who][t].push(run);
            }
        }
    }
    let again = setup.ours(&ours_bin, false, false);
    report(&runs, &connects, again, mib, rounds);
}

/// Prints the table and the ratios.
fn report(runs: &[[Vec<Run>; 2]], connects: &[f64], again: Run, mib: u64, rounds: usize) {
    let names = ["openssh", "ours", "baseline"];
    println!(
        "image: {mib} MiB of incompressible data, loopback sshd, {rounds} alternating rounds, page cache dropped before each run"
    );
    println!(
        "OpenSSH's connect and login (median {:.3} s) is taken off its wall time; ours is the streaming phase alone",
        median(connects.to_vec())
    );
    println!(
        "{:<9} {:<5} {:>10} {:>10} {:>13} {:>13} {:>8}",
        "who", "mode", "best MiB/s", "median", "CPU s/GiB", "alone s/GiB", "RSS MiB"
    );
    let mut medians = [[f64::NAN; 2]; 3];
    let mut cpus = [[f64::NAN; 2]; 3];
    for (who, name) in names.iter().enumerate() {
        for (t, mode) in ["raw", "zstd"].iter().enumerate() {
            if runs[who][t].is_empty() {
                continue;
            }
            let (best, med, cpu, alone, rss) = summary(&runs[who][t], mib);
            medians[who][t] = med;
            cpus[who][t] = cpu;
            println!(
                "{name:<9} {mode:<5} {best:>10.1} {med:>10.1} {cpu:>13.2} {alone:>13.2} {rss:>8}"
            );
        }
    }
    println!(
        "CPU s/GiB: sending side during the transfer (ours: the streaming phase, from its own log line; OpenSSH: cat or zstd plus ssh)."
    );
    println!(
        "alone s/GiB: ours the whole command (two reads of the image: hashing before, streaming), OpenSSH the ssh client."
    );
    for (t, mode) in ["raw", "zstd"].iter().enumerate() {
        println!(
            "{mode}: ours/OpenSSH by median {:.2}; CPU per GiB ours/OpenSSH {:.2}",
            medians[1][t] / medians[0][t],
            cpus[1][t] / cpus[0][t]
        );
    }
    println!(
        "re-upload of the same image (reused): {:.2} s, max RSS {} MiB",
        again.secs,
        again.rss_kib / 1024
    );
}
