//! What a local user (`nobody` here, through `setpriv`) can do to the agent: nothing. A process
//! of theirs whose command line reads `fh apply nixos`, or a hold of theirs on NixOS's switch
//! lock, does not hold deploys up; the apply lock stays root-only whatever umask made it; an
//! atomic write into a directory they own never follows a symlink they planted.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::agent::helpers::str_at;
use harness::agent::{Kind, Options};
use harness::bench;

/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// `setpriv` as `nobody` (no supplementary groups) in front of `argv`.
fn as_nobody(argv: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.extend(argv.iter().map(|s| s.to_string()));
    all
}

/// Root and setpriv (util-linux), or `false` after `SKIP` (a failure under `CI=true`).
fn can_switch_users(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        "needs root (to act as nobody)"
    } else if !harness::on_path("setpriv") {
        "needs setpriv (util-linux)"
    } else {
        return true;
    };
    harness::skip(test, why)
}

/// Lets `nobody` reach what lies under `dir` (a test's temporary directory is root-only).
fn open_to_others(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Waits (up to 10 s) until `lock` is held by someone: a shared lock cannot be had.
fn wait_until_locked(lock: &Path) {
    use nix::fcntl::{Flock, FlockArg};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let file = std::fs::File::open(lock).unwrap();
        if let Err((_, nix::errno::Errno::EWOULDBLOCK)) =
            Flock::lock(file, FlockArg::LockSharedNonblock)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nobody never took {}",
            lock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn an_fh_apply_command_line_of_another_user_does_not_hold_deploys_up() {
    if !can_switch_users("fh_apply_of_nobody") {
        return;
    }
    let b = bench!("fh_apply_of_nobody");
    // What anyone can run: a process whose argv reads `fh apply nixos`, for as long as it likes.
    let argv = as_nobody(&[
        "/bin/bash",
        "-c",
        "sleep 120; true",
        "fh",
        "apply",
        "nixos",
        "acme/infra/0.1",
    ]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let squatter = b.spawn_in_namespace(&argv);
    let (v1, p1) = b.release(1, Kind::Normal);
    // Give the squatter's bash time to start in the namespace.
    std::thread::sleep(Duration::from_millis(500));
    let run = b.once();
    stop(squatter);
    assert!(run.ok(), "{}", run.all());
    assert_eq!(str_at(&b.state(), "/running/version"), v1, "{}", run.all());
    assert_eq!(b.current_system(), p1);
}

#[test]
fn a_switch_lock_held_by_another_user_does_not_hold_deploys_up() {
    if !can_switch_users("switch_lock_of_nobody") {
        return;
    }
    let b = bench!("switch_lock_of_nobody");
    // As on NixOS: /run/nixos is open to everyone, and switch-to-configuration leaves its lock
    // file 0644 behind (root's umask 022).
    open_to_others(&b.root);
    let lock = b.path("switch-to-configuration.lock");
    std::fs::write(&lock, "").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Anyone who can read the file can hold a lock on it, for as long as they like.
    let lock_arg = lock.display().to_string();
    let argv = as_nobody(&["flock", "--exclusive", &lock_arg, "sleep", "120"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let holder = b.spawn_in_namespace(&argv);
    wait_until_locked(&lock);
    let (v1, p1) = b.release(1, Kind::Normal);
    let run = b.once();
    stop(holder);
    assert!(run.ok(), "{}", run.all());
    assert_eq!(str_at(&b.state(), "/running/version"), v1, "{}", run.all());
    assert_eq!(b.current_system(), p1);
}

#[test]
fn a_switch_lock_held_by_root_still_holds_deploys_up() {
    let b = bench!("switch_lock_of_root", Options::default());
    let lock = b.path("switch-to-configuration.lock");
    std::fs::write(&lock, "").unwrap();
    let lock_arg = lock.display().to_string();
    let holder = b.spawn_in_namespace(&["flock", "--exclusive", &lock_arg, "sleep", "120"]);
    wait_until_locked(&lock);
    b.release(1, Kind::Normal);
    let run = b.once();
    stop(holder);
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout
            .starts_with("waiting: someone is running switch-to-configuration"),
        "{}",
        run.all()
    );
    assert!(b.fh_runs().is_empty());
}

#[test]
fn retry_under_umask_022_leaves_a_root_only_apply_lock() {
    if !can_switch_users("apply_lock_mode") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    open_to_others(dir.path());
    // The run directory as systemd's RuntimeDirectory= makes it by default: 0755.
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    open_to_others(&run_dir);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[paths]\nstate_dir = \"{}\"\nrun_dir = \"{}\"\n",
            dir.path().join("state").display(),
            run_dir.display()
        ),
    )
    .unwrap();
    // An operator's shell: umask 022.
    let out = Command::new("/bin/sh")
        .args(["-c", "umask 022; exec \"$0\" retry --config \"$1\""])
        .arg(harness::binary())
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "retry: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = run_dir.join("apply.lock");
    let meta = std::fs::metadata(&lock).unwrap();
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.mode() & 0o777, 0o600, "the apply lock's mode");
    // So nobody can hold it (which would stop every deploy).
    let lock_arg = lock.display().to_string();
    let argv = as_nobody(&["flock", "--nonblock", "--exclusive", &lock_arg, "true"]);
    let taken = Command::new(&argv[0])
        .args(&argv[1..])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!taken.success(), "nobody could lock the apply lock");

    // A lock file an earlier agent left 0644 is made root-only too.
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(harness::binary())
        .args(["retry", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::metadata(&lock).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn an_atomic_write_never_follows_a_symlink_another_user_planted() {
    if !can_switch_users("atomic_write_symlink") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    open_to_others(dir.path());
    // A file of root's that nobody may touch.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    // node-exporter's textfile directory: another account owns it.
    let textfile_dir = dir.path().join("textfile");
    std::fs::create_dir(&textfile_dir).unwrap();
    open_to_others(&textfile_dir);
    nix::unistd::chown(
        &textfile_dir,
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .unwrap();
    let target = textfile_dir.join("hcloud-nixos.prom");
    // That account plants symlinks to the victim at every name it can guess: the file itself,
    // and the temporary name an earlier version used (`.NAME.tmp-<PID>`).
    let guesses = [
        target.clone(),
        textfile_dir.join(format!(".hcloud-nixos.prom.tmp-{}", std::process::id())),
    ];
    for guess in &guesses {
        let argv = as_nobody(&[
            "ln",
            "-s",
            victim.to_str().unwrap(),
            guess.to_str().unwrap(),
        ]);
        let ok = Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .unwrap()
            .success();
        assert!(ok, "nobody could not plant {}", guess.display());
    }

    hcloud_nixos::plumbing::files::write_atomic(&target, b"hcloud_nixos_up 1\n", 0o644).unwrap();

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(
        std::fs::metadata(&victim).unwrap().mode() & 0o777,
        0o600,
        "the victim's mode"
    );
    let written = std::fs::symlink_metadata(&target).unwrap();
    assert!(written.is_file(), "the metrics file is a file of its own");
    assert_eq!(written.uid(), 0);
    assert_eq!(written.mode() & 0o777, 0o644);
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hcloud_nixos_up 1\n"
    );
    // Nothing else of ours is left in the directory (the planted guess is nobody's own).
    let ours: Vec<String> = std::fs::read_dir(&textfile_dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.metadata().unwrap().uid() == 0 && e.path() != target)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ours.is_empty(), "left behind: {ours:?}");
}
