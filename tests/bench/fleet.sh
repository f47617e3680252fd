#!/usr/bin/env bash
# Fleet benchmark: 40 agents against one real etcd on loopback, a group of 40 with 5 slots,
# instant deploys confirmed in 200 ms. Needs etcd (apt-get install etcd-server) and protoc.
# Usage: tests/bench/fleet.sh   (FLEET_BENCH_AGENTS, _SLOTS, _CONFIRM_MS, _POLL_MS override)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example fleet-bench
exec target/release/examples/fleet-bench
