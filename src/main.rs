//! The `hcloud-nixos` command line.

fn main() {}
