#!/usr/bin/env bash
# Squares per second through square-client, beside Redis on the same machine.
#
# Streams a file of N numbers (default 1,000,000; mixed integers of 1 to 12
# digits, some negative, some decimals) through a release square-client to a
# release square-server, and runs redis-benchmark's pipelined PING_INLINE
# (-P 64 -c 4) against a redis-server of our own, both on loopback. Each side
# is run RUNS times (default 3) and the best is reported, with the ratio.
#
#   bench/square.sh                 # N=1000000 REDIS_N=2000000 RUNS=3
#   N=200000 RUNS=1 bench/square.sh # quicker
#
# Needs redis-server and redis-benchmark (Debian: redis-server, redis-tools);
# installs them with apt-get when missing.
set -euo pipefail

N=${N:-1000000}
REDIS_N=${REDIS_N:-2000000}
RUNS=${RUNS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    echo "installing redis-server and redis-tools with apt-get" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools >/dev/null
fi

(cd "$root" && cargo build --release --quiet -p square-server -p square-client)
server_bin=$target/release/square-server
client_bin=$target/release/square-client

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# A loopback port nothing listens on.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
}

now() { date +%s.%N; }

awk -v n="$N" 'BEGIN {
    srand(42)
    for (i = 0; i < n; i++) {
        d = int(rand() * 12) + 1; x = int(rand() * (10 ^ d)); r = rand()
        if (r < 0.1) printf "-%.0f\n", x
        else if (r < 0.2) printf "%.0f.%02d\n", x, int(rand() * 100)
        else printf "%.0f\n", x
    }
}' >"$work/numbers.txt"

square_port=$(free_port)
"$server_bin" --listen "127.0.0.1:$square_port" --log-level warn &
pids+=($!)
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
    if "$client_bin" --server "127.0.0.1:$square_port" 2 >/dev/null 2>&1 &&
        redis-cli -p "$redis_port" ping >/dev/null 2>&1; then
        break
    fi
    sleep 0.1
done

best_square=0
for run in $(seq "$RUNS"); do
    start=$(now)
    "$client_bin" --server "127.0.0.1:$square_port" <"$work/numbers.txt" >"$work/squares.txt"
    end=$(now)
    lines=$(wc -l <"$work/squares.txt")
    if [ "$lines" -ne "$N" ]; then
        echo "square-client printed $lines squares for $N numbers" >&2
        exit 1
    fi
    rate=$(awk -v n="$N" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f", n / (e - s) }')
    echo "square-client run $run: $N squares in $(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }') s = $rate/s" >&2
    [ "$rate" -gt "$best_square" ] && best_square=$rate
done

best_redis=0
for run in $(seq "$RUNS"); do
    line=$(redis-benchmark -h 127.0.0.1 -p "$redis_port" -t ping_inline -P 64 -c 4 \
        -n "$REDIS_N" -q 2>/dev/null | tr '\r' '\n' | grep 'requests per second' | tail -1)
    rate=$(echo "$line" | sed -E 's/.*PING_INLINE: ([0-9.]+) requests per second.*/\1/' |
        awk '{ printf "%.0f", $1 }')
    echo "redis-benchmark run $run: $rate/s" >&2
    [ "$rate" -gt "$best_redis" ] && best_redis=$rate
done

ratio=$(awk -v a="$best_square" -v b="$best_redis" 'BEGIN { printf "%.2f", a / b }')
cat <<TABLE
| what (best of $RUNS, $(nproc) cores) | requests/s |
|---|---:|
| square-client < $N numbers -> square-server | $best_square |
| redis-benchmark -t ping_inline -P 64 -c 4 -n $REDIS_N | $best_redis |
| ratio square / redis | $ratio |
TABLE
