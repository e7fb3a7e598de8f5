#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs the real
# peers the end-to-end tests drive (Debian packages), builds, checks format
# and lints, then runs the unit, protocol and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need, by the command each provides.
declare -A packages=(
    [telnet]=telnet
    [expect]=expect
    [nc]=netcat-openbsd
    [ip]=iproute2
    [setpriv]=util-linux
    [kill]=procps
    [promtool]=prometheus
)

missing=()
for command in "${!packages[@]}"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("${packages[$command]}")
done
# psql and pgbench alone come without a server; the tunnel's end-to-end
# test runs a real PostgreSQL server.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

echo "== build"
# The end-to-end tests run these binaries, so build them first.
cargo build --workspace --locked --quiet

echo "== tests"
cargo test --workspace --locked
