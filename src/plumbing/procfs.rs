//! Other processes as /proc shows them: who runs one, its command line, who holds a lock. What a
//! local user controls (a command line) is never enough to count as root's.

use std::path::Path;

/// The real and effective user of `pid` (from `/proc/PID/status`, which a process cannot make
/// lie: the owner of `/proc/PID` itself turns to root when a process makes itself non-dumpable).
fn users(pid: u32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|n| n.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// Does `pid` run as `uid` (its real and its effective user)? A process that is gone, or whose
/// status cannot be read, does not.
pub(crate) fn runs_as(pid: u32, uid: u32) -> bool {
    users(pid) == Some((uid, uid))
}

/// Does `pid` run as root (real and effective user)?
pub(crate) fn runs_as_root(pid: u32) -> bool {
    runs_as(pid, 0)
}

/// The NUL-separated command line of `pid` (empty for a kernel thread or a process that is gone).
pub(crate) fn cmdline(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// Every process this /proc shows.
pub(crate) fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Who holds the lock on `path` that keeps a shared lock from it, as `/proc/locks` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Holders {
    /// Processes of root's among the holders (their PIDs).
    Root(Vec<u32>),
    /// Only other users' processes hold it.
    Others,
    /// /proc/locks does not say (no entry for the file, a holder this PID namespace cannot
    /// see, an open file description lock): count it as root's.
    Unknown,
}

/// Who holds locks on `path` (flock or POSIX), by `/proc/locks`.
pub(crate) fn lock_holders(path: &Path) -> Holders {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Holders::Unknown;
    };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let wanted = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let pids = holders_in(&locks, &wanted);
    let root: Vec<u32> = pids
        .iter()
        .filter_map(|p| u32::try_from(*p).ok())
        .filter(|p| runs_as_root(*p))
        .collect();
    if !root.is_empty() {
        Holders::Root(root)
    } else if pids.is_empty() || pids.iter().any(|p| *p <= 0) {
        // 0: a process outside this PID namespace; -1: an open file description lock.
        Holders::Unknown
    } else {
        Holders::Others
    }
}

/// The PIDs of the locks on `file` (`MAJOR:MINOR:INODE`, as /proc/locks writes it) in `locks`.
fn holders_in(locks: &str, file: &str) -> Vec<i64> {
    locks
        .lines()
        // `1: FLOCK  ADVISORY  WRITE 1234 00:19:123 0 EOF`; a process waiting for the lock has
        // `->` after the number, and holds nothing.
        .filter(|line| !line.contains("->"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == file)?;
            fields.get(at.checked_sub(1)?)?.parse::<i64>().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_as_root_when_the_tests_do() {
        let me = std::process::id();
        assert_eq!(
            runs_as_root(me),
            nix::unistd::getuid().is_root() && nix::unistd::geteuid().is_root()
        );
        assert!(!runs_as_root(u32::MAX), "a process that does not exist");
        assert!(pids().contains(&me));
        assert!(!cmdline(me).is_empty());
    }

    #[test]
    fn reads_holders_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 1234 00:19:4711 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 999 00:19:4711 0 EOF\n\
                     2: POSIX  ADVISORY  READ 77 fd:01:4711 0 EOF\n\
                     3: OFDLCK ADVISORY  WRITE -1 00:19:42 0 EOF\n";
        assert_eq!(holders_in(locks, "00:19:4711"), vec![1234]);
        assert_eq!(holders_in(locks, "fd:01:4711"), vec![77]);
        assert_eq!(holders_in(locks, "00:19:42"), vec![-1]);
        assert!(holders_in(locks, "00:19:1").is_empty());
    }

    #[test]
    fn a_lock_of_this_process_is_held_by_root_when_the_tests_run_as_root() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        std::fs::write(&path, "").unwrap();
        let held =
            Flock::lock(std::fs::File::open(&path).unwrap(), FlockArg::LockExclusive).unwrap();
        let holders = lock_holders(&path);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(holders, Holders::Root(vec![std::process::id()]));
        } else {
            assert_eq!(holders, Holders::Others);
        }
        drop(held);
        assert_eq!(lock_holders(&path), Holders::Unknown, "nobody holds it now");
    }
}
