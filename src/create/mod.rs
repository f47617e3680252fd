//! `hcloud-nixos create`: from nothing to a deployed server in one command. The server's
//! user-data carries the FlakeHub token, the reference and an SSH host key made here; `create`
//! waits for the server to run, connects with the user's OpenSSH client (the host key already in
//! `known_hosts`), follows the agent's status until the release is deployed and confirmed, and
//! shows where the time went.

mod hostkey;
mod timeline;
mod userdata;
