//! What every program shares: HTTP and TLS set-up, atomic files, running programs, other
//! processes in /proc, secrets, text made fit for a log line, logging, how a program runs.

pub(crate) mod exec;
pub mod files;
pub(crate) mod http;
pub mod logging;
pub(crate) mod procfs;
pub mod program;
pub(crate) mod retry;
pub(crate) mod secret;
pub(crate) mod text;
pub mod tls;
