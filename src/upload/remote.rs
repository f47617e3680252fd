//! The shell scripts the rescue system runs: discard, write, download, verify. Pure string building.

use super::source::Codec;

/// Quotes a string for a POSIX shell.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Wraps a script so that it runs in bash with `errexit`, `nounset` and `pipefail`.
pub(crate) fn wrap(script: &str) -> String {
    format!("bash -c {}", quote(&format!("set -euo pipefail\n{script}")))
}

/// Empties the target: `blkdiscard` on a block device, truncation on a regular file (tests).
/// Prints `sparse` when the target reads as zeros afterwards (so zero blocks may be skipped), else `dense`.
pub(crate) fn discard(device: &str) -> String {
    wrap(&format!(
        r#"dev={dev}
if [ -b "$dev" ]; then
  if blkdiscard -f "$dev" >/dev/null 2>&1; then echo sparse; else echo dense; fi
elif [ -f "$dev" ]; then
  : > "$dev"; echo sparse
else
  echo "the target $dev is neither a block device nor a file" >&2; exit 3
fi"#,
        dev = quote(device)
    ))
}

/// The command that turns a compressed stream on stdin into raw bytes on stdout.
pub(crate) fn decompressor(c: Codec) -> Option<&'static str> {
    match c {
        Codec::Zstd => Some("zstd -dc"),
        Codec::Xz => Some("xz -dc -T0"),
        Codec::Bz2 => Some("bzip2 -dc"),
        Codec::Plain => None,
    }
}

fn dd(device: &str, sparse: bool) -> String {
    format!(
        "dd of={} bs=4M iflag=fullblock{} status=none",
        quote(device),
        if sparse { " conv=sparse" } else { "" }
    )
}

/// Writes stdin (compressed as `c`) to the device. `verify` flushes it to the disk afterwards.
pub(crate) fn write_stdin(device: &str, c: Codec, sparse: bool) -> String {
    let pipe = match decompressor(c) {
        Some(d) => format!("{d} | {}", dd(device, sparse)),
        None => dd(device, sparse),
    };
    wrap(&pipe)
}

/// Downloads a URL on the rescue system and writes it to the device. Prints `sha256=<hex> size=<n>`
/// of the raw stream as it went into `dd`.
pub(crate) fn write_url(device: &str, url: &str, c: Codec, sparse: bool) -> String {
    let decomp = decompressor(c)
        .map(|d| format!(" | {d}"))
        .unwrap_or_default();
    wrap(&format!(
        r#"t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
mkfifo "$t/h" "$t/n"
sha256sum < "$t/h" > "$t/sum" & hp=$!
wc -c < "$t/n" > "$t/size" & np=$!
curl -fsSL --retry 3 --connect-timeout 20 {url}{decomp} | tee "$t/h" "$t/n" | {dd}
wait $hp; wait $np
echo "sha256=$(cut -d' ' -f1 "$t/sum") size=$(tr -d ' ' < "$t/size")""#,
        url = quote(url),
        dd = dd(device, sparse),
    ))
}

/// Flushes what was written to the disk, then prints the SHA-256 of the device's first `size` bytes.
pub(crate) fn verify(device: &str, size: u64) -> String {
    wrap(&format!(
        "sync\nhead -c {size} {} | sha256sum | cut -d' ' -f1",
        quote(device)
    ))
}

/// Reads `sha256=<hex> size=<n>` from `write_url`'s output.
pub(crate) fn parse_url_result(stdout: &str) -> Option<(String, u64)> {
    let line = stdout.lines().rev().find(|l| l.starts_with("sha256="))?;
    let mut hash = None;
    let mut size = None;
    for part in line.split_whitespace() {
        if let Some(h) = part.strip_prefix("sha256=") {
            hash = Some(h.to_string());
        } else if let Some(n) = part.strip_prefix("size=") {
            size = n.parse().ok();
        }
    }
    let hash = hash?;
    (hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit())).then_some((hash, size?))
}

/// Reads a bare hex SHA-256 from `verify`'s output.
pub(crate) fn parse_hash(stdout: &str) -> Option<String> {
    let h = stdout.trim();
    (h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit())).then(|| h.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(cmd: &str) -> std::process::Output {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .unwrap()
    }

    #[test]
    fn quoting_survives_the_shell() {
        let tricky = "a 'b' $c `d` \"e\"";
        let out = sh(&format!("printf %s {}", quote(tricky)));
        assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
    }

    #[test]
    fn pipefail_fails_the_pipe() {
        // The decompressor fails on garbage; dd alone would succeed.
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("disk");
        std::fs::write(&dev, b"").unwrap();
        let cmd = write_stdin(dev.to_str().unwrap(), Codec::Xz, true);
        let out = sh(&format!("echo garbage | {cmd}"));
        assert!(!out.status.success());
    }

    #[test]
    fn scripts_write_and_verify_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("disk 1");
        std::fs::write(&dev, b"old contents").unwrap();
        let d = dev.to_str().unwrap();
        let out = sh(&discard(d));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sparse");
        let out = sh(&format!(
            "printf 'hello' | {}",
            write_stdin(d, Codec::Plain, true)
        ));
        assert!(out.status.success(), "{out:?}");
        let out = sh(&verify(d, 5));
        assert_eq!(
            parse_hash(&String::from_utf8_lossy(&out.stdout)).unwrap(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn parse_outputs() {
        let h = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(
            parse_url_result(&format!("noise\nsha256={h} size=5\n")),
            Some((h.to_string(), 5))
        );
        assert_eq!(parse_url_result("sha256= size=5"), None);
        assert_eq!(parse_hash(&format!("{h}\n")), Some(h.to_string()));
        assert_eq!(parse_hash("nope"), None);
    }

    #[test]
    fn missing_target_is_an_error() {
        let out = sh(&discard("/nonexistent/disk"));
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("neither"));
    }
}
