#!/bin/sh
# Benchmark of `hcloud-nixos upload` against OpenSSH's `cat image | ssh ... dd` over a loopback
# sshd, raw and with zstd (`zstd -T0 -3 | ssh ... 'zstd -dc | dd'`), in one run: the contenders
# alternate, each BENCH_ROUNDS times (default 5), and the page cache is dropped before every run.
# It prints best and median throughput, CPU seconds per GiB and peak memory of each, and the
# ratios ours/OpenSSH.
#
# Needs root, openssh-server, openssh-client, zstd and GNU time.
#   BENCH_MIB           image size in MiB (default 1024; incompressible data)
#   BENCH_ROUNDS        runs of each contender and mode (default 5)
#   BENCH_DIR           where the image and the disk file go (default /var/tmp; about 2x BENCH_MIB)
#   BENCH_BASELINE_BIN  another build of hcloud-nixos (say, main's) to run alongside: before and
#                       after in one run
set -eu
cd "$(dirname "$0")/../.."
exec cargo test --release --test upload_bench -- --ignored --nocapture --test-threads 1
