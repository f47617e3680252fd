//! The connection to etcd that a member's slot requests and its group task share: endpoints
//! (credentials taken out of them, into etcd's user authentication), TLS, one client, and every
//! request under a timeout with its error on one line.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::{Error, ErrorKind, EtcdSettings};

/// How long one request may take before etcd counts as unreachable.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Conn {
    /// The endpoints to connect to, without credentials.
    endpoints: Vec<String>,
    /// The endpoints as messages show them (credentials redacted).
    shown: String,
    options: ConnectOptions,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Conn {
    /// Reads the TLS files; no network traffic (the first request connects).
    pub(crate) fn new(settings: &EtcdSettings) -> Result<Conn, Error> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if settings.tls() {
            crate::plumbing::tls::install_crypto_provider();
            let mut tls = TlsOptions::new();
            if let Some(ca) = &settings.ca_file {
                tls =
                    tls.ca_certificate(Certificate::from_pem(read_pem("fleet.etcd.ca_file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read_pem("fleet.etcd.cert_file", cert)?,
                    read_pem("fleet.etcd.key_file", key)?,
                ));
            }
            options = options.with_tls(tls);
        }
        // Credentials in the endpoints (the same on each) are etcd's user authentication.
        if let Some((user, password)) = settings.endpoints.iter().find_map(|e| e.credentials()) {
            options = options
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        Ok(Conn {
            endpoints: settings
                .endpoints
                .iter()
                .map(|e| e.without_credentials())
                .collect(),
            shown: settings
                .endpoints
                .iter()
                .map(|e| e.shown())
                .collect::<Vec<_>>()
                .join(", "),
            options,
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The endpoints for messages.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    pub(crate) fn unreachable(&self, what: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::Unreachable,
            format!("etcd unreachable ({}) while {what}: {why}", self.shown),
        )
    }

    /// The client, connected at the first call (it reconnects by itself afterwards).
    pub(crate) async fn client(&self) -> Result<Client, Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let connect = Client::connect(&self.endpoints, Some(self.options.clone()));
        let client = match tokio::time::timeout(OP_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(classify("connecting", &self.shown, e)),
            Err(_) => return Err(self.unreachable("connecting", "timed out")),
        };
        *slot = Some(client.clone());
        Ok(client)
    }

    /// One request under [`OP_TIMEOUT`], its error on one line.
    pub(crate) async fn call<T, F>(&self, what: &str, fut: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(what, &self.shown, e)),
            Err(_) => Err(self.unreachable(what, "timed out")),
        }
    }
}

fn read_pem(key: &str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("{key}: cannot read {}: {e}", path.display()),
        )
    })
}

/// etcd-client's error on one line, sorted into unreachable or refused.
pub(crate) fn classify(what: &str, eps: &str, e: etcd_client::Error) -> Error {
    use etcd_client::Error as E;
    let unreachable = match &e {
        E::TransportError(_) | E::IoError(_) | E::LeaseKeepAliveError(_) => true,
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        _ => false,
    };
    let mut text = match &e {
        E::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    };
    // The innermost cause says the most (a refused connection, a failed TLS handshake).
    let mut source = match &e {
        E::GRpcStatus(s) => std::error::Error::source(s),
        E::TransportError(t) => std::error::Error::source(t),
        _ => None,
    };
    let mut last = None;
    while let Some(cause) = source {
        last = Some(cause.to_string());
        source = cause.source();
    }
    if let Some(last) = last.filter(|l| !text.contains(l.as_str())) {
        text.push_str(": ");
        text.push_str(&last);
    }
    if unreachable {
        Error::new(
            ErrorKind::Unreachable,
            format!("etcd unreachable ({eps}) while {what}: {text}"),
        )
    } else {
        Error::new(
            ErrorKind::Refused,
            format!("etcd ({eps}) refused {what}: {text}"),
        )
    }
}
