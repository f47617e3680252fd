//! Writing files that other programs read: atomically (temporary file, fsync, rename), with a mode
//! that does not depend on the umask, never through a symlink someone else planted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How many unpredictable names a temporary file tries before giving up (each one already taken
/// means someone is filling the directory with guesses).
const TEMPORARY_ATTEMPTS: usize = 16;

/// Writes `contents` to `path` so that readers see either the old file or the whole new one.
///
/// The temporary file beside it has an unpredictable name and is created afresh (`O_EXCL`,
/// `O_NOFOLLOW`): in a directory another account can write (node-exporter's textfile directory),
/// a symlink planted there is never followed, so no other file is truncated, written or chmod-ed.
/// It is root's alone while it is written, and gets exactly `mode` (whatever the umask) before it
/// takes `path`'s place; a symlink at `path` itself is replaced, not followed.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let (mut file, tmp) = create_temporary(dir, &name.to_string_lossy())?;
    let result = (|| {
        file.write_all(contents)?;
        // Through the open file: the name could have been replaced meanwhile.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Removes a name only; whatever stands there now is not followed.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A new file `.<name>.tmp-<random>` in `dir`, created exclusively (never an existing file or a
/// symlink), readable by its owner only.
fn create_temporary(dir: &Path, name: &str) -> io::Result<(File, PathBuf)> {
    let mut last = None;
    for _ in 0..TEMPORARY_ATTEMPTS {
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", fastrand::u64(..)));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name")))
}

/// Opens `path` for writing, creating it if it is missing, as a regular file of mode 0600
/// exactly (also when an earlier run left it with another mode, or under another umask). A
/// symlink is not followed.
pub(crate) fn open_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Makes a rename or removal in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents with exactly `mode`, whatever the umask (the existing
/// ones are left as they are).
pub(crate) fn create_dir_all_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all_mode(parent, mode)?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        // Through the directory itself: a symlink put in its place meanwhile is not followed.
        Ok(()) => OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(dir)?
            .set_permissions(fs::Permissions::from_mode(mode)),
        // Made by someone else meanwhile: theirs, as it is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_whole_file_with_exact_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "old").unwrap();
        write_atomic(&path, b"new contents", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new contents");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // A mode the umask would take bits from is given exactly.
        write_atomic(&path, b"shared", 0o664).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o664);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    }

    #[test]
    fn failure_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails.
        let target = dir.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), "x").unwrap();
        assert!(write_atomic(&target, b"data", 0o644).is_err());
        assert!(target.join("inside").exists());
        let count = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count, 1, "temporary file left behind");
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("file");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        write_atomic(&path, b"new", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
    }

    #[test]
    fn temporary_names_are_unpredictable_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, a) = create_temporary(dir.path(), "x").unwrap();
        let (_, b) = create_temporary(dir.path(), "x").unwrap();
        assert_ne!(a, b);
        // An existing name (or a symlink standing there) is never opened.
        let planted = dir.path().join("planted");
        std::os::unix::fs::symlink("/nonexistent", &planted).unwrap();
        let e = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&planted)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn private_files_are_0600_whatever_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        open_private(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        open_private(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        // Not through a symlink, and not a directory.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_private(&link).is_err());
        assert!(open_private(dir.path()).is_err());
    }

    #[test]
    fn directories_get_exactly_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        // Group-writable: a umask of 022 would take that bit.
        create_dir_all_mode(&deep, 0o770).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = fs::metadata(dir.path().join(d)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o770, "{d}");
        }
        // Existing ones are left alone.
        fs::set_permissions(dir.path().join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_all_mode(&deep.join("d"), 0o700).unwrap();
        assert_eq!(
            fs::metadata(dir.path().join("a")).unwrap().mode() & 0o777,
            0o755
        );
        create_dir_all_mode(&deep, 0o700).unwrap();
    }
}
