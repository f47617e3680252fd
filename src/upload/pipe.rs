//! The local image's way to SSH: a reader thread (read, decompress, compress) and a bounded number of reused chunks in flight.
//!
//! The image is not hashed again on its way: it was hashed before the upload, and the disk is
//! verified against that hash afterwards. The stream's own SHA-256 cost about 0.55 s of CPU per GiB
//! (40 % of the stream's CPU) and could only tell what the verification tells.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::source::{Codec, Transfer, open_decoded, read_full};

/// Bytes per chunk read from the image and handed to SSH, which splits it (without copying) into
/// packets of the server's maximum size. Large reads: few system calls and thread wake-ups.
pub(crate) const CHUNK: usize = 1024 * 1024;

/// Chunks queued for SSH: 4 MiB, twice OpenSSH's 2 MiB channel window, so that the window is
/// always full while the reader works.
pub(crate) const SSH_DEPTH: usize = 4;

/// The most chunks alive at once: the queue, one being read, one in the SSH writer, and the chunks
/// the SSH session holds until its packets are written (the window: 2 MiB on OpenSSH). Memory is
/// bounded by this, whatever the image's size.
pub(crate) const MAX_CHUNKS: usize = SSH_DEPTH + 2 + 3;

// The pipe's share of the uploader's memory stays far under its 64 MiB budget.
const _: () = assert!(MAX_CHUNKS * CHUNK <= 16 << 20);

/// Buffers that come back when the last holder of a chunk lets go: no allocation, no zeroing and
/// no copy per chunk once the pipe runs.
struct Pool {
    back: std_mpsc::Receiver<Vec<u8>>,
    give_back: std_mpsc::Sender<Vec<u8>>,
}

/// A chunk's buffer; returns to its pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    home: std_mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // The pool is gone once the reader has finished: then the buffer is simply freed.
        let _ = self.home.send(std::mem::take(&mut self.buf));
    }
}

impl Pool {
    fn new() -> Self {
        let (give_back, back) = std_mpsc::channel();
        Pool { back, give_back }
    }

    /// A buffer with room for a chunk: a used one as it was left (its bytes initialized), or a new
    /// empty one.
    fn get(&self) -> Vec<u8> {
        self.back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK))
    }

    /// The buffer as a chunk that SSH can split into packets without copying.
    fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            home: self.give_back.clone(),
        })
    }
}

/// Reads up to a chunk into a pooled buffer; an empty chunk at the end.
fn read_chunk(pool: &Pool, r: &mut dyn Read) -> io::Result<Vec<u8>> {
    let mut buf = pool.get();
    // Only a new buffer is zeroed: a used one kept its length (a full chunk but for the last).
    buf.resize(CHUNK, 0);
    let n = read_full(r, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Collects what is written to it into pooled chunks sent to SSH (zstd's output).
struct ChunkSender<'p> {
    tx: mpsc::Sender<Bytes>,
    pool: &'p Pool,
    buf: Vec<u8>,
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SSH stream stopped")
}

impl ChunkSender<'_> {
    fn flush_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut next = self.pool.get();
        next.clear();
        let b = std::mem::replace(&mut self.buf, next);
        self.tx
            .blocking_send(self.pool.share(b))
            .map_err(|_| stopped())
    }
}

impl Write for ChunkSender<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush_buf()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()
    }
}

/// Number of zstd worker threads: every core, at most 8 so memory stays bounded on big machines.
pub(crate) fn zstd_workers(cores: usize) -> u32 {
    cores.clamp(1, 8) as u32
}

fn zstd_encoder<'p>(
    sender: ChunkSender<'p>,
) -> io::Result<zstd::stream::write::Encoder<'static, ChunkSender<'p>>> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut enc = zstd::stream::write::Encoder::new(sender, 3)?;
    enc.multithread(zstd_workers(cores))?;
    // Small jobs and window keep zstd's buffers to a few MiB per worker.
    enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(20))?;
    enc.set_parameter(zstd::stream::raw::CParameter::JobSize(1 << 20))?;
    Ok(enc)
}

/// Reads the image chunk by chunk, giving each chunk (as it is, or through zstd) to SSH. Returns
/// the raw image's size.
fn pump(
    r: &mut dyn Read,
    path: &std::path::Path,
    transfer: Transfer,
    tx: mpsc::Sender<Bytes>,
) -> anyhow::Result<u64> {
    let pool = Pool::new();
    let out_pool = Pool::new();
    let mut zstd = match transfer {
        Transfer::None => None,
        Transfer::Zstd => Some(zstd_encoder(ChunkSender {
            tx: tx.clone(),
            pool: &out_pool,
            buf: Vec::with_capacity(CHUNK),
        })?),
    };
    let mut size = 0u64;
    loop {
        let buf = read_chunk(&pool, r)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if buf.is_empty() {
            break;
        }
        size += buf.len() as u64;
        let chunk = pool.share(buf);
        match &mut zstd {
            None => tx.blocking_send(chunk).map_err(|_| stopped())?,
            Some(enc) => enc.write_all(&chunk)?,
        }
    }
    if let Some(enc) = zstd {
        enc.finish()?.flush()?;
    }
    Ok(size)
}

/// Reads, decompresses and (optionally) zstd-compresses the image on a thread, sending chunks on
/// `tx`. Returns the raw image's size.
pub(crate) fn spawn_stream(
    path: PathBuf,
    codec: Codec,
    transfer: Transfer,
    tx: mpsc::Sender<Bytes>,
    count: Arc<AtomicU64>,
) -> JoinHandle<anyhow::Result<u64>> {
    std::thread::spawn(move || {
        let mut r = open_decoded(&path, codec, count)?;
        pump(&mut r, &path, transfer, tx)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_bounded() {
        assert_eq!(zstd_workers(0), 1);
        assert_eq!(zstd_workers(2), 2);
        assert_eq!(zstd_workers(64), 8);
    }

    #[test]
    fn stream_sends_raw_or_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let compressed = dir.path().join("img.raw.zst");
        std::fs::write(&compressed, zstd::encode_all(&data[..], 1).unwrap()).unwrap();
        for transfer in [Transfer::None, Transfer::Zstd] {
            let (tx, mut rx) = mpsc::channel(4);
            let t = spawn_stream(
                compressed.clone(),
                Codec::Zstd,
                transfer,
                tx,
                Arc::new(AtomicU64::new(0)),
            );
            let mut got = Vec::new();
            while let Some(c) = rx.blocking_recv() {
                got.extend_from_slice(&c);
            }
            let n = t.join().unwrap().unwrap();
            assert_eq!(n, data.len() as u64);
            let raw = match transfer {
                Transfer::None => got,
                Transfer::Zstd => zstd::decode_all(&got[..]).unwrap(),
            };
            assert_eq!(raw, data);
        }
    }

    #[test]
    fn buffers_are_reused() {
        let pool = Pool::new();
        let a = pool.share(vec![1u8; 10]);
        let b = a.clone();
        drop(a);
        assert!(pool.back.try_recv().is_err(), "still held by a clone");
        drop(b);
        let again = pool.get();
        assert_eq!(
            again,
            vec![1u8; 10],
            "comes back as it was: no zeroing again"
        );
    }

    /// Bytes read from the image but not yet taken by SSH stay under the bound whatever the
    /// image's size, while SSH is slower than the reader.
    #[test]
    fn memory_is_bounded_whatever_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.raw");
        let size: u64 = 256 << 20;
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::channel(SSH_DEPTH);
        let t = spawn_stream(p, Codec::Plain, Transfer::None, tx, count.clone());
        let (mut taken, mut most) = (0u64, 0u64);
        while let Some(c) = rx.blocking_recv() {
            std::thread::sleep(std::time::Duration::from_micros(200));
            taken += c.len() as u64;
            let read = count.load(std::sync::atomic::Ordering::Relaxed);
            most = most.max(read - taken);
        }
        assert_eq!(t.join().unwrap().unwrap(), size);
        assert!(
            most <= (MAX_CHUNKS * CHUNK) as u64,
            "{most} bytes in flight, more than {MAX_CHUNKS} chunks"
        );
    }

    #[test]
    fn a_stopped_ssh_stream_stops_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.raw");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        for transfer in [Transfer::None, Transfer::Zstd] {
            let (tx, rx) = mpsc::channel(1);
            drop(rx);
            let t = spawn_stream(
                p.clone(),
                Codec::Plain,
                transfer,
                tx,
                Arc::new(AtomicU64::new(0)),
            );
            let e = t.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("SSH stream stopped"), "{e}");
        }
    }
}
