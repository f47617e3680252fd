//! The deploy agent in every server: follows a FlakeHub reference from the user-data, applies each
//! release, checks the system is healthy, rolls back when not, reboots by policy, reports.

pub(crate) mod apply;
pub mod commands;
pub mod config;
pub mod flakehub;
pub mod flakeref;
pub(crate) mod health;
pub(crate) mod hooks;
pub mod lifecycle;
pub(crate) mod login;
pub mod metrics;
pub(crate) mod programs;
pub(crate) mod reboot;
pub(crate) mod release;
pub mod service;
pub(crate) mod setup;
pub(crate) mod systemd;
pub mod userdata;
