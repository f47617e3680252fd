#!/bin/sh
# Benchmark of `hcloud-nixos upload` against `cat image | ssh ... dd` (OpenSSH) over loopback.
# Needs root, openssh-server, openssh-client and GNU time. BENCH_MIB (default 1024) sets the image
# size; BENCH_DIR (default /var/tmp) where the image and the disk file go (about 2x BENCH_MIB).
set -eu
cd "$(dirname "$0")/../.."
exec cargo test --release --test upload_bench -- --ignored --nocapture --test-threads 1
