//! qcow2 images through qemu-img: read the header first (`qemu-img info`), refuse an image that names other files, then convert it to raw.
//!
//! A qcow2 header can name a backing file or an external data file, and `qemu-img convert`
//! reads them: a crafted image would carry any file the user can read (the hcloud CLI's
//! configuration with its token) into the snapshot. So the header is read without probing
//! (`-f qcow2`) and without opening those files, and the image is refused when it names any;
//! the conversion then opens the same file (pinned by an open descriptor) with its backing chain
//! cut (`"backing": null`), in case the file changed in between.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::outside::one_line;

/// Largest virtual size accepted: larger than the disk of any Hetzner server.
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 40;
/// Largest `qemu-img info` output read (a plain image's is about 1 KiB).
pub(crate) const MAX_INFO_BYTES: usize = 1 << 20;
/// How long `qemu-img info` may take.
const INFO_TIMEOUT: Duration = Duration::from_secs(60);

/// What `qemu-img info --output=json` says about an image, as far as the uploader cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageInfo {
    pub(crate) format: String,
    pub(crate) virtual_size: u64,
    /// The backing file the header names (`<unnamed>` when only a format is given).
    pub(crate) backing_file: Option<String>,
    /// The external data file the header names.
    pub(crate) data_file: Option<String>,
    pub(crate) encrypted: bool,
    /// Names of the image's child nodes other than its own `file`.
    pub(crate) other_children: Vec<String>,
}

fn string_of(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Reads `qemu-img info --output=json`. Errors are one line and never quote the document.
pub(crate) fn parse_info(json: &[u8]) -> Result<ImageInfo, String> {
    if json.len() > MAX_INFO_BYTES {
        return Err(format!(
            "qemu-img info printed more than {MAX_INFO_BYTES} bytes"
        ));
    }
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| format!("qemu-img info printed something that is not JSON ({e})"))?;
    let Some(top) = v.as_object() else {
        return Err("qemu-img info printed JSON that is not an object".to_string());
    };
    let format = top
        .get("format")
        .and_then(Value::as_str)
        .ok_or("qemu-img info names no format")?
        .to_string();
    let virtual_size = top
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or("qemu-img info gives no virtual size (a whole number of bytes)")?;
    let backing_file = ["full-backing-filename", "backing-filename"]
        .iter()
        .find_map(|k| top.get(*k).and_then(string_of))
        .or_else(|| {
            ["backing-filename-format", "backing-image"]
                .iter()
                .find_map(|k| top.get(*k).and_then(string_of))
                .map(|_| "<unnamed>".to_string())
        });
    let data = top.get("format-specific").and_then(|f| f.get("data"));
    let data_file = data.and_then(|d| d.get("data-file")).and_then(string_of);
    let encrypted = top.get("encrypted").and_then(Value::as_bool) == Some(true)
        || data
            .and_then(|d| d.get("encrypt"))
            .is_some_and(|e| !e.is_null());
    let other_children = match top.get("children") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(cs)) => cs
            .iter()
            .map(|c| c.get("name").and_then(Value::as_str).unwrap_or("<unnamed>"))
            .filter(|n| *n != "file")
            .map(str::to_string)
            .collect(),
        Some(_) => return Err("qemu-img info lists children that are not a list".to_string()),
    };
    Ok(ImageInfo {
        format,
        virtual_size,
        backing_file,
        data_file,
        encrypted,
        other_children,
    })
}

/// Whether the image may be converted: the expected format, nothing outside the file itself,
/// not encrypted, and of a size a server's disk can hold. The error says why not, on one line.
pub(crate) fn check(info: &ImageInfo, expected: &str) -> Result<(), String> {
    let quoted = |s: &str| format!("'{}'", one_line(s, 200));
    if info.format != expected {
        return Err(format!(
            "the image is not a {expected} image (qemu-img reads it as {})",
            quoted(&info.format)
        ));
    }
    if let Some(b) = &info.backing_file {
        return Err(format!(
            "the image names a backing file ({}) that qemu-img would read into the snapshot: refused; if it belongs to the image, flatten it first (qemu-img convert -O raw IMAGE flat.raw) and upload the result",
            quoted(b)
        ));
    }
    if let Some(d) = &info.data_file {
        return Err(format!(
            "the image keeps its data in an external data file ({}) that qemu-img would read into the snapshot: refused; if it belongs to the image, convert it to raw first and upload the result",
            quoted(d)
        ));
    }
    if let Some(c) = info.other_children.first() {
        return Err(format!(
            "the image opens another file besides itself (its {} node): refused; convert it to raw first and upload the result",
            quoted(c)
        ));
    }
    if info.encrypted {
        return Err(
            "the image is encrypted: decrypt it first (qemu-img convert with its key) and upload the result"
                .to_string(),
        );
    }
    if info.virtual_size > MAX_VIRTUAL_SIZE {
        return Err(format!(
            "the image claims a disk of {} bytes, larger than 1 TiB (no Hetzner server has a disk that large): refused",
            info.virtual_size
        ));
    }
    Ok(())
}

/// What a program printed, each stream cut at its bound.
struct Printed {
    success: bool,
    stdout: Vec<u8>,
    stderr: String,
}

/// Reads a pipe on a thread: at most `max + 1` bytes kept, the rest drained so that the program
/// never blocks on a full pipe.
fn collect(
    pipe: Option<impl Read + Send + 'static>,
    max: usize,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = (&mut p).take(max as u64 + 1).read_to_end(&mut buf);
            let _ = std::io::copy(&mut p, &mut std::io::sink());
        }
        buf
    })
}

/// Runs qemu-img, killed after `timeout`; of its stdout at most `max_stdout + 1` bytes are kept
/// (more than `max_stdout` tells the reader that it ran over).
fn run_bounded(
    cmd: &mut Command,
    max_stdout: usize,
    timeout: Option<Duration>,
) -> anyhow::Result<Printed> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run qemu-img: {e}; install qemu-utils"))?;
    let stdout = collect(child.stdout.take(), max_stdout);
    let stderr = collect(child.stderr.take(), 64 * 1024);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let mut stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
    if let (None, Some(t)) = (status, timeout) {
        stderr = format!("qemu-img did not finish within {}s", t.as_secs());
    }
    Ok(Printed {
        success: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    })
}

/// Checks the qcow2 image at `path` and converts it to a raw file at `raw`.
pub(crate) fn convert_to_raw(path: &Path, raw: &Path) -> anyhow::Result<()> {
    // One open file for both runs: the header checked is the header converted.
    let file =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read the image: {e}"))?;
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| anyhow::anyhow!("cannot hand the image to qemu-img: {e}"))?;
    let pinned = format!("/dev/fd/{}", file.as_raw_fd());
    let info = run_bounded(
        Command::new("qemu-img").args(["info", "--output=json", "-f", "qcow2", &pinned]),
        MAX_INFO_BYTES,
        Some(INFO_TIMEOUT),
    )?;
    if !info.success {
        anyhow::bail!(
            "the image is not a qcow2 image qemu-img can read: {}",
            one_line(
                info.stderr.lines().last().unwrap_or("qemu-img info failed"),
                300
            )
        );
    }
    let parsed = parse_info(&info.stdout).map_err(anyhow::Error::msg)?;
    check(&parsed, "qcow2").map_err(anyhow::Error::msg)?;
    let source = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": pinned},
    });
    let out = run_bounded(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(format!("json:{source}"))
            .arg(raw),
        64 * 1024,
        None,
    )?;
    drop(file);
    if !out.success {
        anyhow::bail!(
            "qemu-img could not convert the image to raw: {}",
            one_line(out.stderr.lines().last().unwrap_or("no message"), 300)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = r#"{"children":[{"name":"file","info":{"children":[],"virtual-size":197120,"filename":"plain.qcow2","format":"file","actual-size":200704,"format-specific":{"type":"file","data":{}},"dirty-flag":false}}],"virtual-size":1048576,"filename":"plain.qcow2","cluster-size":65536,"format":"qcow2","actual-size":200704,"format-specific":{"type":"qcow2","data":{"compat":"1.1","compression-type":"zlib","lazy-refcounts":false,"refcount-bits":16,"corrupt":false,"extended-l2":false}},"dirty-flag":false}"#;

    fn with(key: &str, value: Value) -> Vec<u8> {
        let mut v: Value = serde_json::from_str(PLAIN).unwrap();
        v[key] = value;
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_plain_qcow2_passes() {
        let i = parse_info(PLAIN.as_bytes()).unwrap();
        assert_eq!(i.format, "qcow2");
        assert_eq!(i.virtual_size, 1 << 20);
        assert_eq!(i.backing_file, None);
        assert!(i.other_children.is_empty());
        assert!(check(&i, "qcow2").is_ok());
    }

    #[test]
    fn what_names_other_files_is_refused() {
        let i = parse_info(&with(
            "backing-filename",
            "/home/u/.config/hcloud/cli.toml".into(),
        ))
        .unwrap();
        let e = check(&i, "qcow2").unwrap_err();
        assert!(
            e.contains("backing file ('/home/u/.config/hcloud/cli.toml')"),
            "{e}"
        );
        let i = parse_info(&with("backing-filename-format", "raw".into())).unwrap();
        assert_eq!(i.backing_file.as_deref(), Some("<unnamed>"));
        let mut v: Value = serde_json::from_str(PLAIN).unwrap();
        v["format-specific"]["data"]["data-file"] = "/etc/shadow".into();
        let i = parse_info(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(
            check(&i, "qcow2")
                .unwrap_err()
                .contains("external data file")
        );
        let i = parse_info(&with(
            "children",
            serde_json::json!([{"name": "file"}, {"name": "data-file"}]),
        ))
        .unwrap();
        assert!(check(&i, "qcow2").unwrap_err().contains("'data-file'"));
        let i = parse_info(&with("encrypted", true.into())).unwrap();
        assert!(check(&i, "qcow2").unwrap_err().contains("encrypted"));
        let i = parse_info(&with("virtual-size", (3u64 << 40).into())).unwrap();
        assert!(
            check(&i, "qcow2")
                .unwrap_err()
                .contains("larger than 1 TiB")
        );
        let i = parse_info(&with("format", "vmdk".into())).unwrap();
        assert!(
            check(&i, "qcow2")
                .unwrap_err()
                .contains("not a qcow2 image")
        );
    }

    #[test]
    fn a_hostile_name_stays_on_one_line() {
        let i = parse_info(&with("backing-filename", "a\nb\x1b[2Jc".into())).unwrap();
        let e = check(&i, "qcow2").unwrap_err();
        assert!(!e.contains('\n') && !e.contains('\x1b'), "{e:?}");
    }

    #[test]
    fn broken_documents_are_one_line_errors() {
        for doc in [
            "",
            "[]",
            "{}",
            r#"{"format":"qcow2"}"#,
            r#"{"format":"qcow2","virtual-size":-1}"#,
            "{\"format\":\n",
        ] {
            let e = parse_info(doc.as_bytes()).unwrap_err();
            assert!(!e.contains('\n'), "{e:?}");
        }
        assert!(
            parse_info(&vec![b' '; MAX_INFO_BYTES + 1])
                .unwrap_err()
                .contains("more than")
        );
    }
}
