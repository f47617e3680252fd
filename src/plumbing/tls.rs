//! TLS set-up shared by every HTTP client: rustls with the ring crypto provider.

/// Makes ring the process's rustls crypto provider; harmless when one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client builder with the crypto provider in place and our User-Agent. Every HTTP
/// client of the project starts here (reqwest panics when no provider is installed).
pub fn client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder().user_agent(concat!("hcloud-nixos/", env!("CARGO_PKG_VERSION")))
}
