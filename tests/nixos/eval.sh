#!/usr/bin/env bash
# The NixOS module evaluation check: nixos-module/ evaluated with nixpkgs' own module system
# (lib.evalModules) for good configurations (minimal, full, upstream Nix, nftables, agent off,
# cross, a reboot window without a policy) and bad ones (a token path literal or store path, an
# empty list of window days, health checks with neither or both of command and url, Determinate
# Nix without determinate-nixd), and the agent's own parser run on the settings each good
# configuration renders. One line per check, then a summary; exit status 0 only when every check
# ran and passed.
#
#   bash tests/nixos/eval.sh /path/to/nixpkgs.lib          # a checkout of nix-community/nixpkgs.lib
#   bash tests/nixos/eval.sh /path/to/nixpkgs/lib          # or the lib/ directory of nixpkgs
#   NIXPKGS_LIB=/path/to/nixpkgs.lib bash tests/nixos/eval.sh
#   bash tests/nixos/eval.sh                               # fetches nix-community/nixpkgs.lib (network)
#
# Needs Nix (2.8 or newer; `nix eval` with the nix-command feature) and the hcloud-nixos binary
# with `config check` ($HCLOUD_NIXOS, else target/debug/hcloud-nixos: `cargo build`).
#
# What it covers, and what it does not (docs/nixos.md, "Checked here, and not"): the module's
# options, defaults, assertions and what it renders are evaluated for real with nixpkgs' lib. The
# NixOS options it sets are loose stand-ins declared in tests/nixos/eval.nix, `pkgs` is a set of
# fake derivations, Determinate's module is a stand-in that sets nix.package, and what NixOS does
# with the agent's unit (the PATH in overrides.conf) is modelled after nixos/lib/systemd-lib.nix,
# not run. Nothing is built: not the package, not the units, not agent.toml, not a system.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

lib_arg=${1:-${NIXPKGS_LIB:-}}
nix_args=()
if [ -n "$lib_arg" ]; then
  if [ -f "$lib_arg/lib/default.nix" ]; then
    lib_dir=$(cd "$lib_arg/lib" && pwd)
  elif [ -f "$lib_arg/default.nix" ]; then
    lib_dir=$(cd "$lib_arg" && pwd)
  else
    echo "eval.sh: $lib_arg holds no nixpkgs lib (neither lib/default.nix nor default.nix)" >&2
    exit 2
  fi
  nix_args=(--argstr nixpkgsLib "$lib_dir")
  lib_from="$lib_dir"
else
  lib_from="github:nix-community/nixpkgs.lib (fetched)"
fi

if ! command -v nix >/dev/null; then
  echo "eval.sh: needs Nix (the nix command)" >&2
  exit 2
fi

# A machine without the nixbld group warns on every call; nothing here builds.
quiet() { grep -v "^warning: the group '.*' specified in 'build-users-group' does not exist$" >&2 || true; }
nixeval() {
  nix --extra-experimental-features nix-command eval --raw --file "$here/eval.nix" "${nix_args[@]}" "$@"
}

passed=0
failed=0
notrun=0
pass() { passed=$((passed + 1)); printf 'PASS     %s\n' "$1"; }
fail() { failed=$((failed + 1)); printf 'FAIL     %s\n' "$1"; [ -z "${2:-}" ] || printf '         %s\n' "$2"; }
skip() { notrun=$((notrun + 1)); printf 'NOT RUN  %s\n' "$1"; }

version=$(nixeval libVersion 2> >(quiet)) || {
  echo "eval.sh: cannot evaluate tests/nixos/eval.nix with lib from $lib_from" >&2
  exit 2
}
echo "eval.sh: nixos-module/ with nixpkgs lib $version from $lib_from"

# Good configurations: the checks tests/nixos/eval.nix computes.
if report=$(nixeval goodReport 2> >(quiet)); then
  while IFS=$'\t' read -r scenario verdict name detail; do
    [ -n "$scenario" ] || continue
    if [ "$verdict" = PASS ]; then pass "$scenario: $name"; else fail "$scenario: $name" "$detail"; fi
  done <<<"$report"
else
  fail "the good configurations evaluate" "see the error above"
fi

# The agent's own parser on what each good configuration renders.
bin=${HCLOUD_NIXOS:-$root/target/debug/hcloud-nixos}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
have_check=
if [ ! -x "$bin" ]; then
  why="no hcloud-nixos binary at $bin (cargo build, or set HCLOUD_NIXOS)"
elif ! "$bin" config check --help >/dev/null 2>&1; then
  why="$bin has no \`config check\` command yet (the agent side of issue 11)"
else
  # The check must be able to fail: an unknown key is refused.
  printf '{"no_such_key": 1}\n' >"$work/unknown-key.json"
  if "$bin" config check --json "$work/unknown-key.json" >/dev/null 2>&1; then
    fail "\`hcloud-nixos config check --json\` refuses an unknown key" "$bin accepted it"
    why="$bin accepts anything"
  else
    pass "\`hcloud-nixos config check --json\` refuses an unknown key (so it can fail)"
    have_check=1
  fi
fi
for scenario in $(nixeval goodNames --apply 'toString' 2> >(quiet)); do
  label="$scenario: \`hcloud-nixos config check --json\` accepts the rendered settings"
  if [ -z "$have_check" ]; then
    skip "$label: $why"
    continue
  fi
  if ! nixeval "goodSettingsJSON.$scenario" >"$work/$scenario.json" 2> >(quiet); then
    fail "$label" "the settings did not evaluate"
    continue
  fi
  if out=$("$bin" config check --json "$work/$scenario.json" 2>&1); then
    pass "$label"
  else
    fail "$label" "$(printf '%s' "$out" | tr '\n' ' ')"
  fi
done

# Bad configurations: evaluating the system (its assertions) must fail, saying why.
for name in $(nixeval badNames --apply 'toString' 2> >(quiet)); do
  expect=$(nixeval "bad.$name.expect" 2> >(quiet))
  if out=$(nixeval "bad.$name.toplevel" 2>&1); then
    fail "bad $name: evaluation fails" "it evaluated"
  elif printf '%s' "$out" | tr '\n' ' ' | sed 's/  */ /g' | grep -qF -- "$expect"; then
    pass "bad $name: evaluation fails with \"$expect\""
  else
    fail "bad $name: evaluation fails with \"$expect\"" "$(printf '%s' "$out" | grep -v build-users-group | tr '\n' ' ' | cut -c1-400)"
  fi
  case $name in
  token-path-literal*)
    rendered=$(nixeval "bad.$name.tokenFileRendered" 2> >(quiet))
    case $rendered in
    /nix/store/*) fail "bad $name: the path literal is never copied into the store" "rendered as $rendered" ;;
    *) pass "bad $name: the path literal is never copied into the store (rendered by name: $rendered)" ;;
    esac
    ;;
  esac
done

echo "eval.sh: $((passed + failed + notrun)) checks: $passed passed, $failed failed, $notrun not run"
[ "$failed" -eq 0 ] && [ "$notrun" -eq 0 ]
