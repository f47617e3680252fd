//! SSH to the rescue system with an in-memory ed25519 key: connect with bounded retries, run commands, stream stdin.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use russh::ChannelMsg;
use russh::client;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::sync::mpsc;

use crate::plumbing::retry::{Backoff, Class, Policy, retry};

/// A fresh ed25519 key that lives only in memory.
pub(crate) fn new_key() -> anyhow::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| anyhow::anyhow!("no randomness for the SSH key: {e}"))?;
    let pair = Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    Ok(PrivateKey::from(pair))
}

/// The public half in OpenSSH's one-line format.
pub(crate) fn public_openssh(key: &PrivateKey) -> anyhow::Result<String> {
    Ok(key.public_key().to_openssh()?)
}

/// Accepts any host key: the rescue system's key is new at each boot and cannot be known in
/// advance. The session only ever carries the image, never a secret.
struct Handler;

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// How a remote command ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    /// With an exit status.
    Status(u32),
    /// Killed by a signal (and no exit status came).
    Signal(String),
    /// The channel closed without saying.
    #[default]
    Unknown,
}

/// What a remote command gave back.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub(crate) exit: Exit,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
}

impl Output {
    pub(crate) fn success(&self) -> bool {
        self.exit == Exit::Status(0)
    }

    /// One line describing a failure: the exit status and the last line of stderr.
    pub(crate) fn failure_summary(&self) -> String {
        let err = String::from_utf8_lossy(&self.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let last = super::outside::one_line(last, 300);
        let how = match &self.exit {
            Exit::Status(s) => format!("exit status {s}"),
            Exit::Signal(sig) => format!("signal {sig}"),
            Exit::Unknown => "no exit status".to_string(),
        };
        if last.is_empty() {
            how
        } else {
            format!("{how}: {last}")
        }
    }
}

/// Keeps at most this much of a command's stdout and stderr.
const MAX_CAPTURE: usize = 64 * 1024;

fn push_capped(buf: &mut Vec<u8>, data: &[u8]) {
    // Keep the tail: error messages come last.
    buf.extend_from_slice(data);
    if buf.len() > MAX_CAPTURE {
        let excess = buf.len() - MAX_CAPTURE;
        buf.drain(..excess);
    }
}

/// A logged-in session on the rescue system.
pub(crate) struct Rescue {
    handle: client::Handle<Handler>,
}

/// Whether this CPU encrypts and authenticates AES-GCM in hardware (AES and carry-less
/// multiplication instructions).
fn aes_gcm_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The ciphers we offer, fastest first. With AES instructions, AES-GCM is several times faster
/// than ChaCha20-Poly1305 on both ends (ring here, OpenSSL in the rescue system's sshd); without
/// them, ChaCha20-Poly1305 is. SSH takes the first of the client's list the server also offers.
pub(crate) fn ciphers(aes_hardware: bool) -> &'static [russh::cipher::Name] {
    use russh::cipher::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305};
    if aes_hardware {
        &[AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305]
    } else {
        &[CHACHA20_POLY1305, AES_128_GCM, AES_256_GCM]
    }
}

fn config() -> client::Config {
    client::Config {
        preferred: russh::Preferred {
            cipher: Cow::Borrowed(ciphers(aes_gcm_in_hardware())),
            ..Default::default()
        },
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: 256 * 1024,
        channel_buffer_size: 256,
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 8,
        ..Default::default()
    }
}

/// Why one attempt to log in failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AttemptError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the server does not accept the key (yet)")]
    Denied,
}

/// One attempt to connect and log in as root.
pub(crate) async fn connect_once(
    addr: SocketAddr,
    key: Arc<PrivateKey>,
    timeout: Duration,
) -> Result<Rescue, AttemptError> {
    let attempt = async {
        let mut handle = client::connect(Arc::new(config()), addr, Handler)
            .await
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        let res = handle
            .authenticate_publickey("root", PrivateKeyWithHashAlg::new(key, None))
            .await
            .map_err(|e| AttemptError::Connect(e.to_string()))?;
        if res.success() {
            Ok(Rescue { handle })
        } else {
            Err(AttemptError::Denied)
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(AttemptError::Connect(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// The waits between connection attempts: 1 s, then 2 s, then 3 s at most (±10 %).
pub(crate) fn connect_backoff() -> Backoff {
    Backoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(3),
        factor: 2.0,
        jitter: 0.1,
    }
}

/// Connects until the rescue system lets us in or `deadline` passes (at most 1000 attempts).
pub(crate) async fn connect_retrying(
    addr: SocketAddr,
    key: Arc<PrivateKey>,
    deadline: Duration,
    on_retry: impl Fn(u32, &AttemptError),
) -> anyhow::Result<Rescue> {
    let until = tokio::time::Instant::now() + deadline;
    let policy = Policy {
        backoff: connect_backoff(),
        deadline: Some(until),
        attempts: Some(1000),
    };
    let (key, on_retry) = (&key, &on_retry);
    let result = retry(
        policy,
        |n| async move {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let r = connect_once(addr, key.clone(), left.min(Duration::from_secs(20))).await;
            r.inspect_err(|e| on_retry(n, e))
        },
        |_| Class::Passing,
    )
    .await;
    result.map_err(|g| {
        anyhow::anyhow!(
            "the rescue system at {addr} did not let us in within {}: {} (after {} attempts)",
            humantime::format_duration(deadline),
            g.last,
            g.attempts
        )
    })
}

impl Rescue {
    /// Runs a command with no input.
    pub(crate) async fn run(&self, command: &str) -> anyhow::Result<Output> {
        let (_tx, rx) = mpsc::channel::<Bytes>(1);
        drop(_tx);
        self.run_with_input(command, rx).await
    }

    /// Runs a command, feeding it the chunks from `input` on stdin, then EOF.
    pub(crate) async fn run_with_input(
        &self,
        command: &str,
        mut input: mpsc::Receiver<Bytes>,
    ) -> anyhow::Result<Output> {
        let channel = self.handle.channel_open_session().await?;
        channel.exec(true, command).await?;
        let (mut read, write) = channel.split();
        let writer = async move {
            while let Some(chunk) = input.recv().await {
                write.data_bytes(chunk).await?;
            }
            write.eof().await?;
            Ok::<_, anyhow::Error>(write)
        };
        let reader = async move {
            let mut out = Output::default();
            while let Some(msg) = read.wait().await {
                match msg {
                    ChannelMsg::Data { data } => push_capped(&mut out.stdout, &data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        push_capped(&mut out.stderr, &data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => out.exit = Exit::Status(exit_status),
                    // An exit status, when there is one too, says more.
                    ChannelMsg::ExitSignal { signal_name, .. }
                        if !matches!(out.exit, Exit::Status(_)) =>
                    {
                        out.exit = Exit::Signal(format!("{signal_name:?}"))
                    }
                    _ => {}
                }
            }
            out
        };
        tokio::pin!(writer);
        tokio::pin!(reader);
        // If the remote command ends early (a failure), stop writing and report its status.
        let mut writer_done = false;
        let mut write_err = None;
        let out = loop {
            tokio::select! {
                w = &mut writer, if !writer_done => {
                    writer_done = true;
                    if let Err(e) = w { write_err = Some(e); }
                }
                out = &mut reader => break out,
            }
        };
        if out.exit == Exit::Unknown
            && let Some(e) = write_err
        {
            return Err(e.context("the SSH stream to the rescue system broke"));
        }
        Ok(out)
    }

    pub(crate) async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_fresh_ed25519() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        let pa = public_openssh(&a).unwrap();
        assert!(pa.starts_with("ssh-ed25519 "));
        assert_ne!(pa, public_openssh(&b).unwrap());
    }

    #[test]
    fn failure_summary_uses_last_stderr_line() {
        let o = Output {
            exit: Exit::Status(1),
            stderr: b"zstd: error\ndd: /dev/sda: No space left on device\n\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(
            o.failure_summary(),
            "exit status 1: dd: /dev/sda: No space left on device"
        );
        assert!(!o.success());
    }

    #[test]
    fn capture_is_bounded() {
        let mut b = Vec::new();
        for _ in 0..100 {
            push_capped(&mut b, &[b'x'; 4096]);
        }
        assert_eq!(b.len(), MAX_CAPTURE);
    }

    #[test]
    fn the_cipher_follows_the_hardware() {
        use russh::cipher::{AES_128_GCM, CHACHA20_POLY1305};
        assert_eq!(ciphers(true)[0], AES_128_GCM);
        assert_eq!(ciphers(false)[0], CHACHA20_POLY1305);
        assert!(
            ciphers(false).contains(&AES_128_GCM),
            "offered all the same"
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            aes_gcm_in_hardware(),
            std::fs::read_to_string("/proc/cpuinfo")
                .is_ok_and(|c| c.contains(" aes ") && c.contains(" pclmulqdq "))
        );
    }

    #[test]
    fn retry_delays_bounded() {
        let b = connect_backoff();
        assert_eq!(b.delay(1, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay(2, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay(100, 0.5), Duration::from_secs(3));
    }
}
