//! What every program shares: HTTP and TLS set-up, atomic files, running programs, other
//! processes in /proc, secrets, text made fit for a log line, logging.

pub mod exec;
pub mod files;
pub mod http;
pub mod logging;
pub mod procfs;
pub mod retry;
pub mod secret;
pub mod text;
pub mod tls;
