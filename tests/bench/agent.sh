#!/usr/bin/env bash
# Benchmark of the idle deploy agent (`hcloud-nixos agent`, service mode, direct applies) against
# the FlakeHub and metadata stand-ins on 127.0.0.1: the system already runs the published release,
# so every poll is "up to date". Polls are triggered with SIGUSR1, one after the other. Reports
# resident memory (VmRSS, VmHWM) after POLLS polls and CPU time (utime+stime) per poll.
# Targets: at most 1 ms of CPU and one FlakeHub request per poll, at most 8 MiB resident.
#
# Usage: tests/bench/agent.sh [POLLS]   (default 100; needs root, nix-bin and curl)
# Builds in release mode: run it on purpose, not from CI.
set -euo pipefail

polls=${1:-100}
repo=$(cd "$(dirname "$0")/../.." && pwd)
fixtures=${HCLOUD_NIXOS_FIXTURES:-$repo/tests/fixtures/hetzner-metadata}
cd "$repo"

for tool in nix-store nix-env curl awk getconf; do
  command -v "$tool" >/dev/null || { echo "agent.sh: $tool is missing" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "agent.sh: needs root (the Nix store is written directly)" >&2; exit 2; }

# The binary servers run (the NixOS module's package): without the workstation's commands.
# Optimized for size and with packed relocations, as the flake's servers' package builds it, in
# a target directory of its own.
CARGO_PROFILE_RELEASE_OPT_LEVEL=z RUSTFLAGS="-C link-arg=-Wl,-z,pack-relative-relocs" \
  cargo build --release --quiet --no-default-features \
  --bin hcloud-nixos --target-dir target/server
cargo build --release --quiet --example metadata-standin --example flakehub-standin
bin=$repo/target/server/release/hcloud-nixos
examples=$repo/target/release/examples

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

token=flakehub1_benchmarkToken_0123456789abcdef
version=0.1.7+rev-0123456789abcdef0123456789abcdef01234567
attr=nixosConfigurations.web
export NIX_CONF_DIR=$work/nix-conf
mkdir -p "$NIX_CONF_DIR" "$work/system/bin" "$work/profiles" "$work/home"
printf 'build-users-group =\n' >"$NIX_CONF_DIR/nix.conf"

# The running system: a real store path, generation 1 of the profile, current-system.
printf '#!/bin/sh\nexit 0\n' >"$work/system/bin/switch-to-configuration"
chmod +x "$work/system/bin/switch-to-configuration"
echo "agent benchmark $work" >"$work/system/marker"
store_path=$(nix-store --add "$work/system")
nix-env -p "$work/profiles/system" --set "$store_path"
ln -s "$store_path" "$work/current-system"

wait_for_url() { # file -> URL printed as "listening on URL"
  local url=
  for _ in $(seq 100); do
    url=$(sed -n 's/^listening on //p' "$1")
    [[ -n $url ]] && { echo "$url"; return; }
    sleep 0.05
  done
  echo "agent.sh: a stand-in did not start: $(cat "$1")" >&2
  exit 1
}

"$examples/flakehub-standin" --listen 127.0.0.1:0 --token "$token" \
  --release "acme/infra/$version#$attr=$store_path" >"$work/flakehub.out" &
pids+=($!)
api=$(wait_for_url "$work/flakehub.out")

cat >"$work/userdata" <<EOF
#cloud-config
hcloud_nixos:
  flakehub_token: $token
  flake: acme/infra/0.1#$attr
EOF
"$examples/metadata-standin" --listen 127.0.0.1:0 \
  --metadata "$fixtures/metadata.full-example.yaml" --userdata "$work/userdata" >"$work/metadata.out" &
pids+=($!)
metadata=$(wait_for_url "$work/metadata.out")

# determinate-nixd is not named (a named one must exist) and not installed: the agent logs in
# through fh's token file.
cat >"$work/agent.toml" <<EOF
poll_interval = "1h"
[flakehub]
api_url = "$api"
[metadata]
url = "$metadata"
[apply]
mode = "direct"
[paths]
state_dir = "$work/state"
run_dir = "$work/run"
current_system = "$work/current-system"
booted_system = "$work/current-system"
system_profile = "$work/profiles/system"
fh = "/bin/false"
fh_auth_file = "$work/home/fh-auth"
switch_lock = "$work/switch.lock"
EOF

count() { # endpoint -> requests so far
  curl -fsS "$api/_standin/counts" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p" | sed 's/^$/0/'
}
total() { curl -fsS "$api/_standin/counts" | sed -n 's/.*"total":\([0-9]*\).*/\1/p'; }

env -u RUST_LOG -u NOTIFY_SOCKET -u JOURNAL_STREAM "$bin" agent --config "$work/agent.toml" \
  >"$work/agent.out" 2>"$work/agent.err" &
agent=$!
pids+=("$agent")

# The first cycle (start-up, login, first resolution) is not counted.
for _ in $(seq 200); do
  [[ $(count output) -ge 1 ]] && break
  sleep 0.05
done
[[ $(count output) -ge 1 ]] || { echo "agent.sh: no first poll: $(cat "$work/agent.err")" >&2; exit 1; }
sleep 0.2
grep -q "up to date: $version" "$work/state/state.json" ||
  { echo "agent.sh: not up to date: $(cat "$work/state/state.json")" >&2; exit 1; }

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$agent/stat"; }
status_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$agent/status"; }

ticks0=$(cpu_ticks)
requests0=$(total)
rss0=$(status_kb VmRSS)
t0=$(date +%s%N)
for i in $(seq "$polls"); do
  # An idle poll asks FlakeHub for the release list only (the output of a known release is
  # not asked again): any request is the poll.
  before=$(total)
  kill -USR1 "$agent"
  ok=
  for _ in $(seq 500); do
    if [[ $(total) -gt $before ]]; then ok=1; break; fi
    sleep 0.01
  done
  [[ -n $ok ]] || { echo "agent.sh: poll $i did not happen: $(tail -3 "$work/agent.err")" >&2; exit 1; }
  sleep 0.02 # the state is written after the last request
done
t1=$(date +%s%N)
ticks1=$(cpu_ticks)
requests1=$(total)
kill -0 "$agent" || { echo "agent.sh: the agent died: $(cat "$work/agent.err")" >&2; exit 1; }

hz=$(getconf CLK_TCK)
rss=$(status_kb VmRSS)
hwm=$(status_kb VmHWM)
awk -v polls="$polls" -v dt=$((ticks1 - ticks0)) -v hz="$hz" -v rss="$rss" -v rss0="$rss0" \
  -v hwm="$hwm" -v req=$((requests1 - requests0)) -v wall=$((t1 - t0)) '
  BEGIN {
    cpu_ms = 1000 * dt / hz / polls
    printf "polls=%d  requests/poll=%.1f  wall/poll=%.1f ms (incl. the driver)\n", polls, req / polls, wall / 1e6 / polls
    printf "CPU per poll: %.3f ms (%d ticks of %d Hz over %d polls)  target <= 1 ms\n", cpu_ms, dt, hz, polls
    printf "resident: VmRSS=%d KiB (%d KiB before the polls)  VmHWM=%d KiB  target <= 8 MiB\n", rss, rss0, hwm
    bad = (cpu_ms > 1) || (hwm > 8 * 1024) || (req / polls > 1)
    print bad ? "RESULT: over target" : "RESULT: within targets"
    exit bad
  }'
