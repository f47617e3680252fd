#!/usr/bin/env bash
# Fleet benchmarks against one real etcd on loopback (apt-get install etcd-server; protoc builds
# etcd-client):
# 1. fleet-bench: a group of 1,000 agents' coordinators in one process, slots of 50, one FlakeHub
#    stand-in: FlakeHub requests per minute while idle, announce to the last agent seeing and
#    checking the release, all deployed (instant deploys), etcd's memory, the agents' idle CPU.
#    FLEET_BENCH_AGENTS, _SLOTS, _POLL_S, _IDLE_S, _TTL override.
# 2. fleet-agents-bench: 40 whole agent processes with stand-in deploys (needs root and nix-bin):
#    announce to all deployed. FLEET_AGENTS, FLEET_AGENTS_SLOTS override.
# Usage: tests/bench/fleet.sh [coordinators|agents]   (both by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
which=${1:-both}
cargo build --release --quiet --bin hcloud-nixos --example fleet-bench --example fleet-agents-bench
if [[ $which != agents ]]; then
  target/release/examples/fleet-bench
fi
if [[ $which != coordinators ]]; then
  HCLOUD_NIXOS_BIN=$PWD/target/release/hcloud-nixos target/release/examples/fleet-agents-bench
fi
