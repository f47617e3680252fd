//! The deploy agent in every server: follows a FlakeHub reference from the user-data, applies each
//! release, checks the system is healthy, rolls back when not, reboots by policy, reports.

pub mod apply;
pub mod commands;
pub mod config;
pub mod flakehub;
pub mod flakeref;
pub mod health;
pub mod hooks;
pub mod lifecycle;
pub mod login;
pub mod metrics;
pub mod programs;
pub mod reboot;
pub mod release;
pub mod service;
pub mod setup;
pub mod systemd;
pub mod userdata;
