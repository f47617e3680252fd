#!/usr/bin/env bash
# Benchmark of the boot step against the stand-in metadata service on 127.0.0.1: wall time, CPU
# time and peak RSS over N runs of `hcloud-nixos-network` (what the unit runs) and of
# `hcloud-nixos network` (the same step in the whole program), next to a plain curl of the same
# two documents.
#
# Usage: tests/bench/network.sh [RUNS]   (default 20; needs /usr/bin/time from Debian's `time`)
# Builds in release mode: run it on purpose, not from CI.
set -euo pipefail

runs=${1:-20}
repo=$(cd "$(dirname "$0")/../.." && pwd)
fixtures=${HCLOUD_NIXOS_FIXTURES:-$repo/tests/fixtures/hetzner-metadata}
cd "$repo"

for tool in /usr/bin/time curl awk sort; do
  command -v "$tool" >/dev/null || { echo "network.sh: $tool is missing" >&2; exit 2; }
done

# The programs servers run (the NixOS module's package): without the workstation's commands,
# optimized for size and with packed relocations as the flake's servers' package builds them, in
# a target directory of their own.
CARGO_PROFILE_RELEASE_OPT_LEVEL=z RUSTFLAGS="-C link-arg=-Wl,-z,pack-relative-relocs" \
  cargo build --release --quiet --no-default-features \
  --bin hcloud-nixos --bin hcloud-nixos-network --target-dir target/server
cargo build --release --quiet --example metadata-standin
bin=$repo/target/server/release

work=$(mktemp -d)
standin_pid=
cleanup() {
  [[ -n $standin_pid ]] && kill "$standin_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Port 0: the stand-in picks a free port and prints its URL.
"$repo/target/release/examples/metadata-standin" --listen 127.0.0.1:0 \
  --metadata "$fixtures/metadata.full-example.yaml" \
  --private-networks "$fixtures/private-networks.two-networks.yaml" >"$work/standin.out" &
standin_pid=$!
url=
for _ in $(seq 50); do
  url=$(sed -n 's/^listening on //p' "$work/standin.out")
  [[ -n $url ]] && break
  sleep 0.1
done
[[ -n $url ]] || { echo "network.sh: the stand-in did not start" >&2; exit 1; }

# Wall time from the shell clock in ns (GNU time prints only hundredths of a second); peak RSS
# in KiB from GNU time's -v report; CPU time (user + system) from the shell's `times` over a
# second series of runs, which counts in microseconds.
measure() { # label, command...
  local label=$1; shift
  : >"$work/$label.txt"
  for _ in $(seq "$runs"); do
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -v -o "$work/time.txt" "$@" >/dev/null 2>"$work/stderr.txt"
    t1=$(date +%s%N)
    awk -F': ' -v ns=$((t1 - t0)) '
      /Maximum resident set size/ { rss = $2 }
      END { print ns / 1e9, rss }' "$work/time.txt" >>"$work/$label.txt"
  done
  # `times` prints the shell's own times, then its children's: "0m0.052s 0m0.031s".
  local cpu
  cpu=$( (for _ in $(seq "$runs"); do "$@" >/dev/null 2>&1; done; times) | tail -1 |
    awk -v runs="$runs" '{
      split($1, u, /[ms]/); split($2, s, /[ms]/)
      printf "%.2f", 1000 * (60 * u[1] + u[2] + 60 * s[1] + s[2]) / runs }')
  sort -n "$work/$label.txt" | awk -v label="$label" -v cpu="$cpu" '
    { t[NR] = $1; sum += $1; if ($1 > max) max = $1; if ($2 > rss) rss = $2 }
    END {
      med = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
      printf "%-22s runs=%d  wall mean=%.1f ms  median=%.1f ms  max=%.1f ms  CPU=%s ms/run  peak RSS=%d KiB\n",
        label, NR, 1000 * sum / NR, 1000 * med, 1000 * max, cpu, rss
    }'
}

net=$work/network
mkdir -p "$net"
args=(--metadata-url "$url" --network-dir "$net" --keys-file "$work/k" --hostname never
  --no-reload --state-dir "$work/state" --host-key-dir "$work/ssh")
# One checked run of each first: a failing program must not produce figures.
checked() { # command...
  rm -f "$net"/*
  "$@" "${args[@]}" 2>/dev/null
  ls "$net"/50-hcloud-nixos-public-*.network >/dev/null
}
checked "$bin/hcloud-nixos-network"
checked "$bin/hcloud-nixos" network

measure hcloud-nixos-network "$bin/hcloud-nixos-network" "${args[@]}"
measure "hcloud-nixos network" "$bin/hcloud-nixos" network "${args[@]}"
measure curl curl -fsS "${url}metadata" "${url}metadata/private-networks"
