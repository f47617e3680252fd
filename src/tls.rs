//! TLS set-up shared by every HTTP client: rustls with the ring crypto provider.

/// Makes ring the process's rustls crypto provider; harmless when one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
