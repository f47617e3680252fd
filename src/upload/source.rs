//! The image to upload: where it is, how it is compressed and formatted, how it is read and hashed.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// How an image file is compressed, as `--compression` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Compression {
    /// Detect from the file's first bytes, or a URL's name.
    Auto,
    None,
    Zstd,
    Xz,
    Bz2,
}

/// A compression once settled: never "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    Plain,
    Zstd,
    Xz,
    Bz2,
}

impl Compression {
    /// The codec the flag names; `None` for `auto`, which the file or URL settles.
    fn given(self) -> Option<Codec> {
        match self {
            Compression::Auto => None,
            Compression::None => Some(Codec::Plain),
            Compression::Zstd => Some(Codec::Zstd),
            Compression::Xz => Some(Codec::Xz),
            Compression::Bz2 => Some(Codec::Bz2),
        }
    }
}

/// The disk image format, as `--format` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Detect from the (decompressed) first bytes, or a URL's name.
    Auto,
    Raw,
    Qcow2,
}

/// A disk image format once settled: never "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiskFormat {
    Raw,
    Qcow2,
}

impl Format {
    /// The format the flag names; `None` for `auto`.
    fn given(self) -> Option<DiskFormat> {
        match self {
            Format::Auto => None,
            Format::Raw => Some(DiskFormat::Raw),
            Format::Qcow2 => Some(DiskFormat::Qcow2),
        }
    }
}

/// How the local image travels over SSH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Transfer {
    /// Compressed with zstd on all cores, decompressed by the rescue system.
    Zstd,
    /// As raw bytes.
    None,
}

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    Path(PathBuf),
    Url(String),
}

/// Tells a URL from a local path.
pub(crate) fn parse_location(arg: &str) -> Location {
    let lower = arg.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        Location::Url(arg.to_string())
    } else {
        Location::Path(PathBuf::from(arg))
    }
}

/// The compression a file starts with, from its magic bytes.
pub(crate) fn compression_from_magic(head: &[u8]) -> Codec {
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Codec::Zstd
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Codec::Xz
    } else if head.starts_with(b"BZh") {
        Codec::Bz2
    } else {
        Codec::Plain
    }
}

/// The compression a file or URL name suggests (query strings ignored).
pub(crate) fn compression_from_name(name: &str) -> Codec {
    let name = name
        .split(['?', '#'])
        .next()
        .unwrap_or(name)
        .to_ascii_lowercase();
    if name.ends_with(".zst") || name.ends_with(".zstd") {
        Codec::Zstd
    } else if name.ends_with(".xz") {
        Codec::Xz
    } else if name.ends_with(".bz2") {
        Codec::Bz2
    } else {
        Codec::Plain
    }
}

/// What an image's first bytes (or its name) say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniffed {
    Disk(DiskFormat),
    /// A format the uploader does not convert (its name): uploaded as raw, it would not boot.
    Other(&'static str),
}

/// How many decompressed bytes [`format_from_magic`] looks at.
pub(crate) const SNIFF_BYTES: usize = 72;

/// The format the decompressed first bytes show.
pub(crate) fn format_from_magic(head: &[u8]) -> Sniffed {
    const OTHERS: [(&[u8], &str); 8] = [
        (b"KDMV", "VMDK"),
        (b"COWD", "VMDK"),
        (b"# Disk DescriptorFile", "VMDK"),
        (b"vhdxfile", "VHDX"),
        (b"conectix", "VHD"),
        (b"QED\0", "QED"),
        (b"WithoutFreeSpace", "Parallels"),
        (b"WithouFreSpacExt", "Parallels"),
    ];
    if head.starts_with(b"QFI\xfb") {
        return Sniffed::Disk(DiskFormat::Qcow2);
    }
    if let Some((_, name)) = OTHERS.iter().find(|(m, _)| head.starts_with(m)) {
        return Sniffed::Other(name);
    }
    if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return Sniffed::Other("VDI");
    }
    Sniffed::Disk(DiskFormat::Raw)
}

/// The format a name suggests (`disk.qcow2`, `disk.qcow2.xz`, `disk.vmdk`).
pub(crate) fn format_from_name(name: &str) -> Sniffed {
    let name = name
        .split(['?', '#'])
        .next()
        .unwrap_or(name)
        .to_ascii_lowercase();
    let stem = [".zst", ".zstd", ".xz", ".bz2"]
        .iter()
        .find_map(|e| name.strip_suffix(e))
        .unwrap_or(&name);
    let others = [
        (".vmdk", "VMDK"),
        (".vhdx", "VHDX"),
        (".vhd", "VHD"),
        (".vdi", "VDI"),
        (".qed", "QED"),
    ];
    if stem.ends_with(".qcow2") || stem.ends_with(".qcow") {
        Sniffed::Disk(DiskFormat::Qcow2)
    } else if let Some((_, n)) = others.iter().find(|(e, _)| stem.ends_with(e)) {
        Sniffed::Other(n)
    } else {
        Sniffed::Disk(DiskFormat::Raw)
    }
}

/// The error for an image in a format the uploader does not convert.
fn other_format(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the image looks like a {name} image, not a raw or qcow2 disk: convert it first (qemu-img convert -O raw IMAGE disk.raw), or pass --format raw to upload its bytes as they are"
    )
}

/// Settles `auto` for a URL from its name.
pub(crate) fn resolve_url(
    url: &str,
    c: Compression,
    f: Format,
) -> anyhow::Result<(Codec, DiskFormat)> {
    let c = c.given().unwrap_or_else(|| compression_from_name(url));
    let f = match f.given() {
        Some(f) => f,
        None => match format_from_name(url) {
            Sniffed::Disk(f) => f,
            Sniffed::Other(name) => return Err(other_format(name)),
        },
    };
    Ok((c, f))
}

/// A URL or path as messages show it: a URL without its user name, password and query (which may
/// carry credentials), a path as given.
pub(crate) fn display_name(image: &str) -> String {
    match parse_location(image) {
        Location::Path(_) => image.to_string(),
        Location::Url(u) => match reqwest::Url::parse(&u) {
            Ok(mut url) => {
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            }
            Err(_) => u.split(['?', '#']).next().unwrap_or("").to_string(),
        },
    }
}

/// A reader that counts the bytes read from the file underneath, for progress.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn read_head(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut head = vec![0u8; 16];
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    head.truncate(n);
    Ok(head)
}

/// Opens a file and decompresses it on the fly; `count` counts the file's (compressed) bytes.
pub(crate) fn open_decoded(
    path: &Path,
    codec: Codec,
    count: Arc<AtomicU64>,
) -> io::Result<Box<dyn Read + Send>> {
    let file = Counting {
        inner: File::open(path)?,
        count,
    };
    let buffered = |f| BufReader::with_capacity(1 << 20, f);
    Ok(match codec {
        // A raw image is read straight into the pipe's chunks: a buffer would only add a copy.
        Codec::Plain => Box::new(file),
        Codec::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(buffered(file))?),
        Codec::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(buffered(
            file,
        ))),
        Codec::Bz2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered(file))),
    })
}

/// A local image ready to stream: raw once decompressed with `codec`.
pub(crate) struct LocalImage {
    pub(crate) path: PathBuf,
    pub(crate) codec: Codec,
    /// Size of `path` on disk, for progress.
    pub(crate) file_size: u64,
    /// Holds a converted qcow2 image until the upload ends.
    _scratch: Option<tempfile::TempDir>,
}

/// Reads `n` bytes or up to the end.
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Settles compression and format of a local file; converts qcow2 to a sparse raw file with `qemu-img`.
pub(crate) fn prepare_local(
    path: &Path,
    compression: Compression,
    format: Format,
) -> anyhow::Result<LocalImage> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read the image {}: {e}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("the image {} is not a regular file", path.display());
    }
    let head = read_head(path)
        .map_err(|e| anyhow::anyhow!("cannot read the image {}: {e}", path.display()))?;
    let codec = compression
        .given()
        .unwrap_or_else(|| compression_from_magic(&head));
    let shown = path.display().to_string();
    let format = match format.given() {
        Some(f) => f,
        None => {
            let mut r = open_decoded(path, codec, Arc::new(AtomicU64::new(0)))?;
            let mut h = [0u8; SNIFF_BYTES];
            let n = read_full(&mut r, &mut h).map_err(|e| {
                anyhow::anyhow!("cannot decompress {shown} as {codec:?}: {e}; check --compression")
            })?;
            match format_from_magic(&h[..n]) {
                Sniffed::Disk(f) => f,
                Sniffed::Other(name) => return Err(other_format(name)),
            }
        }
    };
    if format == DiskFormat::Raw {
        return Ok(LocalImage {
            path: path.to_path_buf(),
            codec,
            file_size: meta.len(),
            _scratch: None,
        });
    }
    // qcow2: qemu-img needs a seekable file; decompress first when needed, then convert.
    let scratch = tempfile::Builder::new()
        .prefix("hcloud-nixos-upload.")
        .tempdir()?;
    let qcow = if codec == Codec::Plain {
        path.to_path_buf()
    } else {
        let p = scratch.path().join("image.qcow2");
        let mut r = open_decoded(path, codec, Arc::new(AtomicU64::new(0)))?;
        let mut w = File::create(&p)?;
        io::copy(&mut r, &mut w)?;
        p
    };
    let raw = scratch.path().join("image.raw");
    super::qemu::convert_to_raw(&qcow, &raw)?;
    let file_size = std::fs::metadata(&raw)?.len();
    Ok(LocalImage {
        path: raw,
        codec: Codec::Plain,
        file_size,
        _scratch: Some(scratch),
    })
}

/// SHA-256 (hex) and size of the raw image.
pub(crate) fn hash_image(img: &LocalImage, count: Arc<AtomicU64>) -> anyhow::Result<(String, u64)> {
    let mut r = open_decoded(&img.path, img.codec, count)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut r, &mut buf)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", img.path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

/// What tells that a file was written to without reading it: device, inode, size, and the times
/// of its last modification and status change (which every write moves on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The file's stamp now.
pub(crate) fn stamp(path: &Path) -> io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("https://x/y.raw"),
            Location::Url("https://x/y.raw".into())
        );
        assert_eq!(
            parse_location("HTTP://x/y"),
            Location::Url("HTTP://x/y".into())
        );
        assert_eq!(
            parse_location("./disk.raw"),
            Location::Path("./disk.raw".into())
        );
    }

    #[test]
    fn magic() {
        assert_eq!(
            compression_from_magic(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Codec::Zstd
        );
        assert_eq!(compression_from_magic(b"\xfd7zXZ\x00\x00"), Codec::Xz);
        assert_eq!(compression_from_magic(b"BZh91AY"), Codec::Bz2);
        assert_eq!(compression_from_magic(b"\0\0\0\0"), Codec::Plain);
        assert_eq!(compression_from_magic(b""), Codec::Plain);
        let disk = Sniffed::Disk;
        assert_eq!(
            format_from_magic(b"QFI\xfb\0\0\0\x03"),
            disk(DiskFormat::Qcow2)
        );
        assert_eq!(format_from_magic(b"\xeb\x63\x90"), disk(DiskFormat::Raw));
        assert_eq!(format_from_magic(b"KDMV\x01"), Sniffed::Other("VMDK"));
        assert_eq!(format_from_magic(b"vhdxfile"), Sniffed::Other("VHDX"));
        let mut vdi = vec![0u8; 72];
        vdi[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(format_from_magic(&vdi), Sniffed::Other("VDI"));
        assert_eq!(format_from_magic(&vdi[..66]), disk(DiskFormat::Raw));
    }

    #[test]
    fn names() {
        assert_eq!(compression_from_name("a.raw.zst"), Codec::Zstd);
        assert_eq!(compression_from_name("a.img.xz?sig=1"), Codec::Xz);
        assert_eq!(compression_from_name("a.bz2"), Codec::Bz2);
        assert_eq!(compression_from_name("a.raw"), Codec::Plain);
        assert_eq!(
            format_from_name("a.qcow2.xz"),
            Sniffed::Disk(DiskFormat::Qcow2)
        );
        assert_eq!(format_from_name("a.raw.xz"), Sniffed::Disk(DiskFormat::Raw));
        assert_eq!(format_from_name("a.vmdk?x=1"), Sniffed::Other("VMDK"));
        assert_eq!(
            resolve_url("https://h/x.qcow2", Compression::Auto, Format::Auto).unwrap(),
            (Codec::Plain, DiskFormat::Qcow2)
        );
        assert_eq!(
            resolve_url("https://h/x.img", Compression::Xz, Format::Raw).unwrap(),
            (Codec::Xz, DiskFormat::Raw)
        );
        let e = resolve_url(
            "https://u:pw@h/x.vdi?sig=s3cr3t",
            Compression::Auto,
            Format::Auto,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("looks like a VDI image"), "{e}");
        assert!(!e.contains("s3cr3t") && !e.contains("pw"), "{e}");
        assert!(
            resolve_url("https://h/x.vdi", Compression::Auto, Format::Raw).is_ok(),
            "--format raw uploads it as it is"
        );
    }

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    #[test]
    fn hash_of_a_compressed_image_is_of_its_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let p = dir.path().join("img.raw");
        std::fs::write(&p, &data).unwrap();
        let compressed = dir.path().join("img.raw.zst");
        std::fs::write(&compressed, zstd::encode_all(&data[..], 1).unwrap()).unwrap();

        let img = prepare_local(&compressed, Compression::Auto, Format::Auto).unwrap();
        assert_eq!(img.codec, Codec::Zstd);
        let (h, n) = hash_image(&img, Arc::new(AtomicU64::new(0))).unwrap();
        assert_eq!((h.as_str(), n), (sha(&data).as_str(), data.len() as u64));
    }

    #[test]
    fn a_write_changes_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.raw");
        std::fs::write(&p, b"0123456789").unwrap();
        let before = stamp(&p).unwrap();
        assert_eq!(stamp(&p).unwrap(), before);
        // File times move on with the kernel's clock tick: let one pass.
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Same size, same first bytes: only the stamp can tell without reading.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"x", 9).unwrap();
        assert_ne!(stamp(&p).unwrap(), before);
        let moved = dir.path().join("other");
        std::fs::write(&moved, b"0123456789").unwrap();
        std::fs::rename(&moved, &p).unwrap();
        assert_ne!(stamp(&p).unwrap(), before);
    }

    #[test]
    fn bad_compression_flag_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.raw");
        std::fs::write(&p, b"plain bytes, not xz").unwrap();
        let e = prepare_local(&p, Compression::Xz, Format::Auto)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--compression"), "{e}");
    }
}
