#!/usr/bin/env bash
# Squares per second through square-client, beside Redis on the same machine.
#
# Streams a file of N numbers (default 1,000,000; mixed integers of 1 to 12
# digits, some negative, some decimals) through a release square-client to a
# release square-server, and runs redis-benchmark's pipelined PING_INLINE
# (-P 64 -c 4) against a redis-server of our own, both on loopback. Each side
# is run RUNS times (default 3) and the best is reported, with the ratio.
#
# Also reports square-client's peak memory (maximum resident set, from GNU
# time) streaming N lines and N/10 lines, the worst of RUNS runs each, and
# their ratio: constant memory means a ratio near 1.
#
#   bench/square.sh                 # N=1000000 REDIS_N=2000000 RUNS=3
#   N=200000 RUNS=1 bench/square.sh # quicker
#
# Needs redis-server and redis-benchmark (Debian: redis-server, redis-tools)
# and GNU time (Debian: time); installs them with apt-get when missing.
set -euo pipefail

N=${N:-1000000}
REDIS_N=${REDIS_N:-2000000}
RUNS=${RUNS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}

if [ "$N" -lt 10 ]; then
    echo "N must be at least 10 (the memory comparison streams N/10 lines)" >&2
    exit 64
fi

# GNU time, not the shell keyword: its %M is the peak resident set in KiB.
gnu_time=/usr/bin/time
missing=()
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    missing+=(redis-server redis-tools)
fi
if ! "$gnu_time" -f %M -o /dev/null true 2>/dev/null; then
    missing+=(time)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} with apt-get" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
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

# 1234567 -> 1,234,567
commas() { echo "$1" | sed -E ':a; s/([0-9])([0-9]{3})($|,)/\1,\2\3/; ta'; }

# KiB -> MiB with one decimal.
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# Streams file $1 through square-client under GNU time, checks that $2
# squares came out, and prints the client's peak resident set in KiB.
stream_measured() {
    "$gnu_time" -f %M -o "$work/rss" \
        "$client_bin" --server "127.0.0.1:$square_port" <"$1" >"$work/squares.txt"
    local lines
    lines=$(wc -l <"$work/squares.txt")
    if [ "$lines" -ne "$2" ]; then
        echo "square-client printed $lines squares for $2 numbers" >&2
        exit 1
    fi
    tail -1 "$work/rss"
}

awk -v n="$N" 'BEGIN {
    srand(42)
    for (i = 0; i < n; i++) {
        d = int(rand() * 12) + 1; x = int(rand() * (10 ^ d)); r = rand()
        if (r < 0.1) printf "-%.0f\n", x
        else if (r < 0.2) printf "%.0f.%02d\n", x, int(rand() * 100)
        else printf "%.0f\n", x
    }
}' >"$work/numbers.txt"
N_SMALL=$((N / 10))
head -n "$N_SMALL" "$work/numbers.txt" >"$work/numbers-small.txt"

# Waits up to 10 s for the command "${@:2}" to succeed while process $1
# lives.
wait_ready() {
    local pid=$1
    shift
    for _ in $(seq 100); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Each server on a free port. free_port only checks that nothing listens, so
# the port can still be taken (by a connection's local end, say) when the
# server binds: then it exits, and another port is tried.
for attempt in 1 2 3 4 5; do
    square_port=$(free_port)
    "$server_bin" --listen "127.0.0.1:$square_port" --log-level warn &
    pid=$!
    if wait_ready "$pid" "$client_bin" --server "127.0.0.1:$square_port" 2; then
        pids+=("$pid")
        break
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$attempt" -eq 5 ]; then
        echo "square-server did not start (see above)" >&2
        exit 1
    fi
done
for attempt in 1 2 3 4 5; do
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
    pid=$!
    if wait_ready "$pid" redis-cli -p "$redis_port" ping; then
        pids+=("$pid")
        break
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$attempt" -eq 5 ]; then
        echo "redis-server did not start:" >&2
        cat "$work/redis.log" >&2
        exit 1
    fi
done

best_square=0
peak_kib=0
for run in $(seq "$RUNS"); do
    start=$(now)
    kib=$(stream_measured "$work/numbers.txt" "$N")
    end=$(now)
    rate=$(awk -v n="$N" -v s="$start" -v e="$end" 'BEGIN { printf "%.0f", n / (e - s) }')
    echo "square-client run $run: $N squares in $(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.3f", e - s }') s = $rate/s, peak RSS $kib KiB" >&2
    [ "$rate" -gt "$best_square" ] && best_square=$rate
    [ "$kib" -gt "$peak_kib" ] && peak_kib=$kib
done

peak_small_kib=0
for run in $(seq "$RUNS"); do
    kib=$(stream_measured "$work/numbers-small.txt" "$N_SMALL")
    echo "square-client memory run $run: $N_SMALL squares, peak RSS $kib KiB" >&2
    [ "$kib" -gt "$peak_small_kib" ] && peak_small_kib=$kib
done

best_redis=0
for run in $(seq "$RUNS"); do
    redis-benchmark -h 127.0.0.1 -p "$redis_port" -t ping_inline -P 64 -c 4 \
        -n "$REDIS_N" -q >"$work/redis-benchmark.txt" 2>&1 || true
    line=$(tr '\r' '\n' <"$work/redis-benchmark.txt" | grep 'requests per second' | tail -1 || true)
    if [ -z "$line" ]; then
        echo "redis-benchmark run $run gave no rate:" >&2
        cat "$work/redis-benchmark.txt" >&2
        exit 1
    fi
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

memory_ratio=$(awk -v a="$peak_kib" -v b="$peak_small_kib" 'BEGIN { printf "%.2f", a / b }')
cat <<TABLE

| square-client peak memory (max RSS, worst of $RUNS) | MiB | KiB |
|---|---:|---:|
| $(commas "$N") lines | $(mib "$peak_kib") | $peak_kib |
| $(commas "$N_SMALL") lines | $(mib "$peak_small_kib") | $peak_small_kib |
| ratio $(commas "$N") / $(commas "$N_SMALL") | $memory_ratio | |

$(commas "$N") lines: $(mib "$peak_kib") MiB peak; $(commas "$N_SMALL") lines: $(mib "$peak_small_kib") MiB
TABLE
