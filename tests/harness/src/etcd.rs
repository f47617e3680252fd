//! A real etcd for the tests and the benchmark: Debian's etcd-server (`/usr/bin/etcd`, or
//! `$ETCD_BIN`), one member on loopback ports in a temporary data directory, killed by its PID
//! when dropped. It can be stopped and started again on the same ports and data.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Client TLS with client certificates: the certificates' directory.
    tls: Option<PathBuf>,
}

/// PEM files made with the openssl command for a TLS etcd: `ca.pem`, `server.pem` and
/// `server-key.pem` (for 127.0.0.1), `client.pem` and `client-key.pem`.
pub fn make_certs(dir: &std::path::Path) -> Result<(), String> {
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("cannot run openssl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let ext =
        |name: &str, text: &str| std::fs::write(dir.join(name), text).map_err(|e| e.to_string());
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test etcd CA",
    ])?;
    ext(
        "server.ext",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    ext("client.ext", "extendedKeyUsage=clientAuth\n")?;
    for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=hcloud-nixos")] {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ])?;
    }
    Ok(())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn find_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Etcd {
    /// Starts etcd, or says why not: `None` (after printing "SKIP: ...") when it is not
    /// installed, and a panic instead under `CI=true`, where it must be.
    pub fn start(test: &str) -> Option<Etcd> {
        let Some(bin) = find_bin() else {
            crate::skip(test, "etcd is not installed (apt-get install etcd-server)");
            return None;
        };
        let mut etcd = Etcd {
            bin,
            dir: tempfile::tempdir().expect("a temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            tls: None,
        };
        etcd.resume();
        Some(etcd)
    }

    /// Like [`Etcd::start`], serving clients over TLS and requiring a client certificate
    /// signed by the test CA. The certificates are in [`Etcd::certs`].
    pub fn start_tls(test: &str) -> Option<Etcd> {
        let mut etcd = Etcd::start(test)?;
        etcd.stop();
        let certs = etcd.dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        make_certs(&certs).unwrap_or_else(|e| panic!("{test}: {e}"));
        etcd.tls = Some(certs);
        etcd.resume();
        Some(etcd)
    }

    pub fn certs(&self) -> Option<&std::path::Path> {
        self.tls.as_deref()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it (again), on the same ports and data, and waits until it answers `/health`.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd runs already");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd's log file");
        let child = Command::new(&self.bin)
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--log-level=warn")
            .arg("--logger=zap")
            .args(self.tls.iter().flat_map(|d| {
                [
                    format!("--cert-file={}", d.join("server.pem").display()),
                    format!("--key-file={}", d.join("server-key.pem").display()),
                    format!("--trusted-ca-file={}", d.join("ca.pem").display()),
                    "--client-cert-auth".to_string(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("etcd exited at start ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy within 20 s: {}", self.log());
    }

    /// Kills it (SIGKILL by PID) and waits for it; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        if let Some(certs) = &self.tls {
            // Over TLS: ask with curl when there is one, else take an open port as ready.
            drop(s);
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(certs.join("ca.pem"))
                .arg("--cert")
                .arg(certs.join("client.pem"))
                .arg("--key")
                .arg(certs.join("client-key.pem"))
                .arg(format!("{}/health", self.url()))
                .output();
            return match out {
                Ok(o) => String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""),
                Err(_) => true,
            };
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
