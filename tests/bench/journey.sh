#!/bin/sh
# Benchmark of the journey against the local cloud (tests/journey.rs, bench_journey): BENCH_RUNS
# (default 5) runs of `hcloud-nixos create` for one server each, the timeline's phases (median,
# min, max) and the part that is ours: create's API call, its seeing `running`, its first SSH
# answer after sshd started and its seeing `confirmed`; the agent's time from network-online to
# its first fh call. Needs root and what the local cloud needs (harness::cloud::missing).
# BENCH_PROFILE=dev builds without optimizations (faster to build).
set -eu
cd "$(dirname "$0")/../.."
profile=${BENCH_PROFILE:-release}
exec cargo test --profile "$profile" --test journey -- --ignored bench_journey --nocapture --test-threads 1
